"""The lean RMSNorm behind chunk_norm (fusedrl.nn.lean_rms_norm): transformers' own output bit for bit, autograd's
gradients through the module, the derivative itself (gradcheck), and which norms take it."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

from fusedrl.nn.chunked_mlp import chunk_norm, unchunk_mlp
from fusedrl.nn.lean_rms_norm import is_transformers_rms_norm, lean_rms_norm

LEAN, GENERIC = "_LeanRMSNormBackward", "_ChunkedTokensBackward"


def _norm(cls: type, width: int, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """A transformers norm with a random weight (ones would hide a weight applied in the wrong place)."""
    norm = cls(width, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(width, generator=torch.Generator().manual_seed(seed)) * 0.5 + 1)
    return norm


def _input(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3
    x.reshape(-1, shape[-1])[::3] = 0  # masked rows: rstd = 1/sqrt(eps), still finite
    return x.to(dtype)


def _grad_output(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return (torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 7.5).to(dtype)


def _autograd(norm: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The norm's output and the gradients of x and weight; the weight's gradient is taken away again."""
    x = x.detach().requires_grad_()
    out = norm(x)
    out.backward(grad)
    grad_weight, norm.weight.grad = norm.weight.grad, None
    return out.detach(), x.grad, grad_weight, out.grad_fn


@pytest.mark.parametrize("cls", [LlamaRMSNorm, Qwen3RMSNorm])
@pytest.mark.parametrize("width", [1, 7, 64])
@pytest.mark.parametrize("shape, chunk", [((1, 1), 1), ((3, 7), 1), ((3, 7), 4), ((3, 7), 5), ((3, 7), 100)])
def test_float64_output_equal_and_gradients_of_the_module(cls, width, shape, chunk):
    norm = _norm(cls, width, torch.float64)
    x, grad = _input((*shape, width), torch.float64), _grad_output((*shape, width), torch.float64)
    expected = _autograd(norm, x, grad)
    chunk_norm(norm, chunk)
    if x.numel() // width > chunk:
        got = _autograd(norm, x, grad)
        assert type(got[3]).__name__ == LEAN
    else:  # chunk_norm leaves a pass of one chunk to the module; the Function itself is checked on one chunk here
        x_lean, weight = x.detach().requires_grad_(), norm.weight.detach().requires_grad_()
        out = lean_rms_norm(x_lean, weight, norm.variance_epsilon, chunk)
        out.backward(grad)
        got = out.detach(), x_lean.grad, weight.grad
    assert torch.equal(got[0], expected[0])
    for name, value, reference in zip(("x", "weight"), got[1:3], expected[1:3]):
        torch.testing.assert_close(value, reference, rtol=1e-12, atol=1e-13, msg=name)
    unchunk_mlp(norm)
    assert "forward" not in norm.__dict__


def test_gradcheck_of_the_derivative_and_of_the_float32_arithmetic():
    """The derivative formula in float64 arithmetic (tight), and the float32 arithmetic transformers uses (float32
    rounding ~6e-8 of O(1) outputs over eps=1e-3 steps: finite differences err by ~1e-4; no zero rows there, whose
    curvature at the scale sqrt(norm eps) ~ 3e-3 such steps do not resolve)."""
    x = _input((3, 5, 6), torch.float64).requires_grad_()  # zero rows included
    weight = _norm(LlamaRMSNorm, 6, torch.float64).weight.detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, w: lean_rms_norm(a, w, 1e-5, 4, torch.float64), (x, weight))
    x = torch.randn(3, 5, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, w: lean_rms_norm(a, w, 1e-5, 4), (x, weight), eps=1e-3, atol=1e-3,
                                    rtol=1e-3)


@pytest.mark.parametrize("dtype, weight_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
                                                 (torch.bfloat16, torch.float32)])  # float32 weight: QLoRA's norms
