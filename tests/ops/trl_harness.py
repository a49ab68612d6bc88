"""TRL 1.16.0's own GRPOTrainer code, run without a model: the reference of tests/ops/test_trl_parity.py.

A GRPOTrainer is built with `object.__new__` (no `__init__`, so no model, tokenizer, vLLM or dataloader) and given
the attributes its `_generate_and_score_completions` and `_compute_loss` read. Three methods are replaced:
- `_generate` returns fixed prompts / completions / sampler logprobs (what vLLM would return);
- `_calculate_rewards` returns fixed rewards (TRL turns them into advantages itself);
- `_get_per_token_logps_and_entropies` computes float64 logp and entropy of the completion tokens from hidden states
  and an lm-head, exactly what TRL's fused lm-head returns: log_softmax(softcap(hidden @ W^T + b) / temperature).
Everything else (old-logp rule, sampler importance ratio with its NaN handling, advantages, `num_items_in_batch`,
the split into `steps_per_generation` micro-batches, the loss, its normalisation and metrics) is TRL's code.

Row identity: every prompt is one token, the row's index, so the logp stub knows which hidden rows it is scoring.
Which hidden states: the reference sentinel -> `hidden_ref`; the policy without grad (TRL's generation-time "old"
logp) -> `hidden_old`; the policy with grad (the loss) -> `hidden`, the leaf whose gradient the tests compare.
"""

from __future__ import annotations

import collections

import torch


class _SingleProcessAccelerator:
    """The accelerate calls TRL makes, for one process: gathers and reductions are the identity."""

    num_processes = 1
    process_index = 0
    device = torch.device("cpu")
    sync_gradients = True

    def gather(self, tensor):
        return tensor.reshape(1) if tensor.dim() == 0 else tensor

    gather_for_metrics = gather

    def reduce(self, tensor, reduction="sum"):
        return tensor

    def unwrap_model(self, model):
        return model


class _Model(torch.nn.Module):
    """Stands in for the policy: TRL only reads `.training` and the gradient-checkpointing flag."""

    is_gradient_checkpointing = False


class _Tokenizer:
    pad_token_id = 0


def _nested_logs():
    return {"prompt": [], "completion": [], "rewards": collections.defaultdict(list), "advantages": [],
            "extra": collections.defaultdict(list), "images": []}


