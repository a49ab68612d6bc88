"""fusedrl's NF4 ops: bit-exactness with bitsandbytes (when installed) and with the float64 reference, the LoRA
linear layer's values and gradients, opcheck / compile, shards, serialization, bad input; CPU and CUDA."""

from __future__ import annotations

import pytest
import torch

from fusedrl.ops import NF4QuantState, NF4Shards, nf4_dequantize, nf4_lora_linear, nf4_quantize
from fusedrl.ops.nf4 import dynamic_map, nf4_code
from fusedrl.ops.reference import nf4_dequantize_reference, nf4_lora_linear_reference, nf4_quantize_reference

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
FLOATS = [torch.float32, torch.bfloat16, torch.float16]
BLOCKSIZES = [64, 128, 256]
SHAPES = [(1, 1), (1, 3), (7, 10), (33, 64), (5, 257), (64, 128), (300, 256)]  # odd sizes, partial last blocks


def _weight(shape, dtype, device, generator):
    """Gaussian rows of different scales (so blocks differ), with one exactly-zero block when there is room."""
    w = torch.randn(shape, generator=generator) * torch.rand(shape[0], 1, generator=generator) * 3
    if w.numel() >= 512:
        w.view(-1)[128:192] = 0.0
    return w.to(dtype=dtype, device=device)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)


def test_code_table_is_the_nf4_table_and_thresholds_are_its_midpoints():
    code = nf4_code()
    assert code.dtype == torch.float32 and code.shape == (16,)
    assert code[0] == -1 and code[7] == 0 and code[15] == 1 and bool((code[1:] > code[:-1]).all())
    # Values exactly at a midpoint take the lower code, just above it the upper one (the kernels' thresholds).
    mids = (code[:-1] + code[1:]) / 2
    for i, m in enumerate(mids.tolist()):
        for value, expected in ((m, i), (torch.nextafter(torch.tensor(m), torch.tensor(2.0)).item(), i + 1)):
            w = torch.tensor([[1.0, value]])
            packed, _ = nf4_quantize(w, 64, compress_statistics=False)
            assert (packed[0, 0].item() & 15) == expected, (i, value)


def test_dynamic_map_is_sorted_signed_and_256_long():
    m = dynamic_map()
    assert m.shape == (256,) and -1 < m[0] < -0.99 and m[-1] == 1 and bool((m[1:] >= m[:-1]).all())
    assert bool((m == 0).any())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("shape", SHAPES)
def test_dequantize_equals_float64_reference_rounded_once(device, nested, blocksize, shape, generator):
    w = _weight(shape, torch.float32, device, generator)
    packed, state = nf4_quantize(w, blocksize, compress_statistics=nested)
    truth = nf4_dequantize_reference(packed, state)
    for dtype in FLOATS:
        # Poison: a NaN-filled block of the output's size is freed first, so the allocator hands it back.
        torch.full(shape, float("nan"), dtype=dtype, device=device)
        out = nf4_dequantize(packed, state, dtype)
        assert out.shape == shape and out.dtype == dtype and not out.isnan().any()
        expected = truth.float().to(dtype)  # the float32 product rounded once to the output dtype
        assert torch.equal(_bits(out), _bits(expected)), f"seed {generator.initial_seed()} {dtype}"
    out64 = nf4_dequantize(packed, state, torch.float64)
    assert torch.equal(out64, truth.float().double())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_quantize_picks_the_nearest_code_per_block(device, dtype, blocksize, generator):
    w = _weight((37, 96), dtype, device, generator)
    packed, state = nf4_quantize(w, blocksize, compress_statistics=False)
    codes, absmax = nf4_quantize_reference(w, blocksize)
    assert torch.equal(state.absmax, absmax)
    got = torch.stack([packed.reshape(-1) >> 4, packed.reshape(-1) & 15], 1).reshape(-1)[: w.numel()].long()
    nonzero = absmax.repeat_interleave(blocksize)[: w.numel()] > 0  # CUDA codes an all-zero block as 0 (see nf4.h)
    if device == "cpu":
        assert torch.equal(got, codes), f"seed {generator.initial_seed()}"
    else:
        # The CUDA rule scales by the approximate reciprocal: a value within an ulp of a midpoint may move.
        assert (got[nonzero] != codes[nonzero]).float().mean() < 1e-3
    # Round trip within half the widest gap of the table times the block scale.
    back = nf4_dequantize(packed, state, torch.float32)
    err = (back - w.float()).abs().reshape(-1)
    assert bool((err <= 0.16 * absmax.repeat_interleave(blocksize)[: w.numel()] + 1e-6).all())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("shape", SHAPES)