@pytest.mark.parametrize("autocast", [False, True])
def test_low_precision_forward_equal_and_gradients_within_dtype_tolerance(dtype, weight_dtype, autocast):
    width, shape, chunk = 64, (3, 7, 64), 5
    norm = _norm(LlamaRMSNorm, width, weight_dtype)
    x, grad = _input(shape, dtype), _grad_output(shape, torch.promote_types(dtype, weight_dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        expected = _autograd(norm, x, grad)
        chunk_norm(norm, chunk)
        got = _autograd(norm, x, grad)
    assert type(got[3]).__name__ == LEAN
    assert torch.equal(got[0], expected[0])
    # The exact derivative in float64 of the same weights and inputs. bfloat16 keeps 8 significant bits (2^-9 ~ 2e-3
    # per rounding) and the gradient passes several roundings (grad * weight, y0, the result) and a difference of
    # two terms, so 2e-2 of the gradient's largest magnitude bounds it; float32 has 2^16 times more precision.
    x64, weight64 = x.double().requires_grad_(), norm.weight.detach().double().requires_grad_()
    (weight64 * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5)).backward(grad.double())
    tolerance = 2e-2 if torch.bfloat16 in (dtype, weight_dtype) else 1e-5
    for name, value, reference in zip(("x", "weight"), got[1:3], (x64.grad, weight64.grad)):
        scale = reference.abs().max().item()
        torch.testing.assert_close(value.double(), reference, rtol=tolerance, atol=tolerance * scale, msg=name)
    # against autograd through the module itself: x's gradient takes autograd's roundings; the weight's is a sum in
    # another order (float32 across chunks) and may differ by one rounding of the weight's dtype
    torch.testing.assert_close(got[1], expected[1], rtol=0, atol=0)
    torch.testing.assert_close(got[2].double(), expected[2].double(), rtol=1e-2 if weight_dtype == torch.bfloat16
                               else 1e-6, atol=1e-6)


def test_qwen3_head_norm_on_a_non_contiguous_per_head_view():
    """q_norm sees (batch, tokens, heads, head_dim); here a transposed view, and a non-contiguous gradient."""
    norm = _norm(Qwen3RMSNorm, 8, torch.float64)
    x = _input((2, 4, 9, 8), torch.float64).transpose(1, 2)  # (2, 9, 4, 8), not contiguous
    grad = _grad_output((2, 9, 8, 4), torch.float64).transpose(-1, -2)
    assert not x.is_contiguous() and not grad.is_contiguous()
    expected = _autograd(norm, x, grad)
    chunk_norm(norm, 7)  # 72 rows of head_dim: 11 chunks, the last short
    got = _autograd(norm, x, grad)
    assert type(got[3]).__name__ == LEAN and got[0].shape == x.shape
    assert torch.equal(got[0], expected[0])
    for name, value, reference in zip(("x", "weight"), got[1:3], expected[1:3]):
        torch.testing.assert_close(value, reference, rtol=1e-12, atol=1e-13, msg=name)


def test_only_the_inputs_that_need_a_gradient_get_one():
    norm = _norm(LlamaRMSNorm, 7, torch.float64)
    chunk_norm(norm, 2)
    x = _input((5, 7), torch.float64)
    norm(x).sum().backward()  # x without grad: the weight's only
    assert norm.weight.grad is not None
    norm.weight.grad = None
    norm.weight.requires_grad_(False)
    x.requires_grad_()
    norm(x).sum().backward()
    assert x.grad is not None and norm.weight.grad is None
    with torch.no_grad():  # the cheap chunked path: no graph
        assert norm(x).grad_fn is None
    with pytest.raises(RuntimeError, match="twice|once"):
        grad = torch.autograd.grad(norm(x).pow(2).sum(), x, create_graph=True)[0]
        grad.sum().backward()


class _NormWithoutEpsilonAttribute(torch.nn.Module):
    """An RMSNorm by formula but not transformers' class (no variance_epsilon): the generic path."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.linspace(0.5, 1.5, width, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


@pytest.mark.parametrize("make", [lambda: _NormWithoutEpsilonAttribute(6),
                                  lambda: _norm(Olmo2RMSNorm, 6, torch.float64)])  # same attributes, weight cast
def test_other_norms_keep_the_generic_recompute(make):
    norm, reference = make(), make()
    assert not is_transformers_rms_norm(norm)
    x = _input((4, 6), torch.float64)
    grad = _grad_output((4, 6), torch.float64)
    expected = _autograd(reference, x, grad)
    chunk_norm(norm, 3)
    got = _autograd(norm, x, grad)
    assert type(got[3]).__name__ == GENERIC
    for value, want in zip(got[:3], expected[:3]):
        torch.testing.assert_close(value, want, rtol=1e-12, atol=1e-13)


def test_recognition():
    assert is_transformers_rms_norm(LlamaRMSNorm(4)) and is_transformers_rms_norm(Qwen3RMSNorm(4))
    gemma = pytest.importorskip("transformers.models.gemma.modeling_gemma")
    assert not is_transformers_rms_norm(gemma.GemmaRMSNorm(4))  # y = x_hat * (1 + weight)
    assert not is_transformers_rms_norm(torch.nn.LayerNorm(4))
