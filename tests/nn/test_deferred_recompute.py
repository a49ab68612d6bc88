"""The bounded per-layer working set of fusedrl.nn.offload: the chunked MLP's output deferred to its backward during
a layer's recompute, token-chunked norms, peft's no-op input casts skipped under autocast, and the graph check that
decides when deferring is allowed (fusedrl.nn.recompute_graph)."""

from __future__ import annotations

import pytest
import torch
import transformers

from fusedrl.nn.chunked_mlp import chunk_mlp, chunk_norm, deferred_outputs, unchunk_mlp
from fusedrl.nn.offload import OffloadedCheckpointing
from fusedrl.nn.recompute_graph import only_value_free_ops_above


def _tiny_llama(dtype: torch.dtype, layers: int = 3, hidden: int = 32, seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=61, hidden_size=hidden, intermediate_size=48, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return transformers.LlamaForCausalLM(config).to(dtype).train()


def _lora(model: torch.nn.Module, seed: int = 5, **config) -> torch.nn.Module:
    peft = pytest.importorskip("peft")
    torch.manual_seed(seed)
    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False, target_modules=modules)
    return peft.get_peft_model(model, lora, **config)


def _decoder(model: torch.nn.Module) -> torch.nn.Module:
    return model.get_base_model().model if hasattr(model, "get_base_model") else model.model


def _grads(model: torch.nn.Module, ids: torch.Tensor, autocast: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        hidden = _decoder(model)(input_ids=ids).last_hidden_state
    weight = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(1)).to(hidden.dtype)
    (hidden * weight).sum().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _ids(batch: int = 3, length: int = 11, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, 61, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("offload", [True, False])
def test_deferred_mlp_and_chunked_norms_match_unchunked_in_float64(offload):
    ids = _ids()
    reference = _lora(_tiny_llama(torch.float64))
    reference.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    candidate = _lora(_tiny_llama(torch.float64))
    runner = OffloadedCheckpointing.install(candidate, offload=offload, mlp_chunk_tokens=7)  # 33 tokens: 5 chunks
    assert all(hasattr(layer.input_layernorm, "fusedrl_chunk_tokens") for layer in runner.layers)
    expected, got = _grads(reference, ids), _grads(candidate, ids)
    assert expected.keys() == got.keys() and expected
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-12, atol=1e-13, msg=name)
    assert runner._deferrable == {0: True, 1: True, 2: True}  # every layer's MLP was deferred


def test_without_deferral_the_same_gradients_and_no_verdicts():
    ids = _ids()
    deferred = _lora(_tiny_llama(torch.float64))
    eager = _lora(_tiny_llama(torch.float64))
    OffloadedCheckpointing.install(deferred, offload=True, mlp_chunk_tokens=7)
    runner = OffloadedCheckpointing.install(eager, offload=True, mlp_chunk_tokens=7, defer_mlp=False)
    expected, got = _grads(deferred, ids), _grads(eager, ids)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-12, atol=1e-13, msg=name)
    assert runner._deferrable == {}


def test_mlp_output_read_by_more_than_an_addition_is_recomputed_in_full():
    """A forward hook that scales the MLP's output puts a multiplication above it: its backward reads the value
    (here: a product of the output with itself), so deferring would be wrong; the runner must notice and recompute."""
    ids = _ids()
    reference = _lora(_tiny_llama(torch.float64))
    reference.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    candidate = _lora(_tiny_llama(torch.float64))
    runner = OffloadedCheckpointing.install(candidate, offload=True, mlp_chunk_tokens=7)
    for model in (reference, candidate):
        for layer in _decoder(model).layers:
            layer.mlp.register_forward_hook(lambda module, args, out: out * out)
    expected, got = _grads(reference, ids), _grads(candidate, ids)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-12, atol=1e-13, msg=name)
    assert runner._deferrable == {0: False, 1: False, 2: False}


def test_graph_check_allows_additions_and_casts_only():
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    anchor = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    mlp = torch.nn.Linear(3, 3).double()
    chunk_mlp(mlp, 2)
    with torch.no_grad():
        mlp(x)  # the first real pass tells the placeholder its width and dtype
    with deferred_outputs() as nodes:
        out = mlp(x)
    assert len(nodes) == 1 and torch.equal(out, torch.zeros(4, 3, dtype=torch.float64))
    assert only_value_free_ops_above([(anchor + out).float().view(12)], nodes)
    assert only_value_free_ops_above([out], nodes)  # the placeholder is itself the output
    assert not only_value_free_ops_above([anchor * out], nodes)
    assert not only_value_free_ops_above([torch.nn.functional.layer_norm(anchor + out, (3,))], nodes)
    assert not only_value_free_ops_above([anchor + 1], nodes)  # the placeholder went somewhere else
    # the deferred backward computes the real thing
    (anchor + out).backward(torch.ones(4, 3, dtype=torch.float64))
    unchunk_mlp(mlp)
    x2 = x.detach().requires_grad_()
    mlp(x2).backward(torch.ones(4, 3, dtype=torch.float64))
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-14, atol=1e-15)


