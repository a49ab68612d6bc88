"""Every field of TRL 1.16.0's GRPOConfig, and what fusedrl does with the ones it does not implement.

A TRL field that is also a `fusedrl.GRPOConfig` field is supported (same name, meaning and default, see config.py).
Every other TRL field is listed in `NOT_SUPPORTED` with what to do instead; `GRPOConfig(...)` and
`GRPOConfig.from_dict` raise a ValueError naming it, so a TRL setting is never accepted and silently ignored.
`docs/trl_config_fields.md` is generated from this module (`python scripts/trl_config_table.py`); a test keeps the
table, this module, fusedrl's GRPOConfig and TRL's own dataclass in agreement.
"""

from __future__ import annotations

TRL_VERSION = "1.16.0"

# dataclasses.fields(trl.GRPOConfig) of TRL 1.16.0, in order (TrainingArguments' fields first).
TRL_GRPO_CONFIG_FIELDS = (
    "output_dir", "per_device_train_batch_size", "num_train_epochs", "max_steps", "learning_rate",
    "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "optim", "optim_args", "weight_decay", "adam_beta1",
    "adam_beta2", "adam_epsilon", "optim_target_modules", "gradient_accumulation_steps",
    "average_tokens_across_devices", "max_grad_norm", "label_smoothing_factor", "bf16", "fp16", "bf16_full_eval",
    "fp16_full_eval", "tf32", "activation_checkpointing", "activation_checkpointing_kwargs", "gradient_checkpointing",
    "gradient_checkpointing_kwargs", "torch_compile", "torch_compile_backend", "torch_compile_mode",
    "use_liger_kernel", "liger_kernel_config", "use_cache", "neftune_noise_alpha", "torch_empty_cache_steps",
    "auto_find_batch_size", "logging_strategy", "logging_steps", "logging_first_step", "log_on_each_node",
    "logging_nan_inf_filter", "include_num_input_tokens_seen", "log_level", "log_level_replica", "disable_tqdm",
    "report_to", "run_name", "project", "trackio_space_id", "trackio_bucket_id", "trackio_static_space_id",
    "eval_strategy", "eval_steps", "eval_delay", "per_device_eval_batch_size", "prediction_loss_only",
    "eval_on_start", "eval_do_concat_batches", "eval_use_gather_object", "eval_accumulation_steps",
    "include_for_metrics", "batch_eval_metrics", "save_only_model", "save_strategy", "save_steps",
    "save_on_each_node", "save_total_limit", "enable_jit_checkpoint", "push_to_hub", "hub_token",
    "hub_private_repo", "hub_model_id", "hub_strategy", "hub_always_push", "hub_revision", "load_best_model_at_end",
    "metric_for_best_model", "greater_is_better", "ignore_data_skip", "restore_callback_states_from_checkpoint",
    "full_determinism", "seed", "data_seed", "use_cpu", "accelerator_config", "parallelism_config",
    "dataloader_drop_last", "dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers",
    "dataloader_prefetch_factor", "dataloader_multiprocessing_context", "dataloader_in_order",
    "remove_unused_columns", "label_names", "train_sampling_strategy", "length_column_name",
    "ddp_find_unused_parameters", "ddp_bucket_cap_mb", "ddp_broadcast_buffers", "ddp_static_graph", "ddp_backend",
    "ddp_timeout", "fsdp", "fsdp_config", "deepspeed", "debug", "skip_memory_metrics", "do_train", "do_eval",
    "do_predict", "resume_from_checkpoint", "local_rank", "model_init_kwargs", "trust_remote_code",
    "router_aux_loss_coef", "disable_dropout", "cast_lm_head_to_fp32", "num_generations", "num_generations_eval",
    "max_completion_length", "ds3_gather_for_generation", "shuffle_dataset", "pad_to_multiple_of",
    "generation_batch_size", "steps_per_generation", "temperature", "top_p", "top_k", "min_p", "generation_kwargs",
    "chat_template_kwargs", "repetition_penalty", "cache_implementation", "use_vllm", "vllm_mode",
    "vllm_model_impl", "vllm_enable_sleep_mode", "vllm_structured_outputs_regex", "vllm_server_base_url",
    "vllm_server_host", "vllm_server_port", "vllm_server_timeout", "vllm_group_port", "vllm_gpu_memory_utilization",
    "vllm_max_model_length", "vllm_tensor_parallel_size", "beta", "num_iterations", "epsilon", "delta",
    "epsilon_high", "sapo_temperature_neg", "sapo_temperature_pos", "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg",
    "vespo_lambda_neg", "importance_sampling_level", "reward_weights", "multi_objective_aggregation",
    "scale_rewards", "loss_type", "mask_truncated_completions", "sync_ref_model", "ref_model_mixup_alpha",
    "ref_model_sync_steps", "top_entropy_quantile", "entropy_coef", "use_adaptive_entropy", "entropy_coef_min",
    "entropy_coef_max", "entropy_coef_delta", "entropy_target", "max_tool_calling_iterations",
    "vllm_importance_sampling_correction", "vllm_importance_sampling_mode", "vllm_importance_sampling_clip_max",
    "vllm_importance_sampling_clip_min", "off_policy_mask_threshold", "use_bias_correction_kl", "log_completions",
    "log_multimodal", "num_completions_to_print", "log_unique_prompts", "log_completions_hub_repo",
    "use_transformers_continuous_batching", "transformers_continuous_batching_config", "use_transformers_paged",
    "vllm_importance_sampling_cap",
)

