"""fusedrl.ops.grpo_loss against TRL 1.16.0's own GRPOTrainer code (trl_harness.py), not against our reference.

For each configuration, TRL's `_generate_and_score_completions` scores one generation batch (advantages, old and
reference logp, the sampler importance ratio, num_items_in_batch) and TRL's `_compute_loss` gives each micro-batch's
loss; autograd gives d loss / d hidden (and d loss / d lm-head weight for a trainable head). fusedrl gets the same
micro-batches, normalised for accumulation by `fusedrl.train.loss_scaling` (what the trainer uses), and must agree
to 1e-8 relative in float64 on CPU, and within bf16 rounding on CUDA. Metrics with TRL's names must agree too.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from fusedrl.ops import LOSS_TYPES, SAMPLER_CORRECTION_MODES, grpo_loss
from fusedrl.ops.reference import grpo_loss_reference
from fusedrl.train.loss_scaling import micro_batch_normalisation

B, T, H, V = 8, 7, 6, 29
LENGTHS = [7, 3, 1, 5, 7, 2, 6, 4]  # right-padded completions: a full one, a single token, odd lengths

# name -> (TRL GRPOConfig fields, policy moved since sampling?, trainable lm-head?)
SCENARIOS = {
    # on-policy, steps_per_generation = gradient_accumulation_steps: old logp is not computed
    "on_policy": (dict(gradient_accumulation_steps=2, steps_per_generation=2), False, False),
    # beta > 0 with TRL's default use_bias_correction_kl=True (a trainable head: the fused three-GEMM path)
    "on_policy_kl": (dict(gradient_accumulation_steps=2, steps_per_generation=2, beta=0.05), False, True),
    # generation every 2 micro-batches, optimizer step every 4: on-policy, dapo's token count rescaled
    "spg_below_ga": (dict(gradient_accumulation_steps=4, steps_per_generation=2, beta=0.05), False, False),
    # steps_per_generation > gradient_accumulation_steps: the policy moves, TRL computes old logp
    "off_policy_kl_uncorrected": (dict(gradient_accumulation_steps=2, steps_per_generation=4, beta=0.05,
                                       use_bias_correction_kl=False, epsilon_high=0.28, delta=1.6), True, True),
    "off_policy_two_iterations": (dict(gradient_accumulation_steps=2, steps_per_generation=2, num_iterations=2,
                                       beta=0.02, epsilon=0.1, temperature=0.7), True, False),
}
SAMPLER_MODES = {mode: dict(vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_min=0.7,
                            vllm_importance_sampling_clip_max=1.3) for mode in SAMPLER_CORRECTION_MODES}


def seed_of(*names) -> int:
    """A fixed seed per test case (stable across processes, unlike hash())."""
    return zlib.crc32("/".join(map(str, names)).encode())


def _inputs(seed, *, moved, move_scale=0.35, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, dtype=dtype, generator=g)
    weight = torch.randn(V, H, dtype=dtype, generator=g) * 0.8
    bias = torch.randn(V, dtype=dtype, generator=g) * 0.3
    noise = lambda scale: scale * torch.randn(B, T, H, dtype=dtype, generator=g)  # noqa: E731
    # by default, moves large enough that ratios leave [1 - eps, 1 + eps] (and pass delta) for some tokens
    hidden_old = hidden + noise(move_scale) if moved else hidden.clone()
    hidden_ref = hidden + noise(0.3)
    hidden_sampler = hidden_old + noise(0.15)
    completions = [torch.randint(2, V, (n,), generator=g).tolist() for n in LENGTHS]
    rewards = torch.randn(B, 2, generator=g)
    return dict(hidden=hidden, weight=weight, bias=bias, hidden_old=hidden_old, hidden_ref=hidden_ref,
                hidden_sampler=hidden_sampler, completions=completions, rewards=rewards)


def _sampler_logps(data, temperature, nan_rows=(1, 4)):
    """The sampler's logprobs as vLLM returns them (lists, None where it could not score a token)."""
    from trl_harness import logp_and_entropy

    ids = torch.tensor([c + [0] * (T - len(c)) for c in data["completions"]])
    logp, _ = logp_and_entropy(data["hidden_sampler"], data["weight"], data["bias"], ids, temperature=temperature)
    lists = [logp[i, :n].tolist() for i, n in enumerate(LENGTHS)]
    for row in nan_rows:
        lists[row][0] = None
    return lists