class _Float64RMSNorm(torch.nn.Module):
    """An RMSNorm that stays in float64 (transformers' goes through float32, too coarse for gradcheck)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.linspace(0.5, 1.5, width, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def test_chunked_norm_forward_and_gradcheck():
    norm = _Float64RMSNorm(6)
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    expected = norm(x)
    chunk_norm(norm, 3)
    with deferred_outputs() as nodes:  # a norm is never deferred
        got = norm(x)
    assert not nodes
    torch.testing.assert_close(got, expected, rtol=1e-14, atol=1e-15)
    # (parameter gradients accumulate into .grad chunk by chunk, like reentrant checkpointing: checked elsewhere)
    assert torch.autograd.gradcheck(lambda t: norm(t), (x,))
    norm.weight.grad = None
    norm(x).backward(torch.ones_like(x))
    reference = _Float64RMSNorm(6)
    reference(x).backward(torch.ones_like(x))
    torch.testing.assert_close(norm.weight.grad, reference.weight.grad, rtol=1e-13, atol=1e-14)


def test_lora_input_casts_skipped_under_autocast_give_the_same_gradients():
    """bf16 base + float32 adapters under bf16 autocast (the trainer's set-up): peft casts each LoRA input to float32
    and autocast casts it back; skipping that no-op cast changes no value. Compared with plain checkpointing."""
    ids = _ids()
    reference = _lora(_tiny_llama(torch.bfloat16))
    reference.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    candidate = _lora(_tiny_llama(torch.bfloat16))
    runner = OffloadedCheckpointing.install(candidate, offload=True)
    lora_a = reference.get_base_model().model.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert lora_a.dtype == torch.float32  # peft's default adapter dtype over a bf16 base
    assert all(len(modules) == 7 for modules in runner._casting)
    before = [m.__dict__.get("cast_input_dtype_enabled", "unset") for modules in runner._casting for m in modules]
    expected, got = _grads(reference, ids, torch.bfloat16), _grads(candidate, ids, torch.bfloat16)
    for name in expected:
        scale = expected[name].float().abs().max().item()
        torch.testing.assert_close(got[name].float(), expected[name].float(), rtol=0, atol=1e-2 * scale, msg=name)
    after = [m.__dict__.get("cast_input_dtype_enabled", "unset") for modules in runner._casting for m in modules]
    assert after == before  # peft's switch is back as it was


@pytest.mark.cuda
def test_cuda_bounded_layer_under_autocast_matches_plain_checkpointing():
    """The trainer's CUDA set-up: bf16 base, float32 adapters, bf16 autocast, offload + chunks of 40 tokens (deferred
    MLP, chunked norms, no LoRA input casts) against transformers' checkpointing, within bf16 rounding."""
    ids = _ids(batch=2, length=97).cuda()
    reference = _lora(_tiny_llama(torch.bfloat16, layers=4, hidden=64)).cuda()
    reference.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    candidate = _lora(_tiny_llama(torch.bfloat16, layers=4, hidden=64)).cuda()
    runner = OffloadedCheckpointing.install(candidate, offload=True, mlp_chunk_tokens=40, min_offload_bytes=0)

    def grads(model):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            hidden = _decoder(model)(input_ids=ids).last_hidden_state
        weight = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(1)).to(hidden.device, hidden.dtype)
        (hidden.float() * weight.float()).sum().backward()
        return {name: p.grad.float().clone() for name, p in model.named_parameters() if p.grad is not None}

    for _ in range(2):  # the second pass trusts the first pass's graph check
        expected, got = grads(reference), grads(candidate)
        assert runner.arena.live_entries() == 0 and runner._deferrable == {0: True, 1: True, 2: True, 3: True}
        for name in expected:
            scale = expected[name].abs().max().item()
            torch.testing.assert_close(got[name], expected[name], rtol=0.02, atol=0.02 * scale, msg=name)


def test_exact_casts_skipped_only_under_autocast_to_the_activations_dtype():
    from fusedrl.nn.layer_working_set import exact_casts_skipped

    layer = torch.nn.Linear(2, 2)
    layer._cast_input_dtype = None  # stands for a peft LoRA layer here
    x = torch.zeros(1, 2, dtype=torch.bfloat16)
    with exact_casts_skipped([layer], x):
        assert "cast_input_dtype_enabled" not in layer.__dict__  # no autocast: peft's casts are needed
    with torch.autocast("cpu", dtype=torch.bfloat16), exact_casts_skipped([layer], x):
        assert layer.cast_input_dtype_enabled is False
    assert "cast_input_dtype_enabled" not in layer.__dict__
    with torch.autocast("cpu", dtype=torch.bfloat16), exact_casts_skipped([layer], x.float()):
        assert "cast_input_dtype_enabled" not in layer.__dict__  # float32 activations: the cast is not a no-op


def test_qwen3_head_norms_chunked_match_unchunked_in_float64():
    """Qwen3's per-head q/k norms are chunked too (rows of head_dim): same gradients as plain checkpointing."""
    def qwen3():
        torch.manual_seed(0)
        config = transformers.Qwen3Config(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                          max_position_embeddings=256)
        return _lora(transformers.Qwen3ForCausalLM(config).to(torch.float64).train())

    ids = _ids()
    reference, candidate = qwen3(), qwen3()
    reference.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    runner = OffloadedCheckpointing.install(candidate, offload=True, mlp_chunk_tokens=7)
    attention = runner.layers[0].self_attn
    assert attention.q_norm.fusedrl_chunk_tokens == 7 * 4 and attention.k_norm.fusedrl_chunk_tokens == 7 * 4
    expected, got = _grads(reference, ids), _grads(candidate, ids)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-12, atol=1e-13, msg=name)
    assert runner._deferrable == {0: True, 1: True}
    runner.uninstall(candidate)
    assert "forward" not in attention.q_norm.__dict__
