"""The fast paths of the NF4 ops, each forced by its shape: the vector dequantize kernel at every unroll depth and in the
padded (ld > K) scratch layout, the tensor-core small-M kernel (K % 128 == 0) with shards and every blocksize, the
LoRA down-projection kernel and its fallback, and the C++ autograd (no graph without grad, needs_input_grad honoured,
bias gradient). Values are compared with the float64 reference; dequantization bit for bit."""

from __future__ import annotations

import pytest
import torch

from fusedrl.ops import NF4Shards, nf4_dequantize, nf4_lora_linear, nf4_quantize
from fusedrl.ops.reference import nf4_dequantize_reference, nf4_lora_linear_reference

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)


def _quantized(shape, device, generator, blocksize=64, nested=True):
    w = (torch.randn(shape, generator=generator) * torch.rand(shape[0], 1, generator=generator) * 2).to(device)
    return nf4_quantize(w, blocksize, compress_statistics=nested)


def _dequant_sizes(device: torch.device, values_per_chunk: int) -> list[tuple[int, int]]:
    """Shapes whose chunk count selects the 1-, 2- and 4-deep unrolled kernel on this card (two waves of 2048 threads
    per SM, times the depth), each with a tail of < 8 values and a partial last warp."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    wave_chunks = sms * 2048 * 2
    cols = 1003  # odd: rows straddle chunks and quantization blocks
    shapes = [(3, cols)]
    for depth in (2, 4):
        rows = -(-wave_chunks * depth * values_per_chunk // cols) + 1
        shapes.append((rows, cols))
    return shapes


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("blocksize", [64, 128, 256])
@pytest.mark.parametrize("nested", [False, True])
def test_vector_dequantize_is_bit_exact_at_every_unroll_depth(dtype, blocksize, nested, generator):
    values_per_chunk = 16 // torch.empty((), dtype=dtype).element_size()
    for shape in _dequant_sizes(torch.device("cuda"), values_per_chunk):
        packed, state = _quantized(shape, "cuda", generator, blocksize, nested)
        torch.full(shape, float("nan"), dtype=dtype, device="cuda")  # poison the allocator's next block
        out = nf4_dequantize(packed, state, dtype)
        expected = nf4_dequantize_reference(packed, state).float().to(dtype)
        assert not out.isnan().any(), f"unwritten values, shape {shape} seed {generator.initial_seed()}"
        assert torch.equal(_bits(out), _bits(expected)), f"shape {shape} seed {generator.initial_seed()}"
        del packed, state, out, expected
        torch.cuda.empty_cache()


# (M, N, K, r, dtype): K < N with M > 16, so the forward dequantizes into the padded (N, K + r) scratch; the first
# ones have (K + r) * element size % 16 == 0 (the vector kernel's strided layout), the last ones do not (scalar).
PADDED = [(40, 200, 128, 16, torch.bfloat16), (33, 96, 64, 8, torch.float16), (20, 300, 256, 4, torch.float32),
          (70, 96, 64, 4, torch.bfloat16), (17, 64, 40, 3, torch.float32)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", PADDED)
@pytest.mark.parametrize("blocksize", [64, 256])
def test_lora_linear_through_the_padded_scratch_matches_float64(device, case, blocksize, generator):
    m, n, k, r, dtype = case
    packed, state = _quantized((n, k), device, generator, blocksize)
    make = lambda *s: (torch.randn(*s, generator=generator) * 0.5).to(device, dtype)  # noqa: E731
    x, a, b, bias = make(m, k), make(r, k), make(n, r), make(n)
    leaves = [t.requires_grad_() for t in (x, a, b, bias)]
    y = nf4_lora_linear(leaves[0], packed, state, leaves[1], leaves[2], 0.5, leaves[3])
    g = torch.randn(m, n, generator=generator).to(device, dtype)
    grads = torch.autograd.grad(y, leaves, g)
    w64 = nf4_dequantize_reference(packed, state)

    def run(cast):
        ls = [t.detach().to(cast).requires_grad_() for t in leaves]
        out = nf4_lora_linear_reference(ls[0], w64.to(cast), ls[1], ls[2], 0.5, ls[3])
        return (out, *torch.autograd.grad(out, ls, g.to(cast)))

    truth, naive = run(torch.float64), run(dtype)
    eps = torch.finfo(dtype).eps
    for got, same, want, name in zip((y, *grads), naive, truth, ("y", "dx", "dA", "dB", "dbias")):
        err = (got.double() - want).abs().max()
        budget = 2 * (same.double() - want).abs().max() + 4 * eps * want.abs().max()
        assert err <= budget, f"{name}: {err:.3g} > {budget:.3g} seed {generator.initial_seed()}"


def _small_m_check(y, x, w64, a, b, bias, scaling, dtype, seed):
    truth = nf4_lora_linear_reference(x.double(), w64, a.double(), b.double(), scaling,
                                      None if bias is None else bias.double())
    naive = nf4_lora_linear_reference(x, w64.to(dtype), a.to(dtype), b.to(dtype), scaling,
                                      None if bias is None else bias.to(dtype)).double()
    err, budget = (y.double() - truth).abs().max(), 2 * (naive - truth).abs().max()
    assert not y.isnan().any() and err <= budget + 4 * torch.finfo(dtype).eps * truth.abs().max(), (
        f"{err:.3g} > {budget:.3g} seed {seed}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 3, 8, 9, 16])
@pytest.mark.parametrize("blocksize", [64, 128, 256])
@pytest.mark.parametrize("nested", [False, True])
def test_tensor_core_small_m_path_matches_float64(dtype, m, blocksize, nested, generator):
    # K % 128 == 0 selects the tensor-core kernel; N = 203 leaves a partial block of 8 rows.
    n, k, r = 203, 1152, 16
    packed, state = _quantized((n, k), "cuda", generator, blocksize, nested)
    make = lambda *s: (torch.randn(*s, generator=generator) * 0.5).to("cuda", dtype)  # noqa: E731
    x, a, b, bias = make(m, k), make(r, k), make(n, r), make(n)
    torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
    with torch.no_grad():
        y = nf4_lora_linear(x, packed, state, a, b, 0.5, bias)
    _small_m_check(y, x, nf4_dequantize_reference(packed, state), a, b, bias, 0.5, dtype, generator.initial_seed())


@pytest.mark.cuda
@pytest.mark.parametrize("m", [2, 12])
def test_tensor_core_small_m_path_with_shards_and_float32_adapters(m, generator):
    # Shards of 24, 8 and 13 rows (the last not a multiple of 8); float32 adapters take the down-projection fallback.
    parts = [_quantized((rows, 256), "cuda", generator) for rows in (24, 8, 13)]
    shards = NF4Shards(parts)
    x = torch.randn(m, 256, generator=generator).to("cuda", torch.bfloat16)
    a = torch.randn(4, 256, generator=generator).to("cuda") * 0.1
    b = torch.randn(45, 4, generator=generator).to("cuda") * 0.1
    y = nf4_lora_linear(x, shards, None, a, b, 2.0)
    w64 = torch.cat([nf4_dequantize_reference(p, s) for p, s in parts])
    _small_m_check(y, x, w64, a, b, None, 2.0, torch.bfloat16, generator.initial_seed())


@pytest.mark.parametrize("device", DEVICES)
def test_no_grad_calls_build_no_graph_and_grads_follow_needs_input_grad(device, generator):
    packed, state = _quantized((48, 64), device, generator)
    x = torch.randn(5, 64, generator=generator).to(device).requires_grad_()
    a = torch.randn(4, 64, generator=generator).to(device).requires_grad_()
    b = torch.randn(48, 4, generator=generator).to(device)
    bias = torch.randn(48, generator=generator).to(device).requires_grad_()
    with torch.no_grad():
        assert nf4_lora_linear(x, packed, state, a, b, 1.0, bias).grad_fn is None
    with torch.inference_mode():
        assert nf4_lora_linear(x.detach(), packed, state, a.detach(), b, 1.0).grad_fn is None
    y = nf4_lora_linear(x, packed, state, a, b, 1.0, bias)
    assert y.grad_fn is not None
    g = torch.randn(5, 48, generator=generator).to(device)
    gx, ga, gbias = torch.autograd.grad(y, [x, a, bias], g)
    w = nf4_dequantize(packed, state, torch.float32)
    assert torch.allclose(gbias, g.sum(0), rtol=1e-5, atol=1e-5)
    assert torch.allclose(gx, g @ w + (g @ b) @ a, rtol=1e-4, atol=1e-4)
    assert torch.allclose(ga, ((g @ b).t() @ x), rtol=1e-4, atol=1e-4)
    # only lora_A asks for a gradient: the others stay None (the backward computes what is needed)
    y = nf4_lora_linear(x.detach(), packed, state, a, b, 1.0, bias.detach())
    (ga_only,) = torch.autograd.grad(y, [a], g)
    assert torch.allclose(ga_only, ga)
