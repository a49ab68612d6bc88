"""Trainable lm-head, token-level losses: gradients of hidden, weight and bias computed in the forward pass
(fusedrl::fused_linear_token_loss) match the float64 TRL-structured reference, honour grad_output and pass
gradcheck; ineligible configurations take the generic path."""

from __future__ import annotations

import pytest
import torch

from fusedrl.ops import grpo_loss
from fusedrl.ops.options import LossOptions
from fusedrl.ops.reference import grpo_loss_reference
from fusedrl.ops.trainable_head import LOSS_KINDS, eligible

from test_grpo_loss import make_batch

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
OPTIONS = {
    "plain": dict(),
    "clip_delta": dict(epsilon=0.1, epsilon_high=0.28, delta=1.2),
    "beta": dict(beta=0.05),
    "temperature_softcap": dict(temperature=0.8, logit_softcap=5.0),
    "correction_token": dict(vllm_importance_sampling_correction=True, vllm_importance_sampling_mode="token_mask",
                             vllm_importance_sampling_clip_min=0.5, vllm_importance_sampling_clip_max=1.6),
    "correction_sequence": dict(vllm_importance_sampling_correction=True,
                                vllm_importance_sampling_mode="sequence_truncate", vllm_importance_sampling_clip_max=1.3),
    "dr_grpo_length": dict(max_completion_length=11),
}


def grads(fn, batch, bias, scale=1.0, **options):
    hidden = batch["hidden"].detach().clone().requires_grad_()
    weight = batch["weight"].detach().clone().requires_grad_()
    bias = bias.detach().clone().requires_grad_()
    out = fn(hidden, weight, batch["ids"], batch["mask"], batch["advantages"], lm_head_bias=bias,
             old_logp=batch["old_logp"], ref_logp=batch["ref_logp"], sampling_logp=batch["sampling_logp"],
             return_entropy=True, **options)
    (out.loss * scale).backward()
    return out, (hidden.grad, weight.grad, bias.grad)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss_type", sorted(LOSS_KINDS))
@pytest.mark.parametrize("option_set", list(OPTIONS))
def test_forward_gradients_match_reference(device, loss_type, option_set, generator):
    options = dict(OPTIONS[option_set], loss_type=loss_type)
    assert eligible(LossOptions(**options), old_logp=torch.zeros(1), dtype=torch.float64)
    batch = make_batch(5, 7, 6, 37, device=device, generator=generator)
    bias = (torch.randn(37, generator=generator, dtype=torch.float64) * 0.5).to(device)
    ours, our_grads = grads(grpo_loss, batch, bias, scale=-1.7, chunk_size=6, **options)
    ref, ref_grads = grads(grpo_loss_reference, batch, bias, scale=-1.7, **options)
    seed = generator.initial_seed()
    # float64 throughout; SAPO's reference builds its temperatures as float32 scalars (as TRL does): ~1e-9 apart
    tol = 1e-7 if loss_type == "sapo" else 1e-10
    assert abs(float(ours.loss.detach()) - float(ref.loss.detach())) <= tol, seed
    for name, mine, theirs in zip(("hidden", "weight", "bias"), our_grads, ref_grads):
        torch.testing.assert_close(mine, theirs, atol=tol * (1 + float(theirs.abs().max())), rtol=0,
                                   msg=lambda m: f"grad {name}: {m} (seed {seed})")
    assert set(ours.metrics) == set(ref.metrics)
    torch.testing.assert_close(ours.logp, ref.logp.detach())


def test_on_policy_and_no_active_tokens(generator):
    batch = make_batch(4, 5, 6, 23, generator=generator, on_policy=True)
    bias = torch.zeros(23, dtype=torch.float64)
    _, our_grads = grads(grpo_loss, batch, bias, loss_type="grpo", beta=0.02)
    _, ref_grads = grads(grpo_loss_reference, batch, bias, loss_type="grpo", beta=0.02)
    for mine, theirs in zip(our_grads, ref_grads):
        torch.testing.assert_close(mine, theirs)
    batch["mask"] = torch.zeros_like(batch["mask"])
    out, none_grads = grads(grpo_loss, batch, bias, loss_type="dapo", beta=0.1)
    assert float(out.loss) == 0.0 and all(torch.count_nonzero(g) == 0 for g in none_grads)


def test_gradcheck(generator):
    batch = make_batch(3, 4, 3, 7, generator=generator)
    weight = batch["weight"].clone().requires_grad_()
    hidden = batch["hidden"].clone().requires_grad_()
    bias = torch.randn(7, dtype=torch.float64, generator=generator).requires_grad_()

    def loss(h, w, b):
        return grpo_loss(h, w, batch["ids"], batch["mask"], batch["advantages"], lm_head_bias=b,
                         old_logp=batch["old_logp"], ref_logp=batch["ref_logp"], beta=0.1, loss_type="dapo",
                         temperature=0.9, chunk_size=5).loss

    assert torch.autograd.gradcheck(loss, (hidden, weight, bias))


