"""Trainer behaviour a TRL 1.16 user expects: outputs written without callbacks, reserved columns, prompt
truncation logged once, reward functions' log_metric / log_extra, the MoE router aux loss, a trained adapter's
reference."""

from __future__ import annotations

import json
import logging

import peft
import pytest
import torch
import transformers

from fusedrl.model.tiny import tiny_model_from_tokenizer, tiny_word_tokenizer
from fusedrl.train.config import GRPOConfig
from fusedrl.train.trainer import GRPOTrainer

BASE = dict(per_device_train_batch_size=4, num_generations=4, max_completion_length=3, dtype="float32",
            gradient_checkpointing=False, seed=1, max_steps=2)


def rows(count=4):
    return [{"prompt": f"what is {i} + {i}", "answer": str(2 * i)} for i in range(count)]


def length_reward(completions, log_metric, log_extra, **kwargs):
    log_metric("my_reward/mean_chars", sum(len(c) for c in completions) / len(completions))
    log_extra("chars", [len(c) for c in completions])
    return [float(len(c)) for c in completions]


def test_python_api_writes_what_the_config_asks_without_callbacks(tmp_path):
    tokenizer = tiny_word_tokenizer()
    model = tiny_model_from_tokenizer(tokenizer, hidden=32, layers=1)
    args = GRPOConfig(**BASE, output_dir=str(tmp_path / "run"), logging_steps=1, save_steps=1, save_total_limit=1,
                      log_completions=True)
    trainer = GRPOTrainer(model, length_reward, args, rows(), tokenizer)
    trainer.train()
    run = tmp_path / "run"
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [line.get("step") for line in lines if "loss" in line] == [1, 2]
    assert all("my_reward/mean_chars" in line for line in lines if "loss" in line)  # log_metric reaches the log
    assert (run / "completions.jsonl").exists()
    assert len([p for p in run.iterdir() if p.name.startswith("checkpoint")]) == 1  # save_total_limit=1
    assert all("chars" in sample for sample in trainer.last_completions)  # log_extra reaches the samples


@pytest.mark.parametrize("column", ["completion_ids", "trainer_state"])
def test_reserved_dataset_column_is_a_clear_error(column):
    tokenizer = tiny_word_tokenizer()
    model = tiny_model_from_tokenizer(tokenizer, hidden=32, layers=1)
    data = [dict(row, **{column: 1}) for row in rows()]
    with pytest.raises(ValueError, match=rf"column\(s\) \['{column}'\] collide"):
        GRPOTrainer(model, length_reward, GRPOConfig(**BASE), data, tokenizer)


def test_prompt_truncation_is_left_side_and_logged_once(caplog):
    tokenizer = tiny_word_tokenizer()
    model = tiny_model_from_tokenizer(tokenizer, hidden=32, layers=1)
    assert GRPOConfig().max_prompt_length is None  # TRL 1.16 never truncates
    trainer = GRPOTrainer(model, length_reward, GRPOConfig(**BASE, max_prompt_length=3), rows(), tokenizer)
    produce = lambda index: trainer.rounds.produce(  # noqa: E731
        index, sampling_generator=torch.Generator().manual_seed(0), shuffle_generator=torch.Generator().manual_seed(0),
        trainer_state=None)
    with caplog.at_level(logging.WARNING, logger="fusedrl.train.generation_round"):
        batches = produce(0).micro_batches + produce(1).micro_batches
    messages = [r.getMessage() for r in caplog.records if "max_prompt_length=3" in r.getMessage()]
    assert len(messages) == 1 and "4 of the 4 prompts" in messages[0]
    assert all(int(batch.prompt_mask.sum(1).max()) == 3 for batch in batches)
    full = tokenizer(rows()[0]["prompt"])["input_ids"]
    kept = [int(i) for i, m in zip(batches[0].prompt_ids[0], batches[0].prompt_mask[0]) if m]
    assert len(full) > 3 and kept in [tokenizer(row["prompt"])["input_ids"][-3:] for row in rows()]  # left side cut


def test_moe_router_aux_loss_enters_the_loss():
    tokenizer = tiny_word_tokenizer()
    config = transformers.Qwen3MoeConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                         moe_intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=1, num_experts=4, num_experts_per_tok=2, head_dim=8,
                                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    trainer = GRPOTrainer(model, length_reward, GRPOConfig(**BASE | {"max_steps": 1}), rows(), tokenizer,
                          callbacks=[])
    assert trainer.router_aux is not None and trainer.router_aux.coef == 0.001
    state = trainer.train()
    assert state.history[0]["aux_loss"] > 0
    router = [p for n, p in model.named_parameters() if "gate.weight" in n and "mlp.gate" in n]
    assert router and all(p.grad is None or torch.isfinite(p.grad).all() for p in router)


def test_trained_adapter_reference_is_the_starting_adapter():
    tokenizer = tiny_word_tokenizer()
    base = tiny_model_from_tokenizer(tokenizer, hidden=32, layers=1)
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # an adapter trained before RL (e.g. by SFT)
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    trainer = GRPOTrainer(model, length_reward, GRPOConfig(**BASE, beta=0.1), rows(), tokenizer)
    batch = trainer.rounds.produce(0, sampling_generator=torch.Generator().manual_seed(0),
                                   shuffle_generator=torch.Generator().manual_seed(0), trainer_state=None
                                   ).micro_batches[0]
    starting = trainer.per_token_logp(model, batch)
    torch.testing.assert_close(batch.ref_logp, starting)  # at the start the reference is the model itself
    with model.disable_adapter():
        assert not torch.allclose(trainer.per_token_logp(model, batch), starting)