_SINGLE_PROCESS = "fusedrl trains in one process on one device (multi-GPU is not implemented yet): remove it"
_NO_DATALOADER = "fusedrl reads the prompt rows in-process, without a DataLoader: remove it"
_NO_EVAL_LOOP = ("fusedrl has no evaluation loop inside training: measure checkpoints with `fusedrl eval --model PATH "
                 "--adapter DIR`")
_NO_HUB = ("fusedrl does not push to the Hub: save with fusedrl.save_lora / fusedrl.save_merged and upload with "
           "huggingface_hub")
_NO_TRACKERS = ("fusedrl writes metrics.jsonl in output_dir; send metrics elsewhere with a callback's on_log(metrics)")
_ROLLOUT_ENGINE = ("fusedrl chooses its rollout engine itself (built-in, or vLLM when installed): pass "
                   "rollout_engine=... to GRPOTrainer to pick one")
_NOT_SFT = "a supervised-training option with no meaning for GRPO here: remove it"
_LOAD_MODEL_YOURSELF = ("load the model yourself (fusedrl.load_model or from_pretrained) and pass the model object")
_ENTROPY_BONUS = "the entropy bonus is not implemented: remove it (fusedrl logs `entropy`)"

NOT_SUPPORTED: dict[str, str] = {
    "lr_scheduler_kwargs": "not supported: choose lr_scheduler_type among linear, cosine, constant, constant_with_warmup",
    "optim_args": "not supported: AdamW's settings are learning_rate, weight_decay, adam_beta1/2 and adam_epsilon",
    "optim_target_modules": "not supported: the optimizer trains every parameter with requires_grad (the LoRA adapters)",
    "average_tokens_across_devices": _SINGLE_PROCESS,
    "label_smoothing_factor": _NOT_SFT,
    "bf16": "use dtype='bfloat16' (the default) instead",
    "fp16": "use dtype='float16' instead (dynamic loss scaling is applied)",
    "bf16_full_eval": _NO_EVAL_LOOP,
    "fp16_full_eval": _NO_EVAL_LOOP,
    "tf32": "set torch.backends.cuda.matmul.allow_tf32 yourself before training",
    "activation_checkpointing": "use gradient_checkpointing=True/False",
    "activation_checkpointing_kwargs": "not supported: gradient_checkpointing=True uses non-reentrant checkpointing",
    "gradient_checkpointing_kwargs": "not supported: gradient_checkpointing=True uses non-reentrant checkpointing",
    "torch_compile": "not supported: the fused lm-head + loss op is already a compiled kernel",
    "torch_compile_backend": "not supported: the fused lm-head + loss op is already a compiled kernel",
    "torch_compile_mode": "not supported: the fused lm-head + loss op is already a compiled kernel",
    "use_liger_kernel": "not needed: fusedrl's fused lm-head + GRPO loss op replaces Liger's; remove it",
    "liger_kernel_config": "not needed: fusedrl's fused lm-head + GRPO loss op replaces Liger's; remove it",
    "use_cache": "not applicable: the training forward never uses a KV cache, generation always does; remove it",
    "neftune_noise_alpha": _NOT_SFT,
    "torch_empty_cache_steps": "not supported: call torch.cuda.empty_cache() from a callback's on_step_end if needed",
    "auto_find_batch_size": "not supported: set per_device_train_batch_size (and gradient_accumulation_steps)",
    "logging_strategy": "use logging_steps (optimizer steps between two log lines)",
    "logging_first_step": "not supported: the first step is logged when logging_steps divides 1, i.e. logging_steps=1",
    "log_on_each_node": _SINGLE_PROCESS,
    "logging_nan_inf_filter": "not supported: fusedrl logs the values as they are",
    "include_num_input_tokens_seen": "not supported: fusedrl logs throughput/training_tokens_per_s instead",
    "log_level": "configure Python's logging module yourself",
    "log_level_replica": _SINGLE_PROCESS,
    "disable_tqdm": "not supported: fusedrl's progress output comes from its callbacks; pass callbacks=[] to silence",
    "report_to": _NO_TRACKERS,
    "run_name": "name the run through output_dir",
    "project": _NO_TRACKERS,
    "trackio_space_id": _NO_TRACKERS,
    "trackio_bucket_id": _NO_TRACKERS,
    "trackio_static_space_id": _NO_TRACKERS,
    "eval_strategy": _NO_EVAL_LOOP,
    "eval_steps": _NO_EVAL_LOOP,
    "eval_delay": _NO_EVAL_LOOP,
    "per_device_eval_batch_size": _NO_EVAL_LOOP,
    "prediction_loss_only": _NO_EVAL_LOOP,
    "eval_on_start": _NO_EVAL_LOOP,
    "eval_do_concat_batches": _NO_EVAL_LOOP,
    "eval_use_gather_object": _NO_EVAL_LOOP,
    "eval_accumulation_steps": _NO_EVAL_LOOP,
    "include_for_metrics": _NO_EVAL_LOOP,
    "batch_eval_metrics": _NO_EVAL_LOOP,
    "num_generations_eval": _NO_EVAL_LOOP,
    "load_best_model_at_end": _NO_EVAL_LOOP,
    "metric_for_best_model": _NO_EVAL_LOOP,
    "greater_is_better": _NO_EVAL_LOOP,
    "save_only_model": "not supported: checkpoints always hold the adapters, optimizer, scheduler and RNG state",
    "save_strategy": "use save_steps (0 disables intermediate checkpoints)",
    "save_on_each_node": _SINGLE_PROCESS,
    "enable_jit_checkpoint": "not supported: checkpoints are written every save_steps",
    "push_to_hub": _NO_HUB,
    "hub_token": _NO_HUB,
    "hub_private_repo": _NO_HUB,
    "hub_model_id": _NO_HUB,
    "hub_strategy": _NO_HUB,
    "hub_always_push": _NO_HUB,
    "hub_revision": _NO_HUB,
    "log_completions_hub_repo": _NO_HUB,
    "ignore_data_skip": "not supported: resuming always continues the prompt order where the run stopped",
    "restore_callback_states_from_checkpoint": "not supported: callbacks are plain objects without saved state",
    "full_determinism": "not supported: seed seeds Python, NumPy and torch; deterministic kernels are not forced",
    "data_seed": "not supported: seed also drives the prompt order",
    "use_cpu": "fusedrl trains where the model is: load it on the CPU (fusedrl.load_model(..., device='cpu'))",
    "accelerator_config": _SINGLE_PROCESS,
    "parallelism_config": _SINGLE_PROCESS,
    "dataloader_drop_last": _NO_DATALOADER,
    "dataloader_num_workers": _NO_DATALOADER,
    "dataloader_pin_memory": _NO_DATALOADER,
    "dataloader_persistent_workers": _NO_DATALOADER,
    "dataloader_prefetch_factor": _NO_DATALOADER,
    "dataloader_multiprocessing_context": _NO_DATALOADER,
    "dataloader_in_order": _NO_DATALOADER,
    "remove_unused_columns": "not needed: every dataset column other than prompt is passed to the reward functions",
    "label_names": _NOT_SFT,
    "train_sampling_strategy": "not supported: prompts are sampled in groups as TRL's RepeatSampler does",
    "length_column_name": _NOT_SFT,
    "ddp_find_unused_parameters": _SINGLE_PROCESS,
    "ddp_bucket_cap_mb": _SINGLE_PROCESS,
    "ddp_broadcast_buffers": _SINGLE_PROCESS,
    "ddp_static_graph": _SINGLE_PROCESS,
    "ddp_backend": _SINGLE_PROCESS,
    "ddp_timeout": _SINGLE_PROCESS,
    "fsdp": _SINGLE_PROCESS,
    "fsdp_config": _SINGLE_PROCESS,
    "deepspeed": _SINGLE_PROCESS,
    "ds3_gather_for_generation": _SINGLE_PROCESS,
    "local_rank": _SINGLE_PROCESS,
    "debug": "not supported: remove it",
    "skip_memory_metrics": "not needed: fusedrl always logs memory/peak_gb",
    "do_train": "not needed: call trainer.train()",
    "do_eval": _NO_EVAL_LOOP,
    "do_predict": _NO_EVAL_LOOP,
    "resume_from_checkpoint": "use `fusedrl train --resume RUN_DIR` (the trainer's checkpoint resume), not a config field",
    "model_init_kwargs": _LOAD_MODEL_YOURSELF,
    "trust_remote_code": _LOAD_MODEL_YOURSELF,
    "cast_lm_head_to_fp32": ("not needed: the fused lm-head op accumulates logits, log-softmax and gradients in float32; "
                             "remove it (or train with dtype='float32')"),
    "pad_to_multiple_of": "not supported: batches are padded to their longest row",
    "generation_kwargs": "not supported: use temperature, top_p, top_k, min_p and repetition_penalty",
    "chat_template_kwargs": "not supported: apply the chat template to the prompts yourself and pass strings",
    "cache_implementation": _ROLLOUT_ENGINE,
    "use_vllm": _ROLLOUT_ENGINE,
    "vllm_mode": _ROLLOUT_ENGINE,
    "vllm_model_impl": _ROLLOUT_ENGINE,
    "vllm_enable_sleep_mode": _ROLLOUT_ENGINE,
    "vllm_structured_outputs_regex": "not supported: constrain the output in your reward functions instead",
    "vllm_server_base_url": _ROLLOUT_ENGINE,
    "vllm_server_host": _ROLLOUT_ENGINE,
    "vllm_server_port": _ROLLOUT_ENGINE,
    "vllm_server_timeout": _ROLLOUT_ENGINE,
    "vllm_group_port": _ROLLOUT_ENGINE,
    "vllm_gpu_memory_utilization": _ROLLOUT_ENGINE,
    "vllm_max_model_length": _ROLLOUT_ENGINE,
    "vllm_tensor_parallel_size": _SINGLE_PROCESS,
    "use_transformers_continuous_batching": _ROLLOUT_ENGINE,
    "transformers_continuous_batching_config": _ROLLOUT_ENGINE,
    "use_transformers_paged": _ROLLOUT_ENGINE,
    "vllm_importance_sampling_cap": "TRL's deprecated name: use vllm_importance_sampling_clip_max",
    "vespo_k_pos": "loss_type='vespo' is not implemented: choose another loss_type and remove the vespo_* fields",
    "vespo_lambda_pos": "loss_type='vespo' is not implemented: choose another loss_type and remove the vespo_* fields",
    "vespo_k_neg": "loss_type='vespo' is not implemented: choose another loss_type and remove the vespo_* fields",
    "vespo_lambda_neg": "loss_type='vespo' is not implemented: choose another loss_type and remove the vespo_* fields",
    "multi_objective_aggregation": ("not supported: rewards are always weighted, summed, then normalised per group "
                                    "(TRL's default 'sum_then_normalize')"),
    "sync_ref_model": "not supported: the reference model stays the starting model (TR-DPO syncing is not implemented)",
    "ref_model_mixup_alpha": "not supported: the reference model stays the starting model",
    "ref_model_sync_steps": "not supported: the reference model stays the starting model",
    "top_entropy_quantile": "not supported: every completion token is trained on (TRL's default 1.0)",
    "entropy_coef": _ENTROPY_BONUS,
    "use_adaptive_entropy": _ENTROPY_BONUS,
    "entropy_coef_min": _ENTROPY_BONUS,
    "entropy_coef_max": _ENTROPY_BONUS,
    "entropy_coef_delta": _ENTROPY_BONUS,
    "entropy_target": _ENTROPY_BONUS,
    "max_tool_calling_iterations": "tool calling is not implemented: remove it (reward functions may call tools)",
    "off_policy_mask_threshold": "not supported: the off-policy sequence mask (OPSM) is not implemented; remove it",
    "log_multimodal": "vision models are not supported: remove it",
    "log_unique_prompts": "not supported: log_completions prints every sampled completion's prompt",
}


