"""LoRA handoff: after one optimizer step vLLM samples from the updated adapter, exactly as the trainer computes it."""

from __future__ import annotations

import torch

from vllm_helpers import LOGP_TOLERANCE, chat_prompt, restore_adapter, trainer_logp


def _trainer_greedy(model, tokenizer, prompt: list[int], max_new_tokens: int) -> list[int]:
    from fusedrl.rollout import BuiltinEngine, SamplingConfig

    out = BuiltinEngine(model, tokenizer).generate([prompt], SamplingConfig(max_new_tokens, greedy=True))
    return out.completion_ids[0, : int(out.completion_mask[0].sum())].tolist()


def test_one_optimizer_step_reaches_vllm(shared_model):
    from fusedrl.rollout import SamplingConfig

    model, tokenizer = shared_model
    engine = model.vllm_engine
    prompt = chat_prompt(tokenizer, "What is the capital of France?")
    greedy = SamplingConfig(max_new_tokens=8, greedy=True)
    before = engine.generate([prompt], greedy)
    before_ids = before.completion_ids[0, : int(before.completion_mask[0].sum())].tolist()

    target = tokenizer("Banana banana banana", add_special_tokens=False)["input_ids"]
    with restore_adapter(model):
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
        logits = model(input_ids=torch.tensor([prompt + target])).logits[0, len(prompt) - 1 : -1]
        torch.nn.functional.cross_entropy(logits, torch.tensor(target)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = engine.sync_weights()
        print(f"\nLoRA handoff: {seconds * 1e3:.2f} ms ({len(engine.lora.copies)} slices)")

        after = engine.generate([prompt], greedy)
        after_ids = after.completion_ids[0, : int(after.completion_mask[0].sum())].tolist()
        assert after_ids != before_ids, "vLLM still samples from the old adapter"
        assert after_ids == _trainer_greedy(model, tokenizer, prompt, 8)
        torch.testing.assert_close(after.sampling_logp[0, : len(after_ids)], trainer_logp(model, prompt, after_ids),
                                   atol=LOGP_TOLERANCE, rtol=0)
        engine.shared.check_unchanged()

    restored = engine.generate([prompt], greedy)
    assert restored.completion_ids[0, : len(before_ids)].tolist() == before_ids


def test_handoff_never_touches_the_base_weights(shared_model):
    model, _ = shared_model
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n and p.dim() == 2}
    with restore_adapter(model):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.05)
        model.vllm_engine.sync_weights()
        for name, p in model.named_parameters():
            if name in base:
                assert torch.equal(p, base[name]), name


def test_vllm_scales_b_like_peft(shared_model):
    """The slot holds B * lora_alpha / r (vLLM's pre-scaled convention) and A unchanged."""
    model, _ = shared_model
    engine = model.vllm_engine
    with restore_adapter(model):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.05)
        engine.sync_weights()
        for copy in engine.lora.copies:
            assert torch.equal(copy.slot_a, copy.lora_a)
            torch.testing.assert_close(copy.slot_b, copy.lora_b * 2.0, atol=0, rtol=0)  # alpha 16 / r 8
