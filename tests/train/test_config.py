"""GRPOConfig: TRL defaults, derived batch fields, validation messages and dict/TOML round trips."""

from __future__ import annotations

import tomllib

import pytest

from fusedrl.train.config import GRPOConfig


def test_defaults_follow_trl() -> None:
    cfg = GRPOConfig()
    assert cfg.learning_rate == 1e-6
    assert cfg.logging_steps == 10
    assert cfg.num_generations == 8
    assert cfg.per_device_train_batch_size == 8
    assert cfg.gradient_accumulation_steps == 1
    assert cfg.max_completion_length == 512
    assert cfg.beta == 0.0 and cfg.epsilon == 0.2 and cfg.epsilon_high == 0.2
    assert cfg.loss_type == "dapo" and cfg.importance_sampling_level == "token"
    assert cfg.scale_rewards == "group"
    assert cfg.vllm_importance_sampling_mode == "sequence_mask"
    assert cfg.vllm_importance_sampling_clip_max == 3.0
    assert cfg.sapo_temperature_pos == 1.0 and cfg.sapo_temperature_neg == 1.05
    assert cfg.top_k == 0 and cfg.top_p == 1.0 and cfg.min_p is None
    # (fusedrl) None: chosen by the memory plan, which picks TRL's True (plain checkpointing) whenever it fits.
    assert cfg.gradient_checkpointing is None and cfg.mlp_chunk_tokens is None and cfg.dtype == "bfloat16"
    assert cfg.seed == 42 and cfg.max_grad_norm == 1.0
    assert cfg.steps_per_generation == 1 and cfg.generation_batch_size == 8


@pytest.mark.parametrize("micro,accum,gens", [(3, 4, 6), (5, 2, 2), (7, 3, 3)])
def test_generation_batch_derived_from_accumulation(micro: int, accum: int, gens: int) -> None:
    cfg = GRPOConfig(per_device_train_batch_size=micro, gradient_accumulation_steps=accum, num_generations=gens)
    assert cfg.steps_per_generation == accum
    assert cfg.generation_batch_size == micro * accum
    assert cfg.prompts_per_generation == micro * accum // gens


def test_generation_batch_size_sets_steps() -> None:
    cfg = GRPOConfig(per_device_train_batch_size=3, generation_batch_size=12, num_generations=4)
    assert cfg.steps_per_generation == 4
    cfg = GRPOConfig(per_device_train_batch_size=3, steps_per_generation=5, num_generations=5)
    assert cfg.generation_batch_size == 15


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(per_device_train_batch_size=3, num_generations=2), "divisible by num_generations"),
        (dict(num_generations=1, per_device_train_batch_size=2), "num_generations >= 2"),
        (dict(generation_batch_size=8, steps_per_generation=1), "cannot both be set"),
        (dict(per_device_train_batch_size=4, generation_batch_size=10, num_generations=2), "multiple of"),
        (dict(loss_type="ppo"), "loss_type"),
        (dict(importance_sampling_level="batch"), "importance_sampling_level"),
        (dict(scale_rewards="std"), "scale_rewards"),
        (dict(vllm_importance_sampling_mode="token_clip"), "vllm_importance_sampling_mode"),
        (dict(optim="sgd"), "optim"),
        (dict(dtype="fp16"), "dtype"),
        (dict(lr_scheduler_type="polynomial"), "lr_scheduler_type"),
        (dict(beta=-0.01), "beta"),
        (dict(temperature=0.0), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(vllm_importance_sampling_clip_min=3.0), "clip_min"),
        (
            dict(vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_max=None),
            "must be set",
        ),
        (dict(gradient_accumulation_steps=0), "gradient_accumulation_steps"),
        (dict(max_steps=0), "max_steps"),
    ],
)
def test_invalid_combinations_raise_with_field_name(kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        GRPOConfig(**kwargs)


def test_torch_dtype() -> None:
    import torch

    assert GRPOConfig().torch_dtype is torch.bfloat16
    assert GRPOConfig(dtype="float16").torch_dtype is torch.float16


def test_scale_rewards_accepts_bool_like_trl() -> None:
    assert GRPOConfig(scale_rewards=True).scale_rewards == "group"
    assert GRPOConfig(scale_rewards=False).scale_rewards == "none"
    assert GRPOConfig(scale_rewards="batch").scale_rewards == "batch"


def test_epsilon_high_defaults_to_epsilon_only_when_unset() -> None:
    assert GRPOConfig(epsilon=0.3).epsilon_high == 0.3
    assert GRPOConfig(epsilon=0.2, epsilon_high=0.28).epsilon_high == 0.28


def test_warmup_as_in_transformers_5() -> None:
    """warmup_steps >= 1 is a step count (int() of it), below 1 a fraction of the total steps rounded up, exactly as
    transformers 5's TrainingArguments.get_warmup_steps; warmup_ratio is its deprecated alias."""
    assert GRPOConfig(warmup_steps=3).get_warmup_steps(95) == 3
    assert GRPOConfig(warmup_steps=2.5).get_warmup_steps(95) == 2
    assert GRPOConfig(warmup_steps=0.1).get_warmup_steps(95) == 10
    assert GRPOConfig().get_warmup_steps(95) == 0
    transformers = pytest.importorskip("transformers")
    for value in (3, 2.5, 0.1, 0.05, 0):
        reference = transformers.TrainingArguments(output_dir="unused", warmup_steps=value, report_to=[])
        assert GRPOConfig(warmup_steps=value).get_warmup_steps(95) == reference.get_warmup_steps(95), value
    with pytest.warns(FutureWarning, match="warmup_ratio is deprecated"):
        config = GRPOConfig(warmup_ratio=0.1)
    assert (config.warmup_steps, config.warmup_ratio, config.get_warmup_steps(95)) == (0.1, 0.0, 10)
    assert GRPOConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="warmup_ratio .* and warmup_steps .* are both set"):
        GRPOConfig(warmup_ratio=0.1, warmup_steps=3)
    with pytest.raises(ValueError, match="warmup_steps must be >= 0"):
        GRPOConfig(warmup_steps=-1)


