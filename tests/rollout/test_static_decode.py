"""The static-cache decode loop: greedy tokens identical to transformers' generate, the RolloutEngine contract,
reproducibility, and (on CUDA) the CUDA-graph path and bf16 sampler log-probabilities against the trainer's."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import transformers

from fusedrl.model.hidden import position_ids_from_mask
from fusedrl.rollout import BuiltinEngine, SamplingConfig
from fusedrl.rollout.llama_family import unsupported_reason

VOCAB = 97  # prime: no tile-friendly sizes


def _config(model_type: str, **extra):
    base = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
                num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
    if model_type == "qwen3":
        base["head_dim"] = 8
    if model_type == "mistral":
        base["sliding_window"] = None
    base.update(extra)
    return transformers.AutoConfig.for_model(model_type, **base)


def _model(model_type: str, seed: int = 0, dtype=torch.float32, device="cpu", lora: bool = False, **extra):
    torch.manual_seed(seed)
    config = _config(model_type, **extra)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    if lora:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.05)
    return model.eval()


def _engines(model, eos: int = VOCAB - 1, pad: int = 0, **fast_kwargs):
    tokenizer = SimpleNamespace(eos_token_id=eos, pad_token_id=pad)
    return (BuiltinEngine(model, tokenizer, static_decode=True, **fast_kwargs),
            BuiltinEngine(model, tokenizer, static_decode=False))


def _prompts(lengths, seed: int, vocab: int = VOCAB):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab - 1, (n,), generator=generator).tolist() for n in lengths]


def _assert_same_greedy(fast, slow, prompts, max_new: int, seed_note: str) -> None:
    sampling = SamplingConfig(max_new_tokens=max_new, greedy=True)
    ours, theirs = fast.generate(prompts, sampling), slow.generate(prompts, sampling)
    assert torch.equal(ours.completion_ids.cpu(), theirs.completion_ids.cpu()), seed_note
    assert torch.equal(ours.completion_mask.cpu(), theirs.completion_mask.cpu()), seed_note
    assert torch.equal(ours.truncated.cpu(), theirs.truncated.cpu()), seed_note
    torch.testing.assert_close(ours.sampling_logp.cpu(), theirs.sampling_logp.cpu(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("attention", ["fused", "sdpa"])
@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "mistral"])
def test_greedy_matches_transformers_generate(model_type, attention):
    model = _model(model_type, seed=3)
    fast, slow = _engines(model)
    fast.static_loop.attention = attention  # before the first call, which builds the decoder
    prompts = _prompts([5, 1, 11, 7, 2], seed=4)
    _assert_same_greedy(fast, slow, prompts, max_new=19, seed_note=f"{model_type} {attention}, seeds 3/4")
    assert fast.static_loop._decoder.fused_attention == (attention == "fused")


def test_identical_prompts_share_one_prefill_and_match_generate():
    """A GRPO call repeats each prompt; the loop prefills each distinct prompt once (lengths mixed)."""
    model = _model("qwen3", seed=21, lora=True)
    fast, slow = _engines(model)
    a, b, c = _prompts([7, 3, 7], seed=22)
    prompts = [a, a, b, a, c, b, c]
    decoder_calls = []
    fast.generate(prompts[:1], SamplingConfig(max_new_tokens=2, greedy=True))  # builds the decoder
    original = fast.static_loop._decoder.prefill
    fast.static_loop._decoder.prefill = lambda ids, *rest: decoder_calls.append(ids.shape) or original(ids, *rest)
    _assert_same_greedy(fast, slow, prompts, max_new=13, seed_note="seeds 21/22")
    assert sorted(decoder_calls) == [(1, 3), (2, 7)]  # b once; a and c (same length) in one forward


def test_greedy_with_live_lora_matches_generate():
    model = _model("llama", seed=5, lora=True)
    fast, slow = _engines(model)
    _assert_same_greedy(fast, slow, _prompts([4, 9, 3], seed=6), max_new=15, seed_note="llama+lora, seeds 5/6")
    with torch.no_grad():  # an in-place adapter update is seen by the next call
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(-3.0)
    _assert_same_greedy(fast, slow, _prompts([4, 9, 3], seed=6), max_new=15, seed_note="after the update")


def test_contract_eos_padding_truncation_and_chunks():
    model = _model("llama", seed=7)
    with torch.no_grad():  # make EOS likely, so some rows stop early and others run to max_new_tokens
        model.lm_head.weight[VOCAB - 1] *= 4.0
    fast, slow = _engines(model, max_batch_size=4)  # 7 prompts: chunks of 4 and 3
    prompts = _prompts([3, 8, 1, 6, 2, 9, 4], seed=8)
    sampling = SamplingConfig(max_new_tokens=12, temperature=1.3)
    out = fast.generate(prompts, sampling, torch.Generator().manual_seed(1))
    ids, mask, logp = out.completion_ids, out.completion_mask, out.sampling_logp
    assert ids.shape[0] == 7 and ids.shape[1] <= 12 and mask.shape == ids.shape
    is_eos = torch.isin(ids, torch.tensor(fast.eos_token_ids))  # the model config's eos id counts too
    for row in range(7):
        length = int(mask[row].sum())
        assert mask[row, :length].all() and not mask[row, length:].any()
        assert (ids[row, length:] == 0).all() and (logp[row, length:] == 0).all()
        assert (logp[row, :length] < 0).all()
        ended = bool(is_eos[row, :length].any())
        assert ended == (not out.truncated[row]), row
        if ended:
            assert is_eos[row, length - 1] and not is_eos[row, : length - 1].any()
        else:
            assert length == 12
    assert out.truncated.any() or ids.shape[1] < 12
    again = fast.generate(prompts, sampling, torch.Generator().manual_seed(1))
    assert torch.equal(again.completion_ids, ids) and torch.equal(again.sampling_logp, logp)


def test_sampler_logp_matches_full_forward():
    model = _model("qwen3", seed=9, lora=True)
    fast, _ = _engines(model)
    prompts = _prompts([6, 2, 10], seed=10)
    sampling = SamplingConfig(max_new_tokens=10, temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.2)
    out = fast.generate(prompts, sampling, torch.Generator().manual_seed(2))
    input_ids, attention_mask = fast._left_pad(prompts)
    full_ids = torch.cat([input_ids, out.completion_ids], dim=1)
    full_mask = torch.cat([attention_mask, out.completion_mask], dim=1)
    with torch.no_grad():
        logits = model(input_ids=full_ids, attention_mask=full_mask,
                       position_ids=position_ids_from_mask(full_mask)).logits.float()
    logp = torch.log_softmax(logits[:, input_ids.shape[1] - 1 : -1] / 0.7, dim=-1)
    expected = logp.gather(-1, out.completion_ids.unsqueeze(-1)).squeeze(-1) * out.completion_mask
    torch.testing.assert_close(out.sampling_logp, expected, atol=1e-4, rtol=0)


def test_unsupported_models_fall_back_with_a_log_line(caplog):
    model = _model("mistral", seed=1, sliding_window=8)
    assert "sliding" in unsupported_reason(model, 30)
    assert unsupported_reason(model, 8) is None
    fast, slow = _engines(model)
    with caplog.at_level("WARNING"):
        _assert_same_greedy(fast, slow, _prompts([12, 3], seed=2), max_new=20, seed_note="fallback")
    assert any("falling back to transformers generate" in r.message for r in caplog.records)


@pytest.mark.slow
def test_greedy_matches_generate_on_smollm2():
    pytest.importorskip("gguf")
    from fusedrl.model.offline import smollm2_path

    try:
        path = smollm2_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    fast = BuiltinEngine(model, tokenizer, static_decode=True)
    slow = BuiltinEngine(model, tokenizer, static_decode=False)
    texts = ["The capital of France is", "1 + 1 =", "Write a short poem about the sea.\n"]
    prompts = [tokenizer(t)["input_ids"] for t in texts]
    _assert_same_greedy(fast, slow, prompts, max_new=24, seed_note="smollm2")


# ---- CUDA ------------------------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("attention", ["fused", "sdpa"])
def test_cuda_graph_greedy_matches_generate_float32(attention):
    model = _model("llama", seed=11, device="cuda", vocab_size=1031, hidden_size=512, intermediate_size=512,
                   num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=3)
    tokenizer = SimpleNamespace(eos_token_id=1030, pad_token_id=0)
    fast = BuiltinEngine(model, tokenizer)  # CUDA: the static loop with graphs by default
    fast.static_loop.attention = attention
    slow = BuiltinEngine(model, tokenizer, static_decode=False)
    prompts = _prompts([17, 5, 40, 1, 23], seed=12, vocab=1030)
    sampling = SamplingConfig(max_new_tokens=64, greedy=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    ours, theirs = fast.generate(prompts, sampling), slow.generate(prompts, sampling)
    assert fast.static_loop._graphs, "the CUDA-graph path did not run"
    assert fast.static_loop._decoder.fused_attention == (attention == "fused")
    if attention == "fused":  # the attended range is read on the device: one graph serves every position
        assert len(fast.static_loop._graphs) == 1
    assert torch.equal(ours.completion_ids, theirs.completion_ids)
    torch.testing.assert_close(ours.sampling_logp, theirs.sampling_logp, atol=1e-3, rtol=0)
    fast.sleep()
    assert fast.static_loop._cache is None and not fast.static_loop._graphs
    fast.wake()
    again = fast.generate(prompts, sampling)
    assert torch.equal(again.completion_ids, theirs.completion_ids)


@pytest.mark.cuda
def test_cuda_bf16_sampler_logp_vs_trainer_logp():
    """The engine's bf16 sampler logps against a full forward over prompt + completion (the trainer's logps),
    next to the same difference for transformers' generate: ours may not be noisier than bf16 generate."""
    model = _model("llama", seed=13, dtype=torch.bfloat16, device="cuda", lora=True, vocab_size=2048,
                   hidden_size=512, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=2,
                   num_hidden_layers=4)
    tokenizer = SimpleNamespace(eos_token_id=2047, pad_token_id=0)
    fast = BuiltinEngine(model, tokenizer)
    fast_sdpa = BuiltinEngine(model, tokenizer)
    fast_sdpa.static_loop.attention = "sdpa"
    slow = BuiltinEngine(model, tokenizer, static_decode=False)
    prompts = _prompts([30, 7, 64, 12] * 4, seed=14, vocab=2047)
    sampling = SamplingConfig(max_new_tokens=48, temperature=0.9)
    diffs = {}
    for name, engine in (("static", fast), ("static_sdpa", fast_sdpa), ("generate", slow)):
        out = engine.generate(prompts, sampling, torch.Generator("cuda").manual_seed(3))
        input_ids, attention_mask = engine._left_pad(prompts)
        full_ids = torch.cat([input_ids, out.completion_ids], dim=1)
        full_mask = torch.cat([attention_mask, out.completion_mask], dim=1)
        with torch.no_grad():
            logits = model(input_ids=full_ids, attention_mask=full_mask,
                           position_ids=position_ids_from_mask(full_mask)).logits.float()
        logp = torch.log_softmax(logits[:, input_ids.shape[1] - 1 : -1] / 0.9, dim=-1)
        trainer = logp.gather(-1, out.completion_ids.unsqueeze(-1)).squeeze(-1)
        diff = (out.sampling_logp - trainer).abs()[out.completion_mask.bool()]
        diffs[name] = (diff.mean().item(), diff.max().item())
    print(f"bf16 |sampler logp - trainer logp| mean/max: static fused {diffs['static']}, static sdpa "
          f"{diffs['static_sdpa']}, generate {diffs['generate']}")
    assert fast.static_loop._decoder.fused_attention
    for name in ("static", "static_sdpa"):
        assert diffs[name][0] <= 2 * diffs["generate"][0] + 1e-3, name
        assert diffs[name][1] <= 2 * diffs["generate"][1] + 1e-2, name


