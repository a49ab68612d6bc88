"""Offloaded checkpointing and the token-chunked MLP: the same gradients as plain checkpointing, no stale state
after an interrupted backward, the CPU no-op, and the offload ops' argument errors (CPU and CUDA)."""

from __future__ import annotations

import pytest
import torch
import transformers

from fusedrl.nn.chunked_mlp import chunk_mlp, unchunk_mlp
from fusedrl.nn.offload import OffloadedCheckpointing
from fusedrl.ops import offload as offload_ops


def _tiny_llama(dtype: torch.dtype, layers: int = 3, hidden: int = 32, seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=61, hidden_size=hidden, intermediate_size=48, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return transformers.LlamaForCausalLM(config).to(dtype).train()


def _lora(model: torch.nn.Module, seed: int = 5) -> torch.nn.Module:
    peft = pytest.importorskip("peft")
    torch.manual_seed(seed)  # the adapters' random init, the same for every model built here
    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False, target_modules=modules)
    return peft.get_peft_model(model, config)


def _grads(model: torch.nn.Module, input_ids: torch.Tensor, grad_seed: int = 1) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    hidden = model.get_base_model().model(input_ids=input_ids).last_hidden_state if hasattr(model, "get_base_model") \
        else model.model(input_ids=input_ids).last_hidden_state
    weight = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(grad_seed))
    weight = weight.to(hidden.device, hidden.dtype)
    (hidden * weight).sum().backward()  # a non-uniform upstream gradient
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _input_ids(batch: int = 2, length: int = 13, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, 61, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("use_lora", [False, True])
def test_offload_checkpointing_matches_torch_checkpointing_bitwise_on_cpu(use_lora):
    ids = _input_ids()
    reference = _tiny_llama(torch.float32)
    candidate = _tiny_llama(torch.float32)
    if use_lora:
        reference, candidate = _lora(reference), _lora(candidate)
    reference.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    runner = OffloadedCheckpointing.install(candidate, offload=True)
    expected, got = _grads(reference, ids), _grads(candidate, ids)
    assert expected.keys() == got.keys() and expected
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert runner.arena is None  # CPU: nothing offloaded, no arena created


def test_chunked_mlp_matches_unchunked_in_float64():
    ids = _input_ids(batch=3, length=11)
    reference = _lora(_tiny_llama(torch.float64))
    candidate = _lora(_tiny_llama(torch.float64))
    OffloadedCheckpointing.install(candidate, offload=True, mlp_chunk_tokens=7)  # 33 tokens: 5 chunks, the last short
    expected, got = _grads(reference, ids), _grads(candidate, ids)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-12, atol=1e-13, msg=name)


def test_chunked_mlp_module_forward_and_gradcheck():
    torch.manual_seed(0)
    mlp = transformers.models.llama.modeling_llama.LlamaMLP(
        transformers.LlamaConfig(hidden_size=6, intermediate_size=10, num_attention_heads=2, num_key_value_heads=1,
                                 hidden_act="silu")).double()
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    expected = mlp(x)
    chunk_mlp(mlp, 3)
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), expected.detach(), rtol=1e-14, atol=1e-15)  # no-grad chunked path
    torch.testing.assert_close(mlp(x), expected, rtol=1e-14, atol=1e-15)  # autograd chunked path
    assert torch.autograd.gradcheck(lambda t: mlp(t), (x,))
    keys = set(mlp.state_dict())
    unchunk_mlp(mlp)
    assert set(mlp.state_dict()) == keys and "forward" not in mlp.__dict__


def test_interrupted_backward_leaves_no_stale_state_and_next_step_is_correct():
    ids = _input_ids()
    model = _lora(_tiny_llama(torch.float32, layers=4))
    reference = _lora(_tiny_llama(torch.float32, layers=4))
    OffloadedCheckpointing.install(reference, offload=True, mlp_chunk_tokens=5)  # never interrupted
    runner = OffloadedCheckpointing.install(model, offload=True, mlp_chunk_tokens=5)

    class Boom(RuntimeError):
        pass

    layer = runner.layers[1]

    def explode(module, grad_input, grad_output):
        raise Boom("mid-backward")

    handle = layer.self_attn.o_proj.register_full_backward_hook(explode)
    hidden = model.get_base_model().model(input_ids=ids).last_hidden_state
    with pytest.raises(Boom):
        hidden.sum().backward()
    handle.remove()
    runner.reset()
    assert runner._last_saved is None and not runner._loaded_in_pass
    got, expected = _grads(model, ids), _grads(reference, ids)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def test_no_grad_pass_is_not_checkpointed():
    model = _tiny_llama(torch.float32)
    runner = OffloadedCheckpointing.install(model, offload=True)
    with torch.no_grad():
        model.model(input_ids=_input_ids())
    assert runner._last_saved is None