def run_trl(config, data, *, trainable_head, sampler=False):
    """-> (TRL's generation batch and its metrics, micro-batches, per-micro-batch losses, grads of hidden / weight
    summed over micro-batches, metrics per micro-batch)."""
    from trl_harness import generation_round, trl_trainer

    hidden = data["hidden"].clone().requires_grad_()
    weight = data["weight"].clone().requires_grad_(trainable_head)
    kwargs = dict(per_device_train_batch_size=B // config["steps_per_generation"], num_generations=4,
                  max_completion_length=T + 2, **config)
    if sampler:
        kwargs.update(vllm_importance_sampling_correction=True)
    trainer = trl_trainer(kwargs, hidden=hidden, hidden_old=data["hidden_old"], hidden_ref=data["hidden_ref"],
                          weight=weight, bias=data["bias"], completions=data["completions"],
                          sampling_logps=_sampler_logps(data, trainer_temperature(config)) if sampler else None,
                          rewards=data["rewards"], use_vllm_correction=sampler)
    generation_batch, micro_batches = generation_round(trainer, B)
    generation_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if v}
    losses, metrics = [], []
    for micro_batch in micro_batches:
        trainer._metrics["train"].clear()
        loss = trainer._compute_loss(trainer.model, micro_batch)
        loss.backward()
        losses.append(loss.detach())
        metrics.append({k: v[-1] for k, v in trainer._metrics["train"].items()})
    return (generation_batch, generation_metrics), micro_batches, losses, hidden.grad, weight.grad, metrics


def trainer_temperature(config):
    return config.get("temperature", 1.0)


def run_fusedrl(config, data, micro_batches, generation_batch, *, trainable_head, sampler_mode=None,
                device="cpu", dtype=torch.float64, reference=False):
    """fusedrl on TRL's micro-batches, normalised as fusedrl's trainer does -> (losses, grads, metrics)."""
    hidden = data["hidden"].to(device, dtype, copy=True).requires_grad_()  # a fresh leaf, never data's own tensor
    weight = data["weight"].to(device, dtype, copy=True).requires_grad_(trainable_head)
    bias = data["bias"].to(device, dtype)
    loss_type = config.get("loss_type", "dapo")
    spg, ga = config["steps_per_generation"], config["gradient_accumulation_steps"]
    num_items, divisor = micro_batch_normalisation(
        loss_type, generation_tokens=float(generation_batch["num_items_in_batch"]),
        gradient_accumulation_steps=ga, steps_per_generation=spg)
    losses, metrics = [], []
    per_micro = B // spg
    fn = grpo_loss_reference if reference else grpo_loss
    for index, mb in enumerate(micro_batches):
        rows = slice(index * per_micro, (index + 1) * per_micro)
        on = lambda key: None if mb.get(key) is None else mb[key].to(device)  # noqa: E731
        out = fn(hidden[rows], weight, mb["completion_ids"].to(device), mb["completion_mask"].to(device),
                 mb["advantages"].to(device), lm_head_bias=bias, old_logp=on("old_per_token_logps"),
                 ref_logp=on("ref_per_token_logps"), sampling_logp=on("sampling_per_token_logps"),
                 loss_type=loss_type, importance_sampling_level=config.get("importance_sampling_level", "token"),
                 epsilon=config.get("epsilon", 0.2), epsilon_high=config.get("epsilon_high"),
                 delta=config.get("delta"), beta=config.get("beta", 0.0),
                 use_bias_correction_kl=config.get("use_bias_correction_kl", True),
                 temperature=trainer_temperature(config), max_completion_length=T + 2,
                 num_items_in_batch=num_items, vllm_importance_sampling_correction=sampler_mode is not None,
                 return_entropy=True, **(SAMPLER_MODES[sampler_mode] if sampler_mode else {}))
        loss = out.loss / divisor
        loss.backward()
        losses.append(loss.detach())
        metrics.append({k: float(v) for k, v in out.metrics.items()})
    return losses, hidden.grad, weight.grad, metrics


def assert_close(ours, theirs, rel, what):
    ours, theirs = ours.double().cpu(), theirs.double().cpu()
    scale = max(float(theirs.abs().max()), 1e-12)
    err = float((ours - theirs).abs().max())
    assert err <= rel * scale, f"{what}: max |fusedrl - TRL| = {err:.3e}, TRL max |.| = {scale:.3e}"


