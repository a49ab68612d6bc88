"""LoRA handoff: the trainer's current peft adapter written straight into vLLM's LoRA slot buffers.

vLLM keeps, per LoRA-wrapped layer, `lora_a_stacked[s]` (max_loras, 1, max_rank, in) and `lora_b_stacked[s]`
(max_loras, 1, out_s, max_rank) for each output slice s of the layer (q | k | v for `qkv_proj`, gate | up for
`gate_up_proj`, one slice otherwise), and computes y += x A^T B^T with B already multiplied by the adapter's
scaling (vLLM's `LoRALayerWeights.optimize`). The adapter is registered once through vLLM's public API
(`add_lora` from a folder written by peft, then `pin_lora`, so it holds its slot for good); after every optimizer
step `push` copies each peft A into its slot and B * scaling into its slot, device to device, and resets vLLM's
prefix cache (cached KV blocks were computed with the previous adapter). The shared base weights are never touched:
nothing is merged.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch

ADAPTER_NAME = "fusedrl-policy"
ADAPTER_ID = 1
# vLLM's allowed max_lora_rank values (vllm.config.lora.MaxLoRARanks).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_max_lora_rank(rank: int) -> int:
    """The smallest rank vLLM accepts as max_lora_rank that holds an adapter of `rank`."""
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ValueError(f"LoRA rank {rank} exceeds vLLM's largest max_lora_rank {VLLM_LORA_RANKS[-1]}")


@dataclass
class _SliceCopy:
    """One (A, B) pair of a peft LoRA layer and the vLLM slot views it is written into."""

    lora_a: torch.Tensor  # peft (r, in)
    lora_b: torch.Tensor  # peft (out, r)
    scaling: float
    slot_a: torch.Tensor  # vLLM view (r, in)
    slot_b: torch.Tensor  # vLLM view (out, r)


def _peft_lora_layers(peft_model: torch.nn.Module, adapter: str) -> dict[str, Any]:
    """peft LoRA layers by the name of their module inside the transformers model (peft prefixes removed)."""
    layers = {}
    base = peft_model.get_base_model()
    for name, module in base.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if isinstance(lora_a, torch.nn.ModuleDict) and adapter in lora_a:
            layers[name] = module
    return layers


class LoraHandoff:
    """Registers the adapter in vLLM once, then writes the current adapter weights into its slot on `push`."""

    def __init__(self, llm: Any, peft_model: torch.nn.Module, adapter: str = "default") -> None:
        from vllm.lora.request import LoRARequest

        from fusedrl.rollout.vllm_setup import live_model, lora_adapter_manager

        self.llm = llm
        peft_config = peft_model.peft_config[adapter]
        if getattr(peft_config, "use_dora", False):
            raise ValueError("DoRA adapters cannot be handed to vLLM: use plain LoRA with fast_inference")
        if getattr(peft_config, "bias", "none") != "none":
            raise ValueError("LoRA with trainable biases would modify the shared base weights: use bias='none'")
        with tempfile.TemporaryDirectory(prefix="fusedrl-lora-") as folder:
            peft_model.save_pretrained(folder, selected_adapters=[adapter])
            saved = f"{folder}/{adapter}" if adapter != "default" else folder
            self.request = LoRARequest(ADAPTER_NAME, ADAPTER_ID, saved)
            llm.llm_engine.add_lora(self.request)
            llm.llm_engine.pin_lora(ADAPTER_ID)  # loads it (the folder may go afterwards) and keeps it in its slot
        self.manager = lora_adapter_manager(llm)
        self.slot = self._slot()
        self.copies = self._plan(peft_model, adapter, getattr(live_model(llm), "packed_modules_mapping", {}) or {})
        self.last_seconds = 0.0

    def _slot(self) -> int:
        try:
            return self.manager.lora_index_to_id.index(ADAPTER_ID)
        except ValueError:
            raise RuntimeError("vLLM did not activate the pinned fusedrl adapter in a LoRA slot") from None

    def _plan(self, peft_model: torch.nn.Module, adapter: str, packed: dict[str, list[str]]) -> list[_SliceCopy]:
        peft_layers = _peft_lora_layers(peft_model, adapter)
        copies: list[_SliceCopy] = []
        covered: set[str] = set()
        for vllm_name, vllm_layer in self.manager.modules.items():
            if not hasattr(vllm_layer, "lora_a_stacked"):
                continue
            parent, _, leaf = vllm_name.rpartition(".")
            slices = len(vllm_layer.lora_a_stacked)
            sub_leaves = packed.get(leaf, [leaf]) if slices > 1 else [leaf]
            if len(sub_leaves) != slices:
                raise RuntimeError(f"vLLM's {vllm_name} has {slices} LoRA slices but maps to {sub_leaves}")
            for index, sub_leaf in enumerate(sub_leaves):
                peft_name = f"{parent}.{sub_leaf}" if parent else sub_leaf
                layer = peft_layers.get(peft_name)
                if layer is None:
                    continue  # not adapted: vLLM zeroed this slice when the adapter was activated
                lora_a = layer.lora_A[adapter].weight
                lora_b = layer.lora_B[adapter].weight
                slot_a = vllm_layer.lora_a_stacked[index][self.slot, 0, : lora_a.shape[0], : lora_a.shape[1]]
                slot_b = vllm_layer.lora_b_stacked[index][self.slot, 0, : lora_b.shape[0], : lora_b.shape[1]]
                if slot_a.shape != lora_a.shape or slot_b.shape != lora_b.shape:
                    raise RuntimeError(
                        f"vLLM's LoRA slot for {peft_name} is A{tuple(slot_a.shape)} B{tuple(slot_b.shape)}, "
                        f"the adapter is A{tuple(lora_a.shape)} B{tuple(lora_b.shape)}"
                    )
                copies.append(_SliceCopy(lora_a, lora_b, float(layer.scaling[adapter]), slot_a, slot_b))
                covered.add(peft_name)
        missing = sorted(set(peft_layers) - covered)
        if missing:
            raise RuntimeError(f"vLLM has no LoRA slot for the adapted modules {missing[:4]}")
        return copies

    @torch.no_grad()
    def push(self) -> float:
        """Write the current adapter into vLLM's slot and reset the prefix cache; returns the seconds it took."""
        started = time.perf_counter()
        if self.manager.lora_index_to_id[self.slot] != ADAPTER_ID:
            raise RuntimeError("vLLM moved the pinned fusedrl adapter out of its LoRA slot")
        for copy in self.copies:
            copy.slot_a.copy_(copy.lora_a)
            copy.slot_b.copy_(copy.lora_b * copy.scaling)  # scaled in the adapter's dtype, rounded once
        if self.copies and self.copies[0].slot_a.is_cuda:
            torch.cuda.synchronize(self.copies[0].slot_a.device)
        self.llm.reset_prefix_cache()
        self.last_seconds = time.perf_counter() - started
        return self.last_seconds