def test_dropout_is_refused():
    model = _tiny_llama(torch.float32)
    model.config.attention_dropout = 0.1
    with pytest.raises(ValueError, match="dropout must be off"):
        OffloadedCheckpointing.install(model)


def test_cpu_offload_op_is_a_no_op():
    arena = offload_ops.new_arena("cpu")
    x = torch.randn(4, 5)
    before = x.clone()
    assert offload_ops.offload_to_host(arena, x) == offload_ops.NOT_OFFLOADED
    assert torch.equal(x, before)
    assert arena.reserve(1 << 20) is False and "no-op" in arena.fallback_reason()
    assert arena.capacity() == 0 and arena.live_entries() == 0 and arena.slot_owner(0) == -1


@pytest.mark.errors
def test_offload_ops_reject_bad_handles_and_arguments():
    arena = offload_ops.new_arena("cpu")
    with pytest.raises(ValueError, match="handle must be >= 0"):
        offload_ops.prefetch_to_device(arena, -1)
    with pytest.raises(ValueError, match="belongs to pass"):
        offload_ops.fetch_to_device(arena, 5)
    with pytest.raises(ValueError, match="belongs to pass"):
        offload_ops.release_offloaded(arena, (7 << 32) | 3)
    with pytest.raises(ValueError, match="slot must be in"):
        arena.slot_owner(2)
    with pytest.raises(ValueError, match="bytes must be >= 0"):
        arena.reserve(-5)
    with pytest.raises(ValueError, match="device must be"):
        offload_ops.new_arena("meta")
    with pytest.raises(ValueError, match="chunk_tokens must be an int >= 1"):
        chunk_mlp(torch.nn.Linear(2, 2), 0)


@pytest.mark.cuda
@pytest.mark.errors
def test_offload_ops_reject_bad_cuda_inputs():
    arena = offload_ops.new_arena("cuda")
    assert arena.reserve(1 << 20)
    with pytest.raises(ValueError, match="contiguous"):
        offload_ops.offload_to_host(arena, torch.randn(64, 64, device="cuda").t())
    with pytest.raises(ValueError, match="CPU arena"):
        offload_ops.offload_to_host(offload_ops.new_arena("cpu"), torch.randn(8, device="cuda"))
    handle = offload_ops.offload_to_host(arena, torch.randn(1000, device="cuda"))
    assert handle >= 0
    with pytest.raises(ValueError, match="still live"):
        arena.reserve(2 << 20)
    offload_ops.release_offloaded(arena, handle)
    with pytest.raises(ValueError, match="belongs to pass|already released"):
        offload_ops.release_offloaded(arena, handle)
    assert offload_ops.offload_to_host(arena, torch.randn(1 << 20, device="cuda")) == offload_ops.NOT_OFFLOADED  # full


