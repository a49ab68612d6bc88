"""Model loading (HF causal LMs with LoRA/QLoRA via peft), backbone hidden states and lm-head access."""

from fusedrl.model.hidden import LmHead, forward_hidden, lm_head_of
from fusedrl.model.load import load_model
from fusedrl.model.lora import LoraConfig

__all__ = ["LmHead", "LoraConfig", "forward_hidden", "lm_head_of", "load_model"]
