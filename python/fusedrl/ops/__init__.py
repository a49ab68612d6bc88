"""The Python face of fusedrl's compiled ops (`torch.ops.fusedrl.*`)."""

from . import decode_attention as _decode_attention  # noqa: F401  registers the decode ops' fakes
from .grpo_loss import GRPOLossOutput, grpo_loss, grpo_loss_with_options, selective_logp
from .linear_logp import linear_logp
from .nf4 import NF4QuantState, NF4Shards, nf4_dequantize, nf4_lora_linear, nf4_quantize
from .options import LOSS_TYPES, IMPORTANCE_SAMPLING_LEVELS, SAMPLER_CORRECTION_MODES, LossOptions

__all__ = ["GRPOLossOutput", "grpo_loss", "grpo_loss_with_options", "selective_logp", "linear_logp", "LossOptions",
           "LOSS_TYPES", "IMPORTANCE_SAMPLING_LEVELS", "SAMPLER_CORRECTION_MODES", "NF4QuantState", "NF4Shards",
           "nf4_quantize", "nf4_dequantize", "nf4_lora_linear"]
