"""fusedrl.ops.grpo_loss against the float64 TRL-structured reference, for every loss type, importance level and
option; edge cases, errors, gradient accumulation, grad_output scaling and torch.compile."""

from __future__ import annotations

import itertools

import pytest
import torch

from fusedrl.ops import LOSS_TYPES, SAMPLER_CORRECTION_MODES, grpo_loss, selective_logp
from fusedrl.ops.reference import grpo_loss_reference, selective_logp_reference

from loss_inputs import completion_mask, lm_head_inputs

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
OPTION_SETS = {
    "plain": dict(),
    "epsilon_high": dict(epsilon=0.1, epsilon_high=0.28),
    "delta": dict(delta=1.5),
    "beta": dict(beta=0.04),
    "temperature_softcap": dict(temperature=0.8, logit_softcap=6.0),
    "dr_grpo_length": dict(max_completion_length=9),
    **{f"correction_{m}": dict(vllm_importance_sampling_correction=True, vllm_importance_sampling_mode=m,
                               vllm_importance_sampling_clip_min=0.5, vllm_importance_sampling_clip_max=1.6)
       for m in SAMPLER_CORRECTION_MODES},
    "correction_open_bounds": dict(vllm_importance_sampling_correction=True, vllm_importance_sampling_clip_max=None),
}


def make_batch(b, t, h, v, dtype=torch.float64, device="cpu", *, generator, on_policy=False, token_advantages=False):
    hidden, weight, ids, bias = lm_head_inputs(b * t, h, v, dtype, device, generator=generator)
    hidden = hidden.view(b, t, h)
    ids = ids.view(b, t)
    mask = completion_mask(b, t, generator, device)
    adv_shape = (b, t) if token_advantages else (b,)
    advantages = torch.randn(adv_shape, generator=generator, dtype=torch.float64).to(device)
    logp, _ = selective_logp_reference(hidden.double(), weight.double(), ids)
    # Old / reference / sampler logp near the current policy, so that ratios straddle the clip ranges.
    near = lambda s: (logp + s * torch.randn(b, t, generator=generator, dtype=torch.float64).to(device))  # noqa: E731
    return dict(hidden=hidden, weight=weight, ids=ids, mask=mask, advantages=advantages,
                old_logp=None if on_policy else near(0.3), ref_logp=near(0.2), sampling_logp=near(0.3))


def run(fn, batch, **options):
    hidden = batch["hidden"].detach().clone().requires_grad_()
    kw = dict(old_logp=batch["old_logp"], ref_logp=batch["ref_logp"], sampling_logp=batch["sampling_logp"])
    out = fn(hidden, batch["weight"], batch["ids"], batch["mask"], batch["advantages"], return_entropy=True,
             **kw, **options)
    out.loss.backward()
    return out, hidden.grad


def assert_matches_reference(batch, options, tol=1e-9, msg=""):
    ours, grad = run(grpo_loss, batch, chunk_size=5, **options)
    ref, ref_grad = run(grpo_loss_reference, batch, **options)
    scale = 1 + abs(float(ref.loss.detach()))
    assert abs(float(ours.loss.detach()) - float(ref.loss.detach())) <= tol * scale, msg
    torch.testing.assert_close(ours.logp, ref.logp, atol=tol, rtol=0, msg=msg)
    torch.testing.assert_close(ours.entropy, ref.entropy, atol=tol, rtol=0, msg=msg)
    torch.testing.assert_close(grad, ref_grad, atol=tol * (1 + float(ref_grad.abs().max())), rtol=0, msg=msg)
    assert set(ours.metrics) == set(ref.metrics), msg
    for key in ref.metrics:
        torch.testing.assert_close(ours.metrics[key], ref.metrics[key].to(ours.metrics[key]), atol=tol, rtol=0,
                                   msg=lambda m: f"{key}: {m} {msg}")
    for value in itertools.chain([ours.loss], ours.metrics.values()):
        assert torch.isfinite(value).all(), msg


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("option_set", list(OPTION_SETS))
def test_matches_trl_reference(loss_type, level, option_set, generator):
    options = dict(OPTION_SETS[option_set], loss_type=loss_type, importance_sampling_level=level)
    token_shaped = level == "token" or options.get("beta") or options.get("vllm_importance_sampling_mode", "").startswith("token")
    if loss_type == "luspo" and token_shaped:
        pytest.skip("TRL's luspo sums padded positions when the per-token loss is (B, T); see test_luspo_ignores_padding")
    batch = make_batch(5, 7, 6, 37, generator=generator)
    assert_matches_reference(batch, options, msg=f"seed {generator.initial_seed()}")


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_on_policy_and_token_advantages(loss_type, level, generator):
    if loss_type == "luspo":
        pytest.skip("with beta > 0 TRL's luspo sums padded positions; see test_luspo_ignores_padding")
    for on_policy, token_advantages in ((True, False), (False, True)):
        batch = make_batch(4, 6, 5, 29, generator=generator, on_policy=on_policy, token_advantages=token_advantages)
        assert_matches_reference(batch, dict(loss_type=loss_type, importance_sampling_level=level, beta=0.02),
                                 msg=f"seed {generator.initial_seed()}")


