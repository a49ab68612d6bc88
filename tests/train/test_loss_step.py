"""loss_step.optimizer_step: the schedule does not advance on a float16 step the loss scaler skipped."""

from __future__ import annotations

import torch
import transformers

from fusedrl.train.loss_step import optimizer_step
from fusedrl.train.optim import Precision


def test_scheduler_skips_with_the_skipped_float16_step():
    parameter = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    scheduler = transformers.get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=10)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    precision = Precision("cpu", torch.float16, scaler)

    scaler.scale(parameter.sum()).backward()  # as a training step does; then an overflowing gradient
    parameter.grad = torch.tensor([float("inf"), 1.0, 1.0])  # overflow: the scaler skips this step
    optimizer_step(optimizer, scheduler, precision, max_grad_norm=0.0)
    assert torch.equal(parameter.detach(), torch.ones(3)) and scheduler.last_epoch == 0
    assert scaler.get_scale() < 1024.0

    parameter.grad = None
    scaler.scale(parameter.sum()).backward()  # a finite (scaled) gradient: a real step
    optimizer_step(optimizer, scheduler, precision, max_grad_norm=0.0)
    assert not torch.equal(parameter.detach(), torch.ones(3)) and scheduler.last_epoch == 1