# ---------------------------------------------------------------------------------------------------------------
# CUDA: the copies themselves
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.cuda
def test_cuda_round_trip_prefetch_eviction_and_busy_slots():
    generator = torch.Generator(device="cuda").manual_seed(11)
    shapes = [(3, 1000), (7, 129), (1, 5000), (2, 333)]  # byte sizes that are no multiple of the alignment
    tensors = [torch.randn(s, device="cuda", dtype=torch.bfloat16, generator=generator) for s in shapes]
    expected = [t.clone() for t in tensors]
    arena = offload_ops.new_arena("cuda")
    assert arena.reserve(sum(t.nbytes + 256 for t in tensors))
    handles = [offload_ops.offload_to_host(arena, t) for t in tensors]
    assert all(h >= 0 for h in handles) and arena.live_entries() == 4
    for t in tensors:
        t.fill_(float("nan"))  # the host copy was queued before this, so it must hold the old values
    del tensors
    offload_ops.prefetch_to_device(arena, handles[3])
    offload_ops.prefetch_to_device(arena, handles[2])  # both slots now prefetched, none fetched
    first = offload_ops.fetch_to_device(arena, handles[0])  # takes back a prefetched slot (eviction)
    second = offload_ops.fetch_to_device(arena, handles[1])  # the other one
    third = offload_ops.fetch_to_device(arena, handles[2])  # both slots in use: a buffer of its own
    for got, want in zip((first, second, third), expected[:3]):
        assert torch.equal(got, want)
    for handle in handles[:3]:
        offload_ops.release_offloaded(arena, handle)
    assert torch.equal(offload_ops.fetch_to_device(arena, handles[3]), expected[3])
    offload_ops.release_offloaded(arena, handles[3])
    assert arena.live_entries() == 0 and arena.used() == 0


@pytest.mark.cuda
@pytest.mark.parametrize("chunk", [None, 40])
def test_cuda_offloaded_gradients_match_plain_checkpointing(chunk):
    ids = _input_ids(batch=2, length=97).cuda()
    reference = _lora(_tiny_llama(torch.bfloat16, layers=4, hidden=64)).cuda()
    candidate = _lora(_tiny_llama(torch.bfloat16, layers=4, hidden=64)).cuda()
    reference.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    runner = OffloadedCheckpointing.install(candidate, offload=True, mlp_chunk_tokens=chunk, min_offload_bytes=0)
    for _ in range(2):  # the second step reuses the pinned arena
        expected, got = _grads(reference, ids), _grads(candidate, ids)
        assert runner.pinned_bytes() > 0 and runner.arena.live_entries() == 0
        for name in expected:
            if chunk is None:
                assert torch.equal(got[name], expected[name]), name
            else:  # chunk sums in bf16: within bf16 rounding of the gradient's scale
                scale = expected[name].float().abs().max().item()
                torch.testing.assert_close(got[name].float(), expected[name].float(), rtol=0.02, atol=0.02 * scale,
                                           msg=name)


@pytest.mark.cuda
def test_cuda_interrupted_backward_then_correct_step():
    ids = _input_ids(batch=2, length=65).cuda()
    model = _lora(_tiny_llama(torch.bfloat16, layers=5, hidden=64)).cuda()
    reference = _lora(_tiny_llama(torch.bfloat16, layers=5, hidden=64)).cuda()
    OffloadedCheckpointing.install(reference, offload=True, min_offload_bytes=0)
    runner = OffloadedCheckpointing.install(model, offload=True, min_offload_bytes=0)

    def explode(module, grad_input, grad_output):
        raise RuntimeError("mid-backward")

    handle = runner.layers[2].mlp.down_proj.register_full_backward_hook(explode)
    hidden = model.get_base_model().model(input_ids=ids).last_hidden_state
    with pytest.raises(RuntimeError, match="mid-backward"):
        hidden.float().sum().backward()
    handle.remove()
    assert runner.arena.live_entries() > 0  # layers 0..1 never came back
    runner.reset()
    assert runner.arena.live_entries() == 0 and runner.arena.slot_owner(0) == -1 and runner.arena.slot_owner(1) == -1
    got, expected = _grads(model, ids), _grads(reference, ids)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


class _RecordingArena:
    """A CPU stand-in for the CUDA arena: offloads by cloning, and records the order of every call."""

    def __init__(self):
        self.stored: dict[int, torch.Tensor] = {}
        self.events: list[tuple[str, int]] = []
        self.next_handle = 0
        self.reserved = 0

    def reserve(self, nbytes):
        self.reserved = nbytes
        return True

    def capacity(self):
        return self.reserved

    def live_entries(self):
        return len(self.stored)

    def reset(self):
        self.events.append(("reset", -1))
        self.stored.clear()

    def fallback_reason(self):
        return ""