@pytest.mark.parametrize("base_dtype", [torch.float32, torch.bfloat16])
def test_lora_linear_shortcut_matches_peft(base_dtype):
    """`_linear` (base + one addmm) against peft's own forward, with peft's float32 adapters over a bf16 base."""
    import peft

    from fusedrl.rollout.llama_family import _linear

    torch.manual_seed(15)
    base = torch.nn.Sequential(torch.nn.Linear(37, 23)).to(base_dtype)
    model = peft.get_peft_model(base, peft.LoraConfig(r=5, lora_alpha=7, target_modules=["0"])).eval()
    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.3)
        x = torch.randn(3, 4, 37).to(base_dtype)
        expected, ours = layer(x), _linear(layer, x)
    assert layer.lora_A["default"].weight.dtype == torch.float32 and ours.dtype == expected.dtype
    # float32: rounding of one fused GEMM epilogue; bf16: one rounding of the same float32 sum (at most 1 ulp apart)
    tolerance = dict(atol=1e-5, rtol=1e-5) if base_dtype == torch.float32 else dict(atol=1e-2, rtol=8e-3)
    torch.testing.assert_close(ours, expected, **tolerance)


def test_batch_buckets_and_cache_sizes():
    from fusedrl.rollout.static_cache import StaticKVCache
    from fusedrl.rollout.static_decode import StaticDecodeLoop, batch_bucket

    assert [batch_bucket(n, 64) for n in (1, 2, 3, 8, 9, 63, 64, 65, 1000)] == [1, 2, 4, 8, 16, 64, 64, 64, 64]
    cache = StaticKVCache(2, 4, 16, 3, 8, torch.float32, torch.device("cpu"))
    assert cache.nbytes == StaticKVCache.bytes_needed(2, 4, 16, 3, 8, torch.float32) + 4 * 16 + 4 * 4
    assert cache.fits(3, 16, torch.float32, torch.device("cpu")) and not cache.fits(5, 16, torch.float32, "cpu")
    with pytest.raises(ValueError, match="batch=0"):
        StaticKVCache(2, 0, 16, 3, 8, torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="max_batch_size"):
        StaticDecodeLoop(_model("llama"), [1], 0, max_batch_size=0)


