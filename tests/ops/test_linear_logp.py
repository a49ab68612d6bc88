"""fusedrl::fused_linear_logp against the float64 reference: values, gradients, opcheck, errors; CPU and CUDA."""

from __future__ import annotations

import pytest
import torch

from fusedrl.ops import linear_logp
from fusedrl.ops.reference import selective_logp_reference

from loss_inputs import lm_head_inputs

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
SHAPES = [(1, 1, 1), (1, 7, 5), (13, 17, 31), (37, 64, 257), (64, 33, 1000)]  # (N, H, V): no tile multiples
LOW_PRECISION = [torch.float32, torch.bfloat16, torch.float16]
OPTIONS = [dict(), dict(temperature=0.7), dict(logit_softcap=5.0, temperature=1.3), dict(bias=True)]


def _reference64(hidden, weight, targets, bias, **kw):
    """Ground truth: float64 math on the (already rounded) inputs."""
    to64 = lambda t: None if t is None else t.detach().double()  # noqa: E731
    return selective_logp_reference(to64(hidden), to64(weight), targets, to64(bias), **kw)


def _max_abs_logit(hidden, weight, bias, **kw) -> float:
    from fusedrl.ops.reference import logits_reference
    to64 = lambda t: None if t is None else t.detach().double()  # noqa: E731
    return float(logits_reference(to64(hidden), to64(weight), to64(bias), **kw).abs().max())


