"""Shared pieces of the trainer tests: a tiny word-level tokenizer and random Llama (fixtures).

TEMPORARY (trainer-loop helper): until `fusedrl.ops` exports `grpo_loss` and `selective_logp` (fixed API 1), the
real implementations are taken from their module `fusedrl.ops.grpo_loss` so the trainer's `from fusedrl.ops import
...` resolves. Remove this block once fusedrl/ops/__init__.py exports them.
"""

from __future__ import annotations

import fusedrl.ops

if not hasattr(fusedrl.ops, "selective_logp"):
    from fusedrl.ops.grpo_loss import grpo_loss as _grpo_loss, selective_logp as _selective_logp

    fusedrl.ops.grpo_loss = _grpo_loss
    fusedrl.ops.selective_logp = _selective_logp