def test_greedy_with_repetition_penalty_matches_generate():
    """Equal-length prompts: transformers also penalizes left-padding tokens, the static loop only real ones."""
    model = _model("qwen2", seed=16)
    fast, slow = _engines(model)
    prompts = _prompts([6, 6, 6], seed=17)
    sampling = SamplingConfig(max_new_tokens=16, greedy=True, repetition_penalty=1.6)
    ours, theirs = fast.generate(prompts, sampling), slow.generate(prompts, sampling)
    assert torch.equal(ours.completion_ids, theirs.completion_ids), "seeds 16/17"
    plain = fast.generate(prompts, SamplingConfig(max_new_tokens=16, greedy=True))
    assert not torch.equal(plain.completion_ids, ours.completion_ids)  # the penalty changed something


class _SyncsOnTheHost(torch.nn.Module):
    """Wraps a module and reads one value back to the host in every forward: legal eagerly, not under capture."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        if x.is_cuda:
            float(x.reshape(-1)[0].item())
        return self.inner(x)


@pytest.mark.cuda
def test_cuda_capture_failure_falls_back_to_eager_decode(caplog):
    model = _model("llama", seed=15, device="cuda", vocab_size=509, hidden_size=128, intermediate_size=256,
                   num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)
    mlp = model.model.layers[0].mlp
    mlp.down_proj = _SyncsOnTheHost(mlp.down_proj)
    tokenizer = SimpleNamespace(eos_token_id=508, pad_token_id=0)
    fast = BuiltinEngine(model, tokenizer)
    slow = BuiltinEngine(model, tokenizer, static_decode=False)
    prompts = _prompts([9, 3, 14], seed=16, vocab=508)
    sampling = SamplingConfig(max_new_tokens=20, greedy=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    with caplog.at_level("WARNING"):
        ours = fast.generate(prompts, sampling)
    assert any("capturing the decode step failed" in record.message for record in caplog.records), caplog.text
    assert not fast.static_loop._graphs and fast.static_loop.use_cuda_graphs is False
    assert torch.equal(ours.completion_ids, slow.generate(prompts, sampling).completion_ids)
    # The failed capture must not leave the default CUDA generator unusable (torch marks it as capturing).
    assert torch.randint(0, 10, (4,), device="cuda").shape == (4,)