TRL_METRICS = ("kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
               "clip_ratio/low_min", "clip_ratio/high_max", "cispo_clip_ratio")


def check_parity(config, data, *, trainable_head, sampler_mode=None):
    pytest.importorskip("trl", minversion="1.16.0")
    (generation_batch, generation_metrics), micro_batches, trl_losses, trl_grad, trl_weight_grad, trl_metrics = run_trl(
        config, data, trainable_head=trainable_head, sampler=sampler_mode is not None)
    losses, grad, weight_grad, metrics = run_fusedrl(config, data, micro_batches, generation_batch,
                                                     trainable_head=trainable_head, sampler_mode=sampler_mode)
    for index, (ours, theirs) in enumerate(zip(losses, trl_losses, strict=True)):
        assert_close(ours, theirs, 1e-8, f"loss of micro-batch {index}")
    assert_close(grad, trl_grad, 1e-8, "d loss / d hidden")
    if trainable_head:
        assert_close(weight_grad, trl_weight_grad, 1e-8, "d loss / d lm-head weight")
    for index, (ours, theirs) in enumerate(zip(metrics, trl_metrics, strict=True)):
        for name in TRL_METRICS:
            if name in theirs:
                assert name in ours, f"micro-batch {index}: TRL logs {name}, fusedrl does not"
                # TRL casts the clip indicators to float32 (`.float()`): float32 rounding
                assert ours[name] == pytest.approx(theirs[name], rel=1e-6, abs=1e-12), (index, name)
    return generation_metrics, metrics


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_and_gradient_match_trl(loss_type, level, scenario):
    fields, moved, trainable_head = SCENARIOS[scenario]
    config = dict(fields, loss_type=loss_type, importance_sampling_level=level)
    check_parity(config, _inputs(seed_of(loss_type, level, scenario), moved=moved), trainable_head=trainable_head)


@pytest.mark.parametrize("mode", SAMPLER_CORRECTION_MODES)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_sampler_correction_matches_trl(loss_type, level, mode):
    """vLLM-style sampler correction, with unscored (NaN) sampler logprobs, one micro-batch per generation batch so
    that TRL's batch-level sampler metrics are comparable."""
    config = dict(gradient_accumulation_steps=1, steps_per_generation=1, loss_type=loss_type,
                  importance_sampling_level=level, beta=0.03, **SAMPLER_MODES[mode])
    trainable_head = level == "token" and loss_type in ("dapo", "cispo", "sapo")
    generation_metrics, metrics = check_parity(config, _inputs(seed_of(loss_type, level, mode), moved=True),
                                               trainable_head=trainable_head, sampler_mode=mode)
    for stat in ("min", "mean", "max"):
        name = f"sampling/importance_sampling_ratio/{stat}"
        assert metrics[0][name] == pytest.approx(generation_metrics[name], rel=1e-6), name


def test_nan_sampler_logp_at_padding_keeps_the_loss_finite():
    """TRL pads sampler logprobs with 0; a sampler that pads with NaN must give the same loss (TRL zeroes NaN)."""
    data = _inputs(7, moved=True)
    ids = torch.tensor([c + [0] * (T - len(c)) for c in data["completions"]])
    mask = (torch.arange(T)[None] < torch.tensor(LENGTHS)[:, None]).long()
    sampling = torch.randn(B, T, dtype=torch.float64) * 0.1 - 2.0
    padded_nan = torch.where(mask.bool(), sampling, torch.nan)
    padded_zero = torch.where(mask.bool(), sampling, 0.0)
    advantages = torch.randn(B, dtype=torch.float64)
    for mode in SAMPLER_CORRECTION_MODES:
        for level in ("token", "sequence"):
            results = []
            for sampling_logp in (padded_nan, padded_zero):
                hidden = data["hidden"].clone().requires_grad_()
                out = grpo_loss(hidden, data["weight"], ids, mask, advantages, old_logp=sampling + 0.05,
                                sampling_logp=sampling_logp, vllm_importance_sampling_correction=True,
                                vllm_importance_sampling_mode=mode, importance_sampling_level=level)
                out.loss.backward()
                results.append((out.loss.detach(), hidden.grad, out.metrics))
            (loss_nan, grad_nan, metrics_nan), (loss_zero, grad_zero, _) = results
            assert torch.isfinite(loss_nan) and torch.isfinite(grad_nan).all(), (mode, level)
            assert torch.equal(loss_nan, loss_zero) and torch.equal(grad_nan, grad_zero), (mode, level)
            assert all(math.isfinite(float(v)) for v in metrics_nan.values()), (mode, level)