def test_bytes_and_dequantize_equal_bitsandbytes(device, nested, dtype, blocksize, shape, generator):
    F = pytest.importorskip("bitsandbytes.functional")
    w = _weight(shape, dtype, device, generator)
    ref_packed, ref_state = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type="nf4")
    packed, state = nf4_quantize(w, blocksize, compress_statistics=nested)
    seed = f"seed {generator.initial_seed()}"
    assert packed.shape == ref_packed.shape and torch.equal(packed, ref_packed), seed
    if nested:
        assert torch.equal(state.absmax_q, ref_state.absmax), seed
        assert torch.equal(state.nested_absmax, ref_state.state2.absmax), seed
        assert torch.equal(state.nested_code, ref_state.state2.code) and state.offset == float(ref_state.offset)
    else:
        assert torch.equal(state.absmax, ref_state.absmax), seed
    assert torch.equal(state.code, ref_state.code.cpu().to(state.code.device))
    for out_dtype in FLOATS:
        ref_state.dtype = out_dtype
        expected = F.dequantize_4bit(ref_packed, ref_state, quant_type="nf4")
        assert torch.equal(_bits(nf4_dequantize(packed, state, out_dtype)), _bits(expected)), (seed, out_dtype)


@pytest.mark.parametrize("nested", [False, True])
def test_state_converts_to_and_from_bitsandbytes_and_its_serialized_keys(nested, generator):
    F = pytest.importorskip("bitsandbytes.functional")
    w = _weight((48, 128), torch.bfloat16, "cpu", generator)
    packed, state = nf4_quantize(w, 64, compress_statistics=nested)
    ref_packed, ref_state = F.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type="nf4")
    theirs = ref_state.as_dict(packed=True)
    ours = state.state_dict()
    assert set(ours) == set(theirs)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    back = NF4QuantState.from_state_dict({"weight." + k: v for k, v in theirs.items()}, prefix="weight.")
    assert torch.equal(nf4_dequantize(ref_packed, back), nf4_dequantize(packed, state))
    assert torch.equal(nf4_dequantize(packed, NF4QuantState.from_bitsandbytes(ref_state)), nf4_dequantize(packed, state))
    converted = state.to_bitsandbytes()
    assert torch.equal(F.dequantize_4bit(packed, converted, quant_type="nf4"), nf4_dequantize(packed, state))


@pytest.mark.parametrize("nested", [False, True])
def test_state_dict_round_trip_without_bitsandbytes(nested, generator):
    w = _weight((20, 64), torch.float16, "cpu", generator)
    packed, state = nf4_quantize(w, 128, compress_statistics=nested)
    back = NF4QuantState.from_state_dict(state.state_dict("q."), prefix="q.")
    assert back.shape == state.shape and back.dtype == torch.float16 and back.blocksize == 128
    assert torch.equal(nf4_dequantize(packed, back), nf4_dequantize(packed, state))
    assert state.to("cpu").nested == nested


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nested", [False, True])
def test_shards_stack_along_n(device, nested, generator):
    parts = [_weight((n, 64), torch.bfloat16, device, generator) for n in (24, 8, 8)]
    shards = NF4Shards([nf4_quantize(p, 64, compress_statistics=nested) for p in parts])
    assert shards.shape == (40, 64)
    whole = nf4_dequantize(shards)
    assert torch.equal(whole, torch.cat([nf4_dequantize(p, s) for p, s in shards.shards]))
    assert torch.equal(nf4_dequantize(list(shards.shards)), whole)
    x = torch.randn(3, 64, generator=generator).to(device, torch.bfloat16)
    a = torch.randn(4, 64, generator=generator).to(device, torch.bfloat16)
    b = torch.randn(40, 4, generator=generator).to(device, torch.bfloat16)
    y = nf4_lora_linear(x, shards, None, a, b, 0.5)
    truth = nf4_lora_linear_reference(x.double(), whole.double(), a.double(), b.double(), 0.5)
    assert (y.double() - truth).abs().max() <= 0.02 * truth.abs().max()