def test_on_policy_gradient_flows(generator):
    """old_logp=None: the ratio is 1 but the gradient is the policy gradient, not zero."""
    batch = make_batch(3, 4, 5, 17, generator=generator, on_policy=True)
    out, grad = run(grpo_loss, batch, loss_type="grpo")
    assert float(out.metrics["is_ratio/max"]) == 1.0 and float(out.metrics["is_ratio/min"]) == 1.0
    assert grad.abs().sum() > 0


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_no_active_tokens_gives_zero_loss_and_gradient(loss_type, level, generator):
    batch = make_batch(3, 4, 5, 17, generator=generator)
    batch["mask"] = torch.zeros_like(batch["mask"])
    out, grad = run(grpo_loss, batch, loss_type=loss_type, importance_sampling_level=level, beta=0.1,
                    vllm_importance_sampling_correction=True)
    assert float(out.loss) == 0.0
    assert torch.count_nonzero(grad) == 0
    assert all(torch.isfinite(v) for v in out.metrics.values())


def test_zero_advantages_and_single_token(generator):
    batch = make_batch(3, 1, 5, 17, generator=generator)  # T = 1
    batch["advantages"] = torch.zeros_like(batch["advantages"])
    out, grad = run(grpo_loss, batch, loss_type="dapo")
    assert float(out.loss) == 0.0 and torch.count_nonzero(grad) == 0
    assert_matches_reference(make_batch(4, 1, 5, 17, generator=generator), dict(loss_type="grpo", beta=0.1))


def test_luspo_ignores_padding(generator):
    """Values at padded positions (hidden, old/ref logp) cannot change luspo's loss, at token level with KL."""
    batch = make_batch(4, 6, 5, 23, generator=generator)
    options = dict(loss_type="luspo", importance_sampling_level="token", beta=0.05)
    base = run(grpo_loss, batch, **options)[0].loss
    pad = ~batch["mask"].bool()
    changed = dict(batch, hidden=torch.where(pad[..., None], batch["hidden"] * 7, batch["hidden"]),
                   old_logp=torch.where(pad, batch["old_logp"] - 5, batch["old_logp"]),
                   ref_logp=torch.where(pad, batch["ref_logp"] + 5, batch["ref_logp"]))
    assert pad.any()
    torch.testing.assert_close(run(grpo_loss, changed, **options)[0].loss, base)


@pytest.mark.parametrize("loss_type", ["dapo", "cispo"])
def test_gradient_accumulation_equals_one_big_batch(loss_type, generator):
    """dapo / cispo with num_items_in_batch = the accumulated batch's token count: micro-batch gradients sum to the
    gradient of one batch of twice the size."""
    batch = make_batch(6, 5, 4, 19, generator=generator)
    options = dict(loss_type=loss_type, beta=0.03)
    _, full_grad = run(grpo_loss, batch, **options)
    total = batch["mask"].sum()
    parts = []
    for rows in (slice(0, 2), slice(2, 6)):
        micro = {k: (v if k == "weight" else v[rows]) for k, v in batch.items()}
        parts.append(run(grpo_loss, micro, num_items_in_batch=total, **options)[1])
    torch.testing.assert_close(torch.cat(parts), full_grad)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_honours_grad_output(device, generator):
    batch = make_batch(3, 5, 6, 21, device=device, generator=generator)
    hidden = batch["hidden"].detach().clone().requires_grad_()
    args = (batch["weight"], batch["ids"], batch["mask"], batch["advantages"])
    grpo_loss(hidden, *args, old_logp=batch["old_logp"]).loss.backward()
    g1 = hidden.grad.clone()
    hidden.grad = None
    (grpo_loss(hidden, *args, old_logp=batch["old_logp"]).loss * -0.25).backward()
    torch.testing.assert_close(hidden.grad, -0.25 * g1)


def test_gradcheck_through_the_loss(generator):
    batch = make_batch(3, 4, 3, 7, generator=generator)
    weight = batch["weight"].clone().requires_grad_()
    hidden = batch["hidden"].clone().requires_grad_()

    def loss(h, w):
        return grpo_loss(h, w, batch["ids"], batch["mask"], batch["advantages"], old_logp=batch["old_logp"],
                         ref_logp=batch["ref_logp"], beta=0.1, loss_type="bnpo", importance_sampling_level="sequence",
                         temperature=0.9, chunk_size=5).loss

    assert torch.autograd.gradcheck(loss, (hidden, weight))