def _same_dtype_error(hidden, weight, targets, bias, truth, **kw):
    """How far naive PyTorch in the inputs' dtype (GEMM in that dtype, log-softmax in fp32) lands from truth."""
    logp, entropy = selective_logp_reference(hidden.detach(), weight.detach(), targets,
                                             None if bias is None else bias.detach(), **kw)
    return (logp.double() - truth[0]).abs().max(), (entropy.double() - truth[1]).abs().max()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW_PRECISION + [torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("options", OPTIONS, ids=["plain", "temperature", "softcap", "bias"])
@pytest.mark.parametrize("chunk_size", [None, 1, 5])
def test_values_match_reference(device, dtype, shape, options, chunk_size, generator):
    if device == "cpu" and dtype == torch.float16 and shape[2] >= 1000 and chunk_size == 1:
        pytest.skip("covered by the other chunk sizes; CPU fp16 GEMMs are slow")
    options = dict(options)
    hidden, weight, targets, bias = lm_head_inputs(*shape, dtype, device, bias=options.pop("bias", False),
                                                   generator=generator)
    truth = _reference64(hidden, weight, targets, bias, **options)
    logp, entropy = linear_logp(hidden, weight, targets, bias, return_entropy=True, chunk_size=chunk_size, **options)
    assert logp.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert logp.shape == entropy.shape == (shape[0],)
    err_logp = (logp.double().cpu() - truth[0].cpu()).abs().max()
    err_entropy = (entropy.double().cpu() - truth[1].cpu()).abs().max()
    if dtype == torch.float64:
        tol_logp = tol_entropy = 1e-10
    else:  # no worse than naive PyTorch in the same dtype, plus fp32 rounding noise of the row sums
        naive_logp, naive_entropy = _same_dtype_error(hidden, weight, targets, bias, truth, **options)
        # Rounding each logit z to the dtype moves logp = z_t - lse by at most eps * max|z| (tiny cases where
        # naive PyTorch happens to round luckily), plus fp32 noise of the row sums.
        noise = torch.finfo(dtype).eps * _max_abs_logit(hidden, weight, bias, **options) + 1e-5 * (
            1 + float(truth[0].abs().max()))
        tol_logp, tol_entropy = 2 * float(naive_logp) + noise, 2 * float(naive_entropy) + noise
    seed = generator.initial_seed()
    assert err_logp <= tol_logp, f"logp error {err_logp} > {tol_logp} (seed {seed})"
    assert err_entropy <= tol_entropy, f"entropy error {err_entropy} > {tol_entropy} (seed {seed})"
    assert torch.isfinite(logp).all() and torch.isfinite(entropy).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("trainable_head", [False, True], ids=["frozen", "trainable"])
@pytest.mark.parametrize("options", OPTIONS, ids=["plain", "temperature", "softcap", "bias"])
def test_gradcheck_float64(device, trainable_head, options, generator):
    options = dict(options)
    hidden, weight, targets, bias = lm_head_inputs(6, 5, 11, torch.float64, device, bias=options.pop("bias", False),
                                                   generator=generator)
    hidden.requires_grad_()
    inputs = [hidden]
    if trainable_head:
        weight.requires_grad_()
        inputs.append(weight)
        if bias is not None:
            bias.requires_grad_()
            inputs.append(bias)

    def fn(*args):
        h = args[0]
        w = args[1] if trainable_head else weight
        b = args[2] if trainable_head and bias is not None else bias
        return linear_logp(h, w, targets, b, chunk_size=4, **options)[0]

    assert torch.autograd.gradcheck(fn, tuple(inputs))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("trainable_head", [False, True], ids=["frozen", "trainable"])
def test_low_precision_gradients(device, dtype, trainable_head, generator):
    """Gradients in the inputs' dtype are no worse than naive autograd in that dtype (vs float64 truth)."""
    hidden, weight, targets, bias = lm_head_inputs(29, 48, 301, dtype, device, bias=trainable_head,
                                                   generator=generator)
    upstream = torch.randn(29, generator=generator, dtype=torch.float64).to(device)

    def grads(h, w, b, fn):
        h = h.detach().clone().requires_grad_()
        w = w.detach().clone().requires_grad_(trainable_head)
        b = None if b is None else b.detach().clone().requires_grad_(trainable_head)
        logp = fn(h, w, b)
        (logp.double() * upstream).sum().backward()
        return [t.grad.double() for t in (h, w, b) if t is not None and t.grad is not None]

    ours = grads(hidden, weight, bias, lambda h, w, b: linear_logp(h, w, targets, b, chunk_size=7)[0])
    naive = grads(hidden, weight, bias, lambda h, w, b: selective_logp_reference(h, w, targets, b)[0])
    truth = grads(hidden.double(), weight.double(), None if bias is None else bias.double(),
                  lambda h, w, b: selective_logp_reference(h, w, targets, b)[0])
    assert len(ours) == len(truth) == (3 if trainable_head else 1)
    for mine, theirs, exact in zip(ours, naive, truth):
        err, naive_err = (mine - exact).abs().max(), (theirs - exact).abs().max()
        scale = float(exact.abs().max())
        # Rounding we add on top of naive autograd: d logp / d raw stored in the inputs' dtype, the GEMM output
        # rounded, and (trainable head) the weight gradient rounded once per chunk it accumulates; plus fp32
        # accumulation noise of a length-V dot product.
        n_chunks = -(-29 // 7)
        rounding = ((n_chunks + 2) * torch.finfo(dtype).eps / 2 + 301 * torch.finfo(torch.float32).eps) * scale
        assert err <= 2 * naive_err + rounding, f"{err} vs naive {naive_err} (seed {generator.initial_seed()})"


@pytest.mark.parametrize("device", DEVICES)
def test_backward_honours_grad_output(device, generator):
    hidden, weight, targets, _ = lm_head_inputs(9, 8, 23, torch.float64, device, generator=generator)
    hidden.requires_grad_()
    upstream = torch.randn(9, dtype=torch.float64, generator=generator).to(device)
    (linear_logp(hidden, weight, targets)[0] * upstream).sum().backward()
    g1 = hidden.grad.clone()
    hidden.grad = None
    (linear_logp(hidden, weight, targets)[0] * upstream * 3.5).sum().backward()
    torch.testing.assert_close(hidden.grad, 3.5 * g1)


@pytest.mark.parametrize("device", DEVICES)
def test_large_fp16_logits_stay_finite(device, generator):
    """Logits of several thousand (near fp16 range) overflow a naive exp; the op stays finite and accurate."""
    hidden, weight, targets, _ = lm_head_inputs(16, 32, 97, torch.float64, device, peaked=False, generator=generator)
    hidden = (hidden * 300).half()
    weight = weight.half()
    truth = _reference64(hidden, weight, targets, None)
    logp, entropy = linear_logp(hidden, weight, targets, return_entropy=True)
    assert torch.isfinite(logp).all() and torch.isfinite(entropy).all()
    torch.testing.assert_close(logp.double(), truth[0], atol=1e-3 * float(truth[0].abs().max()) + 1e-4, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_and_empty_inputs(device, generator):
    hidden, weight, targets, _ = lm_head_inputs(10, 12, 17, torch.float32, device, generator=generator)
    strided = torch.stack([hidden, hidden], dim=-1)[..., 0]  # same values, non-contiguous
    assert not strided.is_contiguous()
    torch.testing.assert_close(linear_logp(strided, weight, targets)[0], linear_logp(hidden, weight, targets)[0])
    empty_logp, _ = linear_logp(hidden[:0], weight, targets[:0])
    assert empty_logp.shape == (0,)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.errors
def test_errors_name_the_argument(device, generator):
    hidden, weight, targets, bias = lm_head_inputs(4, 6, 9, torch.float32, device, bias=True, generator=generator)
    with pytest.raises(RuntimeError, match=r"target ids must lie in \[0, 9\), got values in \[.*9\]"):
        linear_logp(hidden, weight, torch.full_like(targets, 9))
    with pytest.raises(RuntimeError, match=r"target ids must lie in \[0, 9\), got values in \[-1"):
        linear_logp(hidden, weight, torch.full_like(targets, -1))
    with pytest.raises(RuntimeError, match="weight dtype"):
        linear_logp(hidden, weight.double(), targets)
    with pytest.raises(RuntimeError, match="weight .V, H. must have H"):
        linear_logp(hidden, weight[:, :5], targets)
    with pytest.raises(RuntimeError, match="targets must have shape"):
        linear_logp(hidden, weight, targets[:3])
    with pytest.raises(RuntimeError, match="targets must be int64"):
        linear_logp(hidden, weight, targets.int())
    with pytest.raises(RuntimeError, match="bias must have shape"):
        linear_logp(hidden, weight, targets, bias[:4])
    with pytest.raises(RuntimeError, match="temperature must be > 0"):
        linear_logp(hidden, weight, targets, temperature=0.0)
    with pytest.raises(RuntimeError, match="logit_softcap must be > 0"):
        linear_logp(hidden, weight, targets, logit_softcap=-1.0)
    with pytest.raises(RuntimeError, match="hidden must be float16, bfloat16, float32 or float64"):
        linear_logp(hidden.long(), weight.long(), targets)
    if device == "cuda":
        with pytest.raises(RuntimeError, match="weight is on cpu but hidden is on cuda"):
            linear_logp(hidden, weight.cpu(), targets)
        with pytest.raises(RuntimeError, match="targets is on cpu but hidden is on cuda"):
            linear_logp(hidden, weight, targets.cpu())


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device, generator):
    hidden, weight, targets, bias = lm_head_inputs(7, 6, 13, torch.float64, device, bias=True, generator=generator)
    hidden.requires_grad_()
    for compute_direction in (False, True):
        torch.library.opcheck(torch.ops.fusedrl.fused_linear_logp.default,
                              (hidden, weight, bias, targets, 0.9, 4.0, True, compute_direction, 3))
    lse = linear_logp(hidden.detach(), weight, targets, bias)[0]  # any (N,) float64 tensor serves as lse here
    torch.library.opcheck(torch.ops.fusedrl.fused_linear_logp_backward.default,
                          (torch.randn(7, dtype=torch.float64, device=device), hidden.detach(), weight, bias, targets,
                           lse, 0.9, 4.0, [True, True, True], 3))


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_runs_the_head_in_the_autocast_dtype(device, generator):
    """float32 hidden and head under bf16 autocast: computed like nn.Linear under autocast, gradients in float32."""
    hidden, weight, targets, _ = lm_head_inputs(8, 16, 37, torch.float32, device, generator=generator)
    hidden.requires_grad_()
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        logp, _ = linear_logp(hidden, weight, targets)
    expected, _ = selective_logp_reference(hidden.bfloat16(), weight.bfloat16(), targets)
    torch.testing.assert_close(logp, expected.float(), atol=1e-3, rtol=0)
    logp.sum().backward()
    assert hidden.grad.dtype == torch.float32 and torch.isfinite(hidden.grad).all()