def _lora_case(m, n, k, r, dtype, device, generator, nested=True, bias=True, batch=()):
    w = _weight((n, k), torch.bfloat16, device, generator)
    packed, state = nf4_quantize(w, 64, compress_statistics=nested)
    make = lambda *s: (torch.randn(*s, generator=generator) * 0.5).to(device, dtype)  # noqa: E731
    return packed, state, make(*batch, m, k), make(r, k), make(n, r), (make(n) if bias else None)


# (M, N, K, r): K < N folds the LoRA term into K, K >= N adds it in the GEMM epilogue; M <= 16 is the fused path.
LORA_SHAPES = [(1, 96, 64, 8), (5, 64, 96, 4), (16, 160, 64, 16), (17, 64, 160, 8), (70, 96, 64, 4), (33, 64, 96, 1)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("shape", LORA_SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_lora_linear_forward_and_backward_match_float64(device, dtype, shape, bias, generator):
    m, n, k, r = shape
    packed, state, x, a, b, bias_t = _lora_case(m, n, k, r, dtype, device, generator, bias=bias, batch=(2,))
    w64 = nf4_dequantize_reference(packed, state)
    leaves = [t.detach().requires_grad_() for t in (x, a, b) + ((bias_t,) if bias else ())]
    ours = nf4_lora_linear(leaves[0], packed, state, leaves[1], leaves[2], 0.75, leaves[3] if bias else None)
    grad_out = torch.randn(ours.shape, generator=generator).to(device, dtype)
    ours_grads = torch.autograd.grad(ours, leaves, grad_out)

    def run(cast, weight):
        ls = [t.detach().to(cast).requires_grad_() for t in leaves]
        y = nf4_lora_linear_reference(ls[0], weight.to(cast), ls[1], ls[2], 0.75, ls[3] if bias else None)
        return y, torch.autograd.grad(y, ls, grad_out.to(cast))

    truth, truth_grads = run(torch.float64, w64)
    naive, naive_grads = run(dtype, w64)  # plain PyTorch in the same dtype: the error budget
    seed = f"seed {generator.initial_seed()}"
    eps = torch.finfo(dtype).eps
    for got, same, want, name in zip((ours,) + ours_grads, (naive,) + naive_grads, (truth,) + truth_grads,
                                     ("y", "dx", "dA", "dB", "dbias")):
        assert got.shape == want.shape, name
        err = (got.double() - want).abs().max()
        budget = 2 * (same.double() - want).abs().max() + 4 * eps * want.abs().max()
        assert err <= budget, f"{name}: error {err:.3g} > {budget:.3g} ({seed})"


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("shape", [(2, 40, 32, 2), (2, 32, 40, 2)])  # K < N and K >= N
def test_lora_linear_gradcheck_float64(nested, shape, generator):
    m, n, k, r = shape
    packed, state, x, a, b, bias = _lora_case(m, n, k, r, torch.float64, "cpu", generator, nested=nested)
    inputs = [t.requires_grad_() for t in (x, a, b, bias)]
    fn = lambda *t: nf4_lora_linear(t[0], packed, state, t[1], t[2], 0.5, t[3])  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)
    assert torch.autograd.gradcheck(lambda x: fn(x, *inputs[1:]), inputs[:1])  # full Jacobian w.r.t. x: through the frozen NF4 weight
    # The backward honours grad_output (gradgradcheck is not defined: the backward op has no autograd).
    y = nf4_lora_linear(inputs[0], packed, state, inputs[1], inputs[2], 0.5, inputs[3])
    g1 = torch.autograd.grad(y, inputs, torch.ones_like(y), retain_graph=True)
    g3 = torch.autograd.grad(y, inputs, 3 * torch.ones_like(y))
    for one, three in zip(g1, g3):
        assert torch.allclose(3 * one, three)


def _op_inputs(packed, state):
    return ([packed.reshape(-1)], [state.absmax_q if state.nested else state.absmax],
            [state.nested_absmax] if state.nested else [], [state.nested_code] if state.nested else [],
            [state.offset if state.nested else 0.0], [state.shape[0]])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nested", [False, True])
def test_opcheck_every_nf4_op(device, nested, generator):
    packed, state, x, a, b, bias = _lora_case(4, 48, 64, 4, torch.float32, device, generator, nested=nested)
    lists = _op_inputs(packed, state)
    ops = torch.ops.fusedrl
    torch.library.opcheck(ops.nf4_quantize.default, (x, 64))
    torch.library.opcheck(ops.blockwise8_quantize.default, (x.reshape(-1), dynamic_map().to(device), 256))
    torch.library.opcheck(ops.nf4_dequantize.default, (*lists[:5], lists[5], 64, 64, torch.bfloat16))
    torch.library.opcheck(ops.nf4_lora_linear.default,
                          (x.requires_grad_(), *lists, 64, a.requires_grad_(), b.requires_grad_(), 0.5, bias))
    grad = torch.randn(4, 48, generator=generator).to(device)
    torch.library.opcheck(ops.nf4_lora_linear_backward.default,
                          (grad, x.detach(), *lists, 64, a.detach(), b.detach(), 0.5, [True, True, True]))


@pytest.mark.parametrize("device", DEVICES)
def test_lora_linear_compiles_with_fullgraph(device, generator):
    packed, state, x, a, b, bias = _lora_case(6, 64, 96, 4, torch.float32, device, generator)
    a.requires_grad_()
    fn = torch.compile(lambda x, a: nf4_lora_linear(x, packed, state, a, b, 2.0, bias), fullgraph=True)
    y = fn(x, a)
    eager = nf4_lora_linear(x, packed, state, a, b, 2.0, bias)
    assert torch.allclose(y, eager, rtol=1e-5, atol=1e-5)
    (ga,) = torch.autograd.grad(y.sum(), [a])
    (ga_eager,) = torch.autograd.grad(eager.sum(), [a])
    assert torch.allclose(ga, ga_eager, rtol=1e-5, atol=1e-4)


def test_lora_linear_under_autocast_runs_in_the_autocast_dtype(generator):
    """As peft's LoRA under autocast: x, the float32 adapters and the bias are cast to the autocast dtype on the way
    in (every product runs in bf16), and the adapters' gradients come back through the cast, in float32."""
    packed, state, x, a, b, bias = _lora_case(3, 48, 64, 4, torch.float32, "cpu", generator)
    a, b = a.detach().requires_grad_(), b.detach().requires_grad_()
    g = torch.randn(3, 48, generator=generator).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = nf4_lora_linear(x, packed, state, a, b, 1.0, bias)
    assert y.dtype == torch.bfloat16
    grads = torch.autograd.grad(y, [a, b], g)
    a_cast, b_cast = a.detach().bfloat16().requires_grad_(), b.detach().bfloat16().requires_grad_()
    expected = nf4_lora_linear(x.bfloat16(), packed, state, a_cast, b_cast, 1.0, bias.bfloat16())
    assert torch.equal(y, expected)
    expected_grads = torch.autograd.grad(expected, [a_cast, b_cast], g)
    for grad, ref in zip(grads, expected_grads):
        assert grad.dtype == torch.float32
        assert torch.equal(grad, ref.float())


def test_lora_linear_matches_bitsandbytes_matmul_4bit_plus_lora(generator):
    bnb = pytest.importorskip("bitsandbytes")
    F = pytest.importorskip("bitsandbytes.functional")
    w = _weight((96, 64), torch.bfloat16, "cpu", generator)
    ref_packed, ref_state = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    packed, state = nf4_quantize(w, 64)
    x = torch.randn(9, 64, generator=generator).to(torch.bfloat16).requires_grad_()
    a = (torch.randn(8, 64, generator=generator) * 0.1).requires_grad_()  # peft keeps adapters in float32
    b = (torch.randn(96, 8, generator=generator) * 0.1).requires_grad_()
    theirs = bnb.matmul_4bit(x, ref_packed.t(), quant_state=ref_state)
    theirs = theirs + (((x.float() @ a.t()) @ b.t()) * 2.0).to(theirs.dtype)  # peft's LoRA term, fp32 adapters
    ours = nf4_lora_linear(x, packed, state, a, b, 2.0)
    g = torch.randn(9, 96, generator=generator).to(torch.bfloat16)
    grads_theirs = torch.autograd.grad(theirs, [x, a, b], g)
    grads_ours = torch.autograd.grad(ours, [x, a, b], g)
    scale = theirs.float().abs().max()
    assert (ours.float() - theirs.float()).abs().max() <= 2 * 2**-8 * scale
    for mine, ref in zip(grads_ours, grads_theirs):
        assert (mine.float() - ref.float()).abs().max() <= 2 * 2**-8 * ref.float().abs().max() + 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_name_the_argument(device, generator):
    packed, state, x, a, b, bias = _lora_case(4, 48, 64, 4, torch.float32, device, generator, nested=False)
    ops = torch.ops.fusedrl
    lists = list(_op_inputs(packed, state))
    with pytest.raises(ValueError, match="weight must be float32, float16 or bfloat16"):
        nf4_quantize(x.long(), 64)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        nf4_quantize(x.reshape(-1), 64)
    with pytest.raises(RuntimeError, match="blocksize must be a power of two"):
        ops.nf4_quantize(x, 48)
    with pytest.raises(RuntimeError, match="blocksize must be a power of two"):
        ops.nf4_dequantize(*lists, 64, 100, torch.float32)
    with pytest.raises(RuntimeError, match="packed holds .* bytes"):
        ops.nf4_dequantize(*lists[:5], [47], 64, 64, torch.float32)
    with pytest.raises(RuntimeError, match="packed must be uint8"):
        ops.nf4_dequantize([lists[0][0].float()], *lists[1:], 64, 64, torch.float32)
    with pytest.raises(RuntimeError, match="packed must be contiguous"):
        strided = torch.zeros(lists[0][0].numel() * 2, dtype=torch.uint8, device=device)[::2]
        ops.nf4_dequantize([strided], *lists[1:], 64, 64, torch.float32)
    with pytest.raises(RuntimeError, match="absmax must be float32"):
        ops.nf4_dequantize(lists[0], [lists[1][0].half()], *lists[2:], 64, 64, torch.float32)
    with pytest.raises(RuntimeError, match="dtype must be float32, float16, bfloat16 or float64"):
        ops.nf4_dequantize(*lists, 64, 64, torch.int32)
    with pytest.raises(RuntimeError, match="lora_A must have shape"):
        nf4_lora_linear(x, packed, state, a[:, :10], b, 1.0)
    with pytest.raises(RuntimeError, match="lora_B must have shape"):
        nf4_lora_linear(x, packed, state, a, b[:10], 1.0)
    with pytest.raises(RuntimeError, match="bias must have shape"):
        nf4_lora_linear(x, packed, state, a, b, 1.0, bias[:3])
    with pytest.raises(RuntimeError, match="x must be float32, float16, bfloat16 or float64"):
        nf4_lora_linear(x.int(), packed, state, a, b, 1.0)
    with pytest.raises(ValueError, match="x must have K = 64"):
        nf4_lora_linear(x[:, :10], packed, state, a, b, 1.0)
    with pytest.raises(RuntimeError, match="values must be float32"):
        ops.blockwise8_quantize(x.half(), dynamic_map().to(device), 256)
    with pytest.raises(ValueError, match="either absmax"):
        NF4QuantState(shape=(4, 4), dtype=torch.float32)
    with pytest.raises(TypeError, match="state must be an NF4QuantState"):
        nf4_dequantize(packed, None)
    with pytest.raises(ValueError, match="same K"):
        NF4Shards([nf4_quantize(torch.randn(4, 64), 64), nf4_quantize(torch.randn(4, 32), 64)])


@pytest.mark.cuda
def test_device_mismatch_is_named(generator):
    packed, state, x, a, b, bias = _lora_case(4, 48, 64, 4, torch.float32, "cuda", generator)
    with pytest.raises(RuntimeError, match="lora_A is on cpu"):
        nf4_lora_linear(x, packed, state, a.cpu(), b, 1.0)
    with pytest.raises(RuntimeError, match="packed is on cpu"):
        nf4_lora_linear(x, packed.cpu(), state, a, b, 1.0)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 9, 16])
@pytest.mark.parametrize("nested", [False, True])
def test_small_m_fused_path_matches_float64(dtype, m, nested, generator):
    # N not a multiple of the rows per block, K a multiple of 32 but not of 1024 (the warp's stride).
    packed, state, x, a, b, bias = _lora_case(m, 200, 4128, 16, dtype, "cuda", generator, nested=nested)
    torch.full((m, 200), float("nan"), dtype=dtype, device="cuda")  # poison the allocator's next block
    y = nf4_lora_linear(x, packed, state, a, b, 0.5, bias)
    w64 = nf4_dequantize_reference(packed, state)
    truth = nf4_lora_linear_reference(x.double(), w64, a.double(), b.double(), 0.5, bias.double())
    naive = nf4_lora_linear_reference(x, w64.to(dtype), a, b, 0.5, bias).double()
    err, budget = (y.double() - truth).abs().max(), (naive - truth).abs().max() * 2
    assert not y.isnan().any() and err <= budget + 4 * torch.finfo(dtype).eps * truth.abs().max(), (
        f"{err:.3g} > {budget:.3g} seed {generator.initial_seed()}")
