"""The decode-step ops (rotary_cache_write, decode_attention) against float64 references: odd lengths, left-padded
and empty rows, head dims 64/128 (CUDA) and small odd ones (CPU), GQA ratios 1/4/8, every dtype, explicit and
automatic splits, CUDA-graph replay at moving slots, opcheck, and bad arguments."""

from __future__ import annotations

import math

import pytest
import torch

from fusedrl.ops.decode_attention import decode_attention, decode_attention_supported, rms_norm, rotary_cache_write
from fusedrl.ops.reference import decode_attention_reference as attention_reference
from fusedrl.ops.reference import rms_norm_reference, rope_reference

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
TOLERANCE = {torch.float64: dict(atol=1e-10, rtol=1e-10), torch.float32: dict(atol=2e-5, rtol=2e-5),
             torch.float16: dict(atol=3e-3, rtol=3e-3), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def _dtypes(device):
    return [torch.float64, torch.float32, torch.bfloat16] if device == "cpu" else [torch.float32, torch.float16,
                                                                                    torch.bfloat16]


def _cache(rows, kv_heads, length, head_dim, dtype, device, generator):
    k = torch.randn(rows, kv_heads, length, head_dim, generator=generator, dtype=torch.float64)
    v = torch.randn(rows, kv_heads, length, head_dim, generator=generator, dtype=torch.float64)
    return k.to(device, dtype), v.to(device, dtype)


def _poisoned_alloc(shape, dtype, device):
    """Leaves a NaN block of this size in the CUDA caching allocator, so an output element the kernel never writes
    shows up as NaN (on the CPU fresh memory is not controllable; the reference comparison covers it)."""
    if device != "cpu":
        torch.full(shape, float("nan"), dtype=dtype, device=device)


@pytest.mark.parametrize("device", DEVICES)
# CUDA: 16-bit caches with up to 4 query heads per kv head take the key-group kernel (groups 1, 2, 3 of 4, 4), the
# rest and float32 the tile kernel.
@pytest.mark.parametrize("head_dim,group", [(64, 1), (64, 2), (128, 3), (128, 4), (64, 8), (128, 8), (128, 16)])
@pytest.mark.parametrize("splits", [0, 1, 3])
def test_decode_attention_matches_float64_reference(device, head_dim, group, splits, generator):
    kv_heads, length = 2, 301
    heads = kv_heads * group
    for dtype in _dtypes(device):
        batch = 5
        cache_k, cache_v = _cache(batch + 2, kv_heads, length, head_dim, dtype, device, generator)
        q = torch.randn(batch, heads, head_dim, generator=generator, dtype=torch.float64).to(device, dtype)
        for slot in (0, 36, 130, length - 1):
            # row 0 unpadded, rows 1-3 left-padded by odd amounts, row 4 has nothing to attend when slot < 200
            start = torch.tensor([0, 1, 17, slot, 200, 0, 0], dtype=torch.int32)
            start[3] = min(slot, 40)
            _poisoned_alloc(q.shape, dtype, device)
            scale = 1 / math.sqrt(head_dim)
            out = decode_attention(q, cache_k, cache_v, start.to(device),
                                   torch.tensor([slot], device=device), scale, splits)
            expected = attention_reference(q, cache_k, cache_v, start, slot, scale)
            note = f"dtype {dtype} slot {slot} seed via generator"
            assert out.dtype == dtype and out.shape == q.shape
            assert torch.isfinite(out).all(), note
            torch.testing.assert_close(out.double().cpu(), expected, **TOLERANCE[dtype], msg=note)


def test_decode_attention_cpu_small_odd_head_dims(generator):
    for head_dim, group, kv_heads in ((6, 3, 1), (8, 1, 3), (2, 2, 2)):
        cache_k, cache_v = _cache(3, kv_heads, 13, head_dim, torch.float64, "cpu", generator)
        q = torch.randn(3, kv_heads * group, head_dim, generator=generator, dtype=torch.float64)
        start = torch.tensor([0, 4, 12], dtype=torch.int32)
        out = decode_attention(q, cache_k, cache_v, start, torch.tensor([11]), 0.7)
        torch.testing.assert_close(out, attention_reference(q, cache_k, cache_v, start, 11, 0.7),
                                   **TOLERANCE[torch.float64])
        assert (out[2] == 0).all()  # start 12 > slot 11: nothing to attend, zeros (never NaN)


def _rope_inputs(batch, heads, kv_heads, head_dim, dtype, device, generator):
    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(device, dtype)

    # q and k as views of one projection output row (B, (H + 2 Hkv) D), as the decode loop may pass them
    qkv = rand(batch, (heads + 2 * kv_heads) * head_dim)
    q = qkv[:, : heads * head_dim].view(batch, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(batch, kv_heads, head_dim)
    v = qkv[:, (heads + kv_heads) * head_dim :].view(batch, kv_heads, head_dim)
    angles = torch.rand(batch, head_dim // 2, generator=generator, dtype=torch.float64) * 50
    angles = torch.cat((angles, angles), dim=-1)
    return q, k, v, angles.cos().to(device, dtype), angles.sin().to(device, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("with_norm", [False, True])
def test_rotary_cache_write_matches_float64_reference(device, head_dim, with_norm, generator):
    batch, heads, kv_heads, length, slot = 3, 8, 2, 37, 29
    for dtype in _dtypes(device):
        q, k, v, cos, sin = _rope_inputs(batch, heads, kv_heads, head_dim, dtype, device, generator)
        norms = [torch.rand(head_dim, generator=generator, dtype=torch.float64).add(0.5).to(device, dtype)
                 for _ in range(2)] if with_norm else [None, None]
        cache_k = torch.full((batch + 1, kv_heads, length, head_dim), float("nan"), dtype=dtype, device=device)
        cache_v = cache_k.clone()
        q_out = rotary_cache_write(q, k, v, cos, sin, cache_k, cache_v, torch.tensor([slot], device=device),
                                   q_norm=norms[0], k_norm=norms[1], eps=1e-6)
        note = f"dtype {dtype}"
        # bf16: three roundings of the storage type per element (norm, two products, the sum)
        tolerance = TOLERANCE[dtype] if dtype != torch.bfloat16 else dict(atol=4e-2, rtol=2e-2)
        torch.testing.assert_close(q_out.double().cpu(), rope_reference(q, cos, sin, norms[0]), **tolerance, msg=note)
        torch.testing.assert_close(cache_k[:batch, :, slot].double().cpu(), rope_reference(k, cos, sin, norms[1]),
                                   **tolerance, msg=note)
        assert torch.equal(cache_v[:batch, :, slot], v), note
        untouched = torch.ones(batch + 1, length, dtype=torch.bool)
        untouched[:batch, slot] = False
        assert cache_k.transpose(1, 2)[untouched].isnan().all() and cache_v.transpose(1, 2)[untouched].isnan().all()


@pytest.mark.parametrize("device", DEVICES)
def test_rope_is_bit_identical_to_transformers(device, generator):
    """Without the norm, the kernel rounds where transformers' apply_rotary_pos_emb rounds: identical bits."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    batch, heads, kv_heads, head_dim = 4, 8, 2, 128
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v, cos, sin = _rope_inputs(batch, heads, kv_heads, head_dim, dtype, device, generator)
        cache_k = torch.zeros(batch, kv_heads, 5, head_dim, dtype=dtype, device=device)
        cache_v = cache_k.clone()
        q_out = rotary_cache_write(q, k, v, cos, sin, cache_k, cache_v, torch.tensor([3], device=device))
        q_hf, k_hf = apply_rotary_pos_emb(q[:, :, None], k[:, :, None], cos[:, None], sin[:, None], unsqueeze_dim=1)
        assert torch.equal(q_out, q_hf[:, :, 0]), dtype
        assert torch.equal(cache_k[:, :, 3], k_hf[:, :, 0]), dtype


@pytest.mark.cuda
def test_cuda_graph_replays_at_moving_slots(generator):
    """Both ops captured once with the slot in device memory, replayed at other slots: same as eager / reference."""
    batch, kv_heads, group, head_dim, length = 3, 2, 4, 128, 200
    heads = kv_heads * group
    dtype, device = torch.bfloat16, "cuda"
    q, k, v, cos, sin = _rope_inputs(batch, heads, kv_heads, head_dim, dtype, device, generator)
    cache_k, cache_v = _cache(batch, kv_heads, length, head_dim, dtype, device, generator)
    start = torch.tensor([0, 5, 60], dtype=torch.int32, device=device)
    slot = torch.tensor([10], device=device)
    scale = head_dim ** -0.5

    def step():
        q_rot = rotary_cache_write(q, k, v, cos, sin, cache_k, cache_v, slot)
        return q_rot, decode_attention(q_rot, cache_k, cache_v, start, slot, scale)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q_rot, out = step()
    for position in (11, 64, 150, length - 1):
        slot.fill_(position)
        graph.replay()
        torch.cuda.synchronize()
        expected = attention_reference(q_rot, cache_k, cache_v, start.cpu(), position, scale)
        torch.testing.assert_close(out.double().cpu(), expected, **TOLERANCE[dtype], msg=f"slot {position}")
        assert torch.equal(cache_v[:, :, position], v)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_both_ops(device, generator):
    dtype = torch.float32
    q, k, v, cos, sin = _rope_inputs(2, 4, 2, 64, dtype, device, generator)
    cache_k, cache_v = _cache(2, 2, 9, 64, dtype, device, generator)
    slot = torch.tensor([4], device=device)
    norm = torch.ones(64, dtype=dtype, device=device)
    torch.library.opcheck(torch.ops.fusedrl.rotary_cache_write.default,
                          (q.contiguous(), k.contiguous(), v.contiguous(), cos, sin, norm, norm, 1e-6, cache_k,
                           cache_v, slot))
    start = torch.tensor([0, 3], dtype=torch.int32, device=device)
    torch.library.opcheck(torch.ops.fusedrl.decode_attention.default,
                          (q.contiguous(), cache_k, cache_v, start, slot, 0.125, 2))
    torch.library.opcheck(torch.ops.fusedrl.rms_norm.default, (q.reshape(2, -1), norm.repeat(4), 1e-6))


@pytest.mark.parametrize("device", DEVICES)
# CUDA: 4096/640/12288 wide rows take the 16-byte vector kernel (1, 1 and 6-8 loads per thread), 37 and 16392 (more
# than 8 loads per thread in bf16) the scalar one.
@pytest.mark.parametrize("shape", [(1, 4096), (5, 37), (3, 2, 640), (2, 12288), (1, 16392)])
def test_rms_norm_matches_float64_reference_and_transformers(device, shape, generator):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    for dtype in _dtypes(device):
        x = (torch.randn(*shape, generator=generator, dtype=torch.float64) * 3).to(device, dtype)
        weight = torch.rand(shape[-1], generator=generator, dtype=torch.float64).add(0.5).to(device, dtype)
        _poisoned_alloc(x.shape, dtype, device)
        out = rms_norm(x, weight, 1e-5)
        assert out.shape == x.shape and out.dtype == dtype and torch.isfinite(out).all()
        tolerance = TOLERANCE[dtype] if dtype != torch.bfloat16 else dict(atol=4e-2, rtol=2e-2)  # two roundings
        torch.testing.assert_close(out.double().cpu(), rms_norm_reference(x, weight, 1e-5), **tolerance)
        if dtype != torch.float64:  # transformers' module rounds where the kernel rounds (sums in another order)
            module = LlamaRMSNorm(shape[-1], eps=1e-5).to(device, dtype)
            module.weight.data.copy_(weight)
            with torch.no_grad():
                expected = module(x)
            if dtype in (torch.float16, torch.bfloat16):  # identical bits but for sums rounding differently
                assert (out == expected).float().mean() >= 0.99, dtype
            torch.testing.assert_close(out, expected, **tolerance)
    strided = torch.randn(6, 2 * shape[-1], generator=generator).to(device)[:, : shape[-1]]  # rows with a stride
    weight = torch.ones(shape[-1], device=device)
    torch.testing.assert_close(rms_norm(strided, weight, 1e-6).double().cpu(),
                               rms_norm_reference(strided, weight, 1e-6), **TOLERANCE[torch.float32])


def test_supported_shapes():
    assert decode_attention_supported("cpu", torch.float64, 6, 3)
    assert not decode_attention_supported("cpu", torch.float32, 7, 1)
    assert decode_attention_supported("cuda", torch.bfloat16, 128, 8)
    assert not decode_attention_supported("cuda", torch.bfloat16, 96, 8)
    assert not decode_attention_supported("cuda", torch.float64, 128, 8)
    assert not decode_attention_supported("cuda", torch.bfloat16, 128, 32)


# ---- bad arguments -------------------------------------------------------------------------------------------------
@pytest.mark.errors
@pytest.mark.parametrize("device", DEVICES)
def test_decode_attention_bad_arguments(device):
    q = torch.zeros(2, 4, 64, device=device)
    cache = torch.zeros(2, 2, 9, 64, device=device)
    start = torch.zeros(2, dtype=torch.int32, device=device)
    slot = torch.tensor([3], device=device)
    with pytest.raises(RuntimeError, match="q must be float32"):
        decode_attention(q.int(), cache, cache, start, slot, 1.0)
    with pytest.raises(RuntimeError, match="multiple of the cache's kv heads"):
        decode_attention(torch.zeros(2, 3, 64, device=device), cache, cache, start, slot, 1.0)
    with pytest.raises(RuntimeError, match="start must be a contiguous int32"):
        decode_attention(q, cache, cache, start.long(), slot, 1.0)
    with pytest.raises(RuntimeError, match="slot must be one int64"):
        decode_attention(q, cache, cache, start, slot.int(), 1.0)
    with pytest.raises(RuntimeError, match="cache_v must have cache_k's shape"):
        decode_attention(q, cache, cache[:, :, :8], start, slot, 1.0)
    with pytest.raises(RuntimeError, match="cache_k must have q's dtype"):
        decode_attention(q, cache.double(), cache, start, slot, 1.0)
    with pytest.raises(RuntimeError, match="scale must be finite"):
        decode_attention(q, cache, cache, start, slot, float("nan"))
    if device == "cpu":
        with pytest.raises(RuntimeError, match=r"slot must be in \[0, 9\)"):
            decode_attention(q, cache, cache, start, torch.tensor([9]), 1.0)
    else:
        with pytest.raises(RuntimeError, match="start is on"):
            decode_attention(q, cache, cache, start.cpu(), slot, 1.0)
        with pytest.raises(RuntimeError, match="head dimension 64 or 128"):
            odd = torch.zeros(2, 2, 9, 32, device=device)
            decode_attention(torch.zeros(2, 4, 32, device=device), odd, odd, start, slot, 1.0)


@pytest.mark.errors
@pytest.mark.parametrize("device", DEVICES)
def test_rotary_cache_write_bad_arguments(device):
    q, k = torch.zeros(2, 4, 8, device=device), torch.zeros(2, 2, 8, device=device)
    cos = torch.zeros(2, 8, device=device)
    cache = torch.zeros(2, 2, 5, 8, device=device)
    slot = torch.tensor([1], device=device)
    with pytest.raises(RuntimeError, match="head dimension must be even"):
        rotary_cache_write(q[..., :7], k[..., :7], k[..., :7], cos[:, :7], cos[:, :7], cache, cache, slot)
    with pytest.raises(RuntimeError, match="must be a multiple of k's heads"):
        rotary_cache_write(q[:, :3], k, k, cos, cos, cache, cache, slot)
    with pytest.raises(RuntimeError, match="cos must be contiguous of shape"):
        rotary_cache_write(q, k, k, cos[:1], cos, cache, cache, slot)
    with pytest.raises(RuntimeError, match="give both q_norm and k_norm"):
        rotary_cache_write(q, k, k, cos, cos, cache, cache, slot, q_norm=torch.ones(8, device=device))
    with pytest.raises(RuntimeError, match="q_norm must be a contiguous"):
        rotary_cache_write(q, k, k, cos, cos, cache, cache, slot, q_norm=torch.ones(7, device=device),
                           k_norm=torch.ones(7, device=device))
    with pytest.raises(RuntimeError, match="cache_k must have shape"):
        rotary_cache_write(q, k, k, cos, cos, cache[:, :1], cache, slot)
    with pytest.raises(RuntimeError, match="v must have k's shape"):
        rotary_cache_write(q, k, k[:, :1], cos, cos, cache, cache, slot)
    if device == "cpu":
        with pytest.raises(RuntimeError, match=r"slot must be in \[0, 5\)"):
            rotary_cache_write(q, k, k, cos, cos, cache, cache, torch.tensor([-1]))
    else:
        with pytest.raises(RuntimeError, match="float64 runs on the CPU only"):
            rotary_cache_write(q.double(), k.double(), k.double(), cos.double(), cos.double(), cache.double(),
                               cache.double(), slot)


@pytest.mark.errors
@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_bad_arguments(device):
    x, weight = torch.zeros(3, 8, device=device), torch.ones(8, device=device)
    with pytest.raises(RuntimeError, match="x must have shape"):
        torch.ops.fusedrl.rms_norm(x.t(), weight, 1e-6)
    with pytest.raises(RuntimeError, match=r"weight must be a contiguous \(N,\)"):
        torch.ops.fusedrl.rms_norm(x, weight[:7], 1e-6)
    with pytest.raises(RuntimeError, match="weight must have x's dtype"):
        torch.ops.fusedrl.rms_norm(x, weight.double(), 1e-6)
    with pytest.raises(RuntimeError, match="eps must be finite"):
        torch.ops.fusedrl.rms_norm(x, weight, -1.0)