def test_selective_logp_matches_reference_without_grad(generator):
    batch = make_batch(3, 4, 5, 23, generator=generator)
    hidden = batch["hidden"].clone().requires_grad_()
    logp, entropy = selective_logp(hidden, batch["weight"], batch["ids"], temperature=0.7, return_entropy=True)
    ref_logp, ref_entropy = selective_logp_reference(batch["hidden"], batch["weight"], batch["ids"], temperature=0.7)
    assert not logp.requires_grad
    torch.testing.assert_close(logp, ref_logp)
    torch.testing.assert_close(entropy, ref_entropy)


def test_torch_compile_fullgraph(generator):
    batch = make_batch(3, 5, 6, 19, dtype=torch.float32, generator=generator)
    weight = batch["weight"]

    def step(hidden, ids, mask, advantages, old_logp):
        out = grpo_loss(hidden, weight, ids, mask, advantages, old_logp=old_logp, loss_type="grpo", return_entropy=True)
        return out.loss, out.logp, out.metrics["clip_ratio/region_mean"]

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    args = (batch["ids"], batch["mask"], batch["advantages"].float(), batch["old_logp"].float())
    h1 = batch["hidden"].clone().requires_grad_()
    h2 = batch["hidden"].clone().requires_grad_()
    eager = step(h1, *args)
    traced = compiled(h2, *args)
    for a, b in zip(eager, traced):
        torch.testing.assert_close(a, b)
    eager[0].backward()
    traced[0].backward()
    torch.testing.assert_close(h1.grad, h2.grad)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.errors
def test_errors_name_the_argument(device, generator):
    b = make_batch(2, 3, 4, 11, device=device, generator=generator)
    args = (b["hidden"], b["weight"], b["ids"], b["mask"], b["advantages"])
    cases = [
        (dict(loss_type="ppo"), "loss_type must be one of"),
        (dict(importance_sampling_level="batch"), "importance_sampling_level must be one of"),
        (dict(beta=0.1), "beta=0.1 needs ref_logp"),
        (dict(temperature=0.0), "temperature must be > 0"),
        (dict(vllm_importance_sampling_correction=True), "needs sampling_logp"),
        (dict(vllm_importance_sampling_mode="seq"), "vllm_importance_sampling_mode must be one of"),
        (dict(old_logp=torch.zeros(2, 4, dtype=torch.float64, device=device)), r"old_logp must be \(B, T\)"),
    ]
    for kwargs, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            grpo_loss(*args, **kwargs)
    with pytest.raises(ValueError, match="completion_ids must be int64"):
        grpo_loss(b["hidden"], b["weight"], b["ids"].int(), b["mask"], b["advantages"])
    with pytest.raises(ValueError, match=r"completion_mask must be \(B, T\)"):
        grpo_loss(b["hidden"], b["weight"], b["ids"], b["mask"][:, :2], b["advantages"])
    with pytest.raises(ValueError, match=r"advantages must be \(B,\)"):
        grpo_loss(b["hidden"], b["weight"], b["ids"], b["mask"], b["advantages"][:1])
    with pytest.raises(ValueError, match=f"lm_head_weight is on meta but hidden is on {device}"):
        grpo_loss(b["hidden"], b["weight"].to("meta"), b["ids"], b["mask"], b["advantages"])
    with pytest.raises(RuntimeError, match=r"target ids must lie in \[0, 11\)"):
        grpo_loss(b["hidden"], b["weight"], b["ids"] + 11, b["mask"], b["advantages"])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "cispo", "sapo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_cuda_low_precision_matches_float64_reference(dtype, loss_type, level, generator):
    """CUDA, low precision: loss and hidden gradient no worse than naive PyTorch in the same dtype (vs float64)."""
    batch = make_batch(6, 33, 64, 1031, dtype=dtype, device="cuda", generator=generator)
    options = dict(loss_type=loss_type, importance_sampling_level=level, beta=0.04)
    ours, grad = run(grpo_loss, batch, **options)
    naive, naive_grad = run(grpo_loss_reference, batch, **options)
    truth_batch = dict(batch, hidden=batch["hidden"].double(), weight=batch["weight"].double())
    truth, truth_grad = run(grpo_loss_reference, truth_batch, **options)
    eps = torch.finfo(dtype).eps
    loss_err, naive_loss_err = abs(float(ours.loss - truth.loss)), abs(float(naive.loss - truth.loss))
    assert loss_err <= 2 * naive_loss_err + 4 * eps * (1 + abs(float(truth.loss))), (loss_err, naive_loss_err)
    grad_err = (grad.double() - truth_grad).abs().max()
    naive_grad_err = (naive_grad.double() - truth_grad).abs().max()
    # plus fp32 accumulation noise of the length-V dot products, summed in another order than naive autograd
    allowance = (4 * eps + 1031 * torch.finfo(torch.float32).eps) * truth_grad.abs().max()
    assert grad_err <= 2 * naive_grad_err + allowance, (grad_err, naive_grad_err)