def logp_and_entropy(hidden, weight, bias, ids, *, temperature, logit_softcap=None):
    """float64 per-token logp and entropy of `ids` (B, T) from hidden (B, T, H): what TRL's fused lm-head computes."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    if logit_softcap is not None:
        logits = logit_softcap * torch.tanh(logits / logit_softcap)
    logprobs = torch.log_softmax(logits / temperature, dim=-1)
    return logprobs.gather(-1, ids.unsqueeze(-1)).squeeze(-1), -(logprobs.exp() * logprobs).sum(-1)


def trl_trainer(config_kwargs: dict, *, hidden, hidden_old, hidden_ref, weight, bias, completions,
                sampling_logps=None, rewards, logit_softcap=None, use_vllm_correction=False):
    """A TRL 1.16.0 GRPOTrainer (no __init__) that scores the given completions; see the module docstring.

    completions: list of B lists of token ids; sampling_logps: None or B lists of floats (None entries = NaN,
    as vLLM returns them); rewards: (B, n_funcs) float tensor.
    """
    from trl import GRPOConfig
    from trl.trainer.grpo_trainer import GRPOTrainer

    args = GRPOConfig(output_dir="/nonexistent-trl-parity", report_to=[], use_cpu=True, bf16=False,
                      logging_strategy="no", save_strategy="no", **config_kwargs)
    trainer = object.__new__(GRPOTrainer)
    model = _Model()
    model.train()
    ref_model = _Model()
    state = dict(
        args=args, model=model, ref_model=ref_model if args.beta != 0.0 else None,
        accelerator=_SingleProcessAccelerator(), processing_class=_Tokenizer(), _tokenizer=_Tokenizer(),
        environment_factories=None, environments=None, tools=None, pad_to_multiple_of=None, eos_token_ids=[1],
        mask_truncated_completions=False, num_iterations=args.num_iterations, num_generations=args.num_generations,
        num_generations_eval=args.num_generations, use_vllm=use_vllm_correction,
        vllm_importance_sampling_correction=args.vllm_importance_sampling_correction,
        vllm_importance_sampling_mode=args.vllm_importance_sampling_mode,
        vllm_importance_sampling_clip_min=args.vllm_importance_sampling_clip_min,
        vllm_importance_sampling_clip_max=args.vllm_importance_sampling_clip_max,
        beta=args.beta, loss_type=args.loss_type, importance_sampling_level=args.importance_sampling_level,
        epsilon_low=args.epsilon, epsilon_high=args.epsilon_high if args.epsilon_high is not None else args.epsilon,
        max_completion_length=args.max_completion_length, scale_rewards=args.scale_rewards,
        multi_objective_aggregation=args.multi_objective_aggregation, top_entropy_quantile=1.0,
        off_policy_mask_threshold=None, aux_loss_enabled=False, router_aux_loss_coef=0.0,
        _entropy_bonus_enabled=False, use_adaptive_entropy=False, entropy_coef=0.0, log_multimodal=False,
        reward_weights=torch.ones(rewards.shape[1], dtype=torch.float32),
        reward_func_names=[f"reward_{i}" for i in range(rewards.shape[1])],
        current_gradient_accumulation_steps=args.gradient_accumulation_steps,
        _metrics={"train": collections.defaultdict(list), "eval": collections.defaultdict(list)},
        _logs=_nested_logs(), _pending_extra_logs={}, _pending_metrics={}, _step=0, _buffered_inputs=None,
        temperature=args.temperature,
    )
    for name, value in state.items():
        trainer.__dict__[name] = value

    def generate(prompts):
        prompt_ids = [[int(p)] for p in prompts]  # the row index, so the logp stub knows the row
        completion_texts = [" ".join(map(str, ids)) for ids in completions]
        return prompt_ids, [list(ids) for ids in completions], None, completion_texts, sampling_logps, {}, None, []

    def calculate_rewards(inputs, prompts, completions_, completion_ids_list):
        return rewards.to(torch.float32)  # as TRL's own _calculate_rewards

    def per_token_logps_and_entropies(model_, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                      compute_entropy=False, compute_aux_loss=False, **_multimodal):
        rows = input_ids[:, 0]
        if model_ is ref_model:
            source = hidden_ref
        elif not torch.is_grad_enabled():
            source = hidden_old
        else:
            source = hidden
        ids = input_ids[:, -logits_to_keep:]
        logp, entropy = logp_and_entropy(source[rows, :logits_to_keep], weight, bias, ids,
                                         temperature=args.temperature, logit_softcap=logit_softcap)
        keep = attention_mask[:, -logits_to_keep:].bool()
        # TRL's fused head returns 0 at unscored positions (label -100)
        return (torch.where(keep, logp, 0.0), torch.where(keep, entropy, 0.0) if compute_entropy else None, None)

    trainer.__dict__["_generate"] = generate
    trainer.__dict__["_calculate_rewards"] = calculate_rewards
    trainer.__dict__["_get_per_token_logps_and_entropies"] = per_token_logps_and_entropies
    return trainer


def generation_round(trainer, batch_size: int):
    """TRL's `_generate_and_score_completions` on prompts 0..B-1, split (unshuffled) into the micro-batches
    TRL's `_prepare_inputs` would hand to `_compute_loss`."""
    from trl.trainer.utils import split_tensor_dict

    inputs = [{"prompt": str(i)} for i in range(batch_size)]
    generation_batch = trainer._generate_and_score_completions(inputs)
    return generation_batch, split_tensor_dict(generation_batch, trainer.args.steps_per_generation)
