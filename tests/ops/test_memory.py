"""The fused op never holds N x V logits: its extra peak memory stays near one chunk, on CPU and CUDA."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

N, H, V = 4096, 8, 65536  # fp32 logits would be N * V * 4 bytes = 1 GiB, twice the budget
LOGITS_BYTES = N * V * 4
BUDGET_BYTES = 512 << 20  # the bound for extra peak memory

CPU_SCRIPT = textwrap.dedent(f"""
    import resource, torch
    from fusedrl.ops import grpo_loss
    torch.manual_seed(0)
    hidden = torch.randn(1, {N}, {H}, requires_grad=True)
    weight = torch.randn({V}, {H}) / {H} ** 0.5
    ids = torch.randint(0, {V}, (1, {N}))
    mask = torch.ones(1, {N}, dtype=torch.long)
    advantages = torch.ones(1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = grpo_loss(hidden, weight, ids, mask, advantages, loss_type="grpo", return_entropy=True)
    out.loss.backward()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert torch.isfinite(hidden.grad).all()
    print((after - before) * 1024)  # ru_maxrss is in KiB on Linux
""")


def test_cpu_peak_memory_is_bounded_by_a_chunk():
    result = subprocess.run([sys.executable, "-c", CPU_SCRIPT], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    extra = int(result.stdout.strip().splitlines()[-1])
    assert extra < BUDGET_BYTES, f"extra peak RSS {extra / 2**20:.0f} MiB; N x V logits would be {LOGITS_BYTES >> 20} MiB"


@pytest.mark.cuda
@pytest.mark.parametrize("trainable_head", [False, True], ids=["frozen", "trainable"])
def test_cuda_peak_memory_is_bounded_by_a_chunk(trainable_head):
    from fusedrl.ops import grpo_loss

    n, h, v = 32768, 64, 131072  # bf16 logits would be 8 GiB
    hidden = torch.randn(1, n, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(v, h, device="cuda") / h**0.5).bfloat16().requires_grad_(trainable_head)
    ids = torch.randint(0, v, (1, n), device="cuda")
    mask = torch.ones(1, n, dtype=torch.long, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = grpo_loss(hidden, weight, ids, mask, torch.ones(1, device="cuda"), loss_type="grpo")
    out.loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    grads = n * h * 2 + (v * h * 2 if trainable_head else 0)  # the gradients themselves
    # one 256 MiB chunk + the (N, H) gradient direction + per-token vectors
    assert extra - grads < BUDGET_BYTES, f"extra peak {extra / 2**20:.0f} MiB"