def fusedrl_round(config, data):
    """TRL's generation-round outputs built with fusedrl (float64) instead of TRL: for machines without TRL (the
    GPU machine). The CPU tests above prove these equal TRL's for the same configurations."""
    from fusedrl.ops import selective_logp
    from fusedrl.train.advantages import aggregate_rewards, compute_advantages

    ids = torch.tensor([c + [0] * (T - len(c)) for c in data["completions"]])
    mask = (torch.arange(T)[None] < torch.tensor(LENGTHS)[:, None]).long()
    logp = lambda hidden: selective_logp(hidden, data["weight"], ids, lm_head_bias=data["bias"],  # noqa: E731
                                         temperature=trainer_temperature(config))[0]
    advantages, _ = compute_advantages(aggregate_rewards(data["rewards"]), 4, "group")
    batch = dict(completion_ids=ids, completion_mask=mask, advantages=advantages,
                 num_items_in_batch=mask.sum())
    if config.get("beta", 0.0):
        batch["ref_per_token_logps"] = logp(data["hidden_ref"])
    generate_every = config["steps_per_generation"] * config.get("num_iterations", 1)
    if config["gradient_accumulation_steps"] % generate_every != 0:
        batch["old_per_token_logps"] = logp(data["hidden_old"])
    per_micro = B // config["steps_per_generation"]
    micro_batches = [{k: (v[i * per_micro:(i + 1) * per_micro] if v.dim() else v) for k, v in batch.items()}
                     for i in range(config["steps_per_generation"])]
    return batch, micro_batches


@pytest.mark.cuda
@pytest.mark.parametrize("scenario", ["on_policy_kl", "off_policy_kl_uncorrected", "spg_below_ga"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_cuda_bfloat16_matches_trl(loss_type, level, scenario):
    """The CUDA kernels in bf16 against the float64 truth: no further from it than naive bf16 PyTorch on the same
    device, plus bf16 rounding noise (the fused path rounds logits and gradients once per chunk). The truth is TRL's
    own loss where TRL is installed; elsewhere (the GPU machine has no TRL) fusedrl's float64 CPU op, which the CPU
    tests above prove equal to TRL's for these configurations."""
    fields, moved, trainable_head = SCENARIOS[scenario]
    config = dict(fields, loss_type=loss_type, importance_sampling_level=level)
    # Small policy moves: ratios stay away from the clip bounds, where a bf16 rounding could flip a clipping decision
    # (a discontinuity of the loss, not an error of the kernels; the CPU tests cover clipping exactly).
    data = _inputs(seed_of(loss_type, level, scenario, "cuda"), moved=moved, move_scale=0.03)
    try:
        import trl  # noqa: F401
        (generation_batch, _), micro_batches, truth_losses, truth_grad, truth_weight_grad, _ = run_trl(
            config, data, trainable_head=trainable_head)
    except ImportError:
        generation_batch, micro_batches = fusedrl_round(config, data)
        truth_losses, truth_grad, truth_weight_grad, _ = run_fusedrl(config, data, micro_batches, generation_batch,
                                                                     trainable_head=trainable_head)
    kwargs = dict(trainable_head=trainable_head, device="cuda", dtype=torch.bfloat16)
    losses, grad, weight_grad, _ = run_fusedrl(config, data, micro_batches, generation_batch, **kwargs)
    naive_losses, naive_grad, naive_weight_grad, _ = run_fusedrl(config, data, micro_batches, generation_batch,
                                                                 reference=True, **kwargs)
    eps = torch.finfo(torch.bfloat16).eps
    for ours, naive, truth in zip(losses, naive_losses, truth_losses, strict=True):
        err, naive_err = abs(float(ours) - float(truth)), abs(float(naive) - float(truth))
        assert err <= 2 * naive_err + 4 * eps * (1 + abs(float(truth))), (err, naive_err)
    pairs = [(grad, naive_grad, truth_grad)] + ([(weight_grad, naive_weight_grad, truth_weight_grad)]
                                                if trainable_head else [])
    for ours, naive, truth in pairs:
        err = float((ours.double().cpu() - truth).abs().max())
        naive_err = float((naive.double().cpu() - truth).abs().max())
        assert err <= 2 * naive_err + 8 * eps * float(truth.abs().max()), (err, naive_err)