def not_supported_error(names) -> ValueError | None:
    """A ValueError naming each TRL field in `names` that fusedrl does not implement and what to do, else None."""
    found = [name for name in names if name in NOT_SUPPORTED]
    if not found:
        return None
    lines = "\n".join(f"  {name}: {NOT_SUPPORTED[name]}" for name in found)
    return ValueError(f"GRPOConfig: TRL field(s) that fusedrl does not implement (see docs/trl_config_fields.md):\n"
                      f"{lines}")


def markdown_table(supported_fields) -> str:
    """docs/trl_config_fields.md: every TRL 1.16.0 GRPOConfig field, supported or not (and what to do instead)."""
    supported_fields = set(supported_fields)
    lines = [
        f"# TRL {TRL_VERSION} GRPOConfig fields in fusedrl",
        "",
        "Generated by `python scripts/trl_config_table.py` from `python/fusedrl/train/trl_fields.py`; a test keeps it in",
        "step with `fusedrl.GRPOConfig` and TRL's own dataclass. *Supported* fields have TRL's name, meaning and",
        "default (see `GRPOConfig`'s docstring for the few deliberate differences); passing a *not supported* field to",
        "`GRPOConfig` raises a `ValueError` with the advice below.",
        "",
        f"{sum(f in supported_fields for f in TRL_GRPO_CONFIG_FIELDS)} supported, "
        f"{sum(f not in supported_fields for f in TRL_GRPO_CONFIG_FIELDS)} not supported, "
        f"{len(TRL_GRPO_CONFIG_FIELDS)} in all.",
        "",
        "| field | fusedrl | instead |",
        "| --- | --- | --- |",
    ]
    for name in TRL_GRPO_CONFIG_FIELDS:
        if name in supported_fields:
            lines.append(f"| `{name}` | supported | |")
        else:
            lines.append(f"| `{name}` | not supported | {NOT_SUPPORTED[name].replace('|', '/')} |")
    return "\n".join(lines) + "\n"
