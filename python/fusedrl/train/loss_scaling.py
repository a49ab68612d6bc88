"""How one micro-batch's GRPO-family loss is normalised under gradient accumulation, as TRL 1.16's GRPOTrainer does.

grpo, bnpo, dr_grpo, sapo and luspo are normalised within the micro-batch and divided by the number of
accumulation steps. dapo and cispo divide by a token count: TRL takes the active completion tokens of the whole
generation batch (`steps_per_generation` micro-batches) and rescales it to one accumulation window,
tokens x gradient_accumulation_steps / steps_per_generation; with steps_per_generation = gradient_accumulation_steps
(the default) that is the token count of the optimizer step's own micro-batches.
"""

from __future__ import annotations

from fusedrl.ops.options import PER_STEP_TOKEN_LOSSES as TOKEN_COUNT_NORMALISED_LOSSES


def micro_batch_normalisation(loss_type: str, *, generation_tokens: float, gradient_accumulation_steps: int,
                              steps_per_generation: int) -> tuple[float | None, float]:
    """-> (num_items_in_batch to pass to `fusedrl.ops.grpo_loss` (None: normalised within the micro-batch),
    the divisor to apply to the op's loss)."""
    if loss_type in TOKEN_COUNT_NORMALISED_LOSSES:
        tokens = max(float(generation_tokens), 1.0)
        return tokens * gradient_accumulation_steps / steps_per_generation, 1.0
    return None, float(gradient_accumulation_steps)