def _recording_ops(arena: _RecordingArena):
    def offload_to_host(_, tensor):
        arena.next_handle += 1
        arena.stored[arena.next_handle] = tensor.clone()
        arena.events.append(("offload", arena.next_handle))
        return arena.next_handle

    def prefetch_to_device(_, handle):
        arena.events.append(("prefetch", handle))

    def fetch_to_device(_, handle):
        arena.events.append(("fetch", handle))
        return arena.stored[handle]

    def release_offloaded(_, handle):
        arena.events.append(("release", handle))
        del arena.stored[handle]

    return type("RecordingOps", (), dict(NOT_OFFLOADED=-1, offload_to_host=staticmethod(offload_to_host),
                                         prefetch_to_device=staticmethod(prefetch_to_device),
                                         fetch_to_device=staticmethod(fetch_to_device),
                                         release_offloaded=staticmethod(release_offloaded)))


def _use_recording_arena(monkeypatch, arena: _RecordingArena) -> None:
    import fusedrl.nn.offload as offload_module

    def arena_for(self, device):
        self._arena = arena if self.offload else None
        return self._arena

    monkeypatch.setattr(offload_module, "offload_ops", _recording_ops(arena))
    monkeypatch.setattr(OffloadedCheckpointing, "_arena_for", arena_for)


def test_offload_sequence_with_a_recording_arena(monkeypatch):
    """The wrapper's order of operations, on CPU: every layer but the last offloaded in forward order; in backward
    each layer fetches its own input, then prefetches the previous layer's, then releases; same gradients."""
    arena = _RecordingArena()
    _use_recording_arena(monkeypatch, arena)
    ids = _input_ids()
    reference = _lora(_tiny_llama(torch.float32, layers=4))
    reference.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    candidate = _lora(_tiny_llama(torch.float32, layers=4))
    OffloadedCheckpointing.install(candidate, offload=True, min_offload_bytes=0)
    expected, got = _grads(reference, ids), _grads(candidate, ids)
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert arena.events == [
        ("offload", 1), ("offload", 2), ("offload", 3),  # layers 0..2; layer 3 (the last) stays on the device
        ("prefetch", 3),  # layer 3's backward starts: layer 2's input comes back meanwhile
        ("fetch", 3), ("prefetch", 2), ("release", 3),
        ("fetch", 2), ("prefetch", 1), ("release", 2),
        ("fetch", 1), ("release", 1),
    ]
    assert arena.reserved == 3 * ((2 * 13 * 32 * 4 + 255) // 256 * 256)


def test_interrupted_backward_with_a_recording_arena_resets_on_the_next_forward(monkeypatch):
    arena = _RecordingArena()
    _use_recording_arena(monkeypatch, arena)
    ids = _input_ids()
    model = _lora(_tiny_llama(torch.float32, layers=4))
    runner = OffloadedCheckpointing.install(model, offload=True, min_offload_bytes=0)
    reference = _lora(_tiny_llama(torch.float32, layers=4))
    reference.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def explode(module, grad_input, grad_output):
        raise RuntimeError("mid-backward")

    hook = runner.layers[2].mlp.down_proj.register_full_backward_hook(explode)
    hidden = model.get_base_model().model(input_ids=ids).last_hidden_state
    with pytest.raises(RuntimeError, match="mid-backward"):
        hidden.sum().backward()
    hook.remove()
    assert sorted(arena.stored) == [1, 2]  # layers 0 and 1 never came back; layer 2 released in its finally
    got, expected = _grads(model, ids), _grads(reference, ids)  # no explicit reset: the next forward does it
    assert ("reset", -1) in arena.events and not arena.stored
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def test_reinstalling_hands_the_pinned_arena_to_the_new_runner(monkeypatch):
    """A second trainer on the same model installs a new runner: it takes over the arena (no second pinning)."""
    arena = _RecordingArena()
    _use_recording_arena(monkeypatch, arena)
    model = _lora(_tiny_llama(torch.float32, layers=3))
    first = OffloadedCheckpointing.install(model, offload=True, min_offload_bytes=0)
    _grads(model, _input_ids())
    assert first.arena is arena
    second = OffloadedCheckpointing.install(model, offload=True, min_offload_bytes=0)
    assert second.arena is arena and first.arena is None and model.fusedrl_checkpointing is second
    assert arena.events[-1] == ("reset", -1)