def test_dict_round_trip() -> None:
    cfg = GRPOConfig(
        per_device_train_batch_size=6, gradient_accumulation_steps=2, num_generations=3, reward_weights=(1, 0.5)
    )
    assert cfg.reward_weights == [1.0, 0.5]
    again = GRPOConfig.from_dict(cfg.to_dict())
    assert again == cfg


def test_from_dict_unknown_key_suggests_close_match() -> None:
    with pytest.raises(ValueError, match=r"'num_generation'.*'num_generations'"):
        GRPOConfig.from_dict({"num_generation": 4})
    with pytest.raises(ValueError, match="unknown GRPOConfig field"):
        GRPOConfig.from_dict({"completely_unrelated_xyz": 1})


def test_from_toml_table() -> None:
    text = """
learning_rate = 5e-6
per_device_train_batch_size = 4
gradient_accumulation_steps = 2
num_generations = 4
loss_type = "grpo"
scale_rewards = false
reward_weights = [2.0, 0.5, 0.5]
"""
    cfg = GRPOConfig.from_dict(tomllib.loads(text))
    assert cfg.learning_rate == 5e-6
    assert cfg.generation_batch_size == 8 and cfg.steps_per_generation == 2
    assert cfg.scale_rewards == "none" and cfg.loss_type == "grpo"
    assert cfg.reward_weights == [2.0, 0.5, 0.5]


def test_luspo_with_token_level_warns() -> None:
    with pytest.warns(UserWarning, match="luspo"):
        GRPOConfig(loss_type="luspo")


def test_gradient_checkpointing_accepts_offload_and_the_unsloth_alias() -> None:
    assert GRPOConfig(gradient_checkpointing="offload").gradient_checkpointing == "offload"
    assert GRPOConfig(gradient_checkpointing="unsloth").gradient_checkpointing == "offload"
    assert GRPOConfig(gradient_checkpointing=False).gradient_checkpointing is False
    assert GRPOConfig(mlp_chunk_tokens=0).mlp_chunk_tokens == 0


@pytest.mark.errors
def test_gradient_checkpointing_and_chunk_reject_bad_values() -> None:
    with pytest.raises(ValueError, match="gradient_checkpointing must be True, False, 'offload'"):
        GRPOConfig(gradient_checkpointing="cpu")
    with pytest.raises(ValueError, match="mlp_chunk_tokens must be None"):
        GRPOConfig(mlp_chunk_tokens=-1)