def test_ineligible_configurations_use_the_generic_path():
    fp32 = torch.float32
    assert not eligible(LossOptions(importance_sampling_level="sequence"), old_logp=None, dtype=fp32)
    assert not eligible(LossOptions(loss_type="luspo", importance_sampling_level="sequence"), old_logp=None,
                        dtype=fp32)
    assert not eligible(LossOptions(vllm_importance_sampling_correction=True), old_logp=None, dtype=fp32)
    assert not eligible(LossOptions(), old_logp=None, dtype=torch.float16)
    assert eligible(LossOptions(vllm_importance_sampling_correction=True), old_logp=torch.zeros(1), dtype=fp32)
    assert eligible(LossOptions(), old_logp=None, dtype=torch.bfloat16)
    assert eligible(LossOptions(loss_type="luspo"), old_logp=None, dtype=fp32)  # token level: masked sum / B


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device, generator):
    n, h, v = 7, 5, 13
    g = generator
    hidden = torch.randn(n, h, dtype=torch.float64, generator=g).to(device)
    weight = torch.randn(v, h, dtype=torch.float64, generator=g).to(device)
    bias = torch.randn(v, dtype=torch.float64, generator=g).to(device)
    targets = torch.randint(0, v, (n,), generator=g).to(device)
    per_token = lambda: torch.rand(n, dtype=torch.float64, generator=g).to(device)  # noqa: E731
    torch.library.opcheck(torch.ops.fusedrl.fused_linear_token_loss.default,
                          (hidden, weight, bias, targets, 0.9, 4.0, True, per_token() - 2, per_token(), per_token() - 2,
                           per_token(), per_token(), 0, 0.2, 0.28, 1.5, 1.0, 1.05, True, [True, True, True], 3))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])  # float16: the generic path
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "sapo"])
def test_cuda_low_precision_no_worse_than_naive(dtype, loss_type, generator):
    """bf16/fp16/fp32 on CUDA: gradients of all three inputs no worse than naive autograd in the same dtype
    (both against float64), plus the rounding of the gradients to the dtype once per chunk."""
    batch = make_batch(6, 33, 64, 1031, dtype=dtype, device="cuda", generator=generator)
    bias = (torch.randn(1031, generator=generator) * 0.5).to("cuda", dtype)
    options = dict(loss_type=loss_type, beta=0.04)
    _, ours = grads(grpo_loss, batch, bias, chunk_size=64, **options)
    _, naive = grads(grpo_loss_reference, batch, bias, **options)
    truth_batch = dict(batch, hidden=batch["hidden"].double(), weight=batch["weight"].double())
    _, truth = grads(grpo_loss_reference, truth_batch, bias.double(), **options)
    chunks = -(-6 * 33 // 64)
    for name, mine, theirs, exact in zip(("hidden", "weight", "bias"), ours, naive, truth):
        err, naive_err = (mine.double() - exact).abs().max(), (theirs.double() - exact).abs().max()
        # one rounding to the dtype per chunk (+2 for d logp / d raw and the GEMM output), plus the fp32
        # accumulation noise of a length-V dot product (cuBLAS sums in another order than naive autograd)
        rounding = ((chunks + 2) * torch.finfo(dtype).eps + 1031 * torch.finfo(torch.float32).eps) * exact.abs().max()
        assert err <= 2 * naive_err + rounding, f"grad {name}: {err} vs naive {naive_err} (seed {generator.initial_seed()})"


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_with_float32_parameters(device, generator):
    """bf16 autocast over float32 hidden and head (a LoRA or fp16-style setup): the head runs in bf16 and the
    gradients arrive in float32, close to naive autograd under the same autocast."""
    batch = make_batch(4, 6, 16, 53, dtype=torch.float32, device=device, generator=generator)
    bias = torch.zeros(53, device=device)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        _, ours = grads(grpo_loss, batch, bias, loss_type="dapo", beta=0.02)
    naive_batch = dict(batch, hidden=batch["hidden"].bfloat16(), weight=batch["weight"].bfloat16())
    _, naive = grads(grpo_loss_reference, naive_batch, bias.bfloat16(), loss_type="dapo", beta=0.02)
    for mine, theirs in zip(ours, naive):
        assert mine.dtype == torch.float32 and torch.isfinite(mine).all()
        scale = float(theirs.float().abs().max())
        torch.testing.assert_close(mine, theirs.float(), atol=0.05 * scale, rtol=0)
