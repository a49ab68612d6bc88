"""peft LoRA over `NF4Linear`: the layer class peft builds, and the config registration that makes peft build it.

`NF4LoraLinear` follows peft's LoRA layer conventions (`lora_A` / `lora_B` ModuleDicts of nn.Linear, `scaling`,
`lora_dropout`, `merge` / `unmerge`, adapter state-dict names `...q_proj.lora_A.default.weight`), so `save_lora`,
`PeftModel.from_pretrained` and vLLM read its adapters like any other peft LoRA. Its forward is one call of the
fused `fusedrl.ops.nf4_lora_linear` (y = x @ dequant(W).T + scaling * (x @ A.T) @ B.T + bias) when one plain adapter
is active and no dropout applies; LoRA dropout in training, several active adapters or a trainable base bias
take the slower composed path (NF4 matmul, then each adapter's branch on its dropped-out input, as peft does).

peft finds the class through its custom-module dispatch: `nf4_lora_config(peft_config, model)` registers
NF4Linear -> NF4LoraLinear on the config and spells "all-linear" out as the module names (peft's own "all-linear"
only looks for torch.nn.Linear). Call it on every `peft.LoraConfig` meant for a model holding NF4Linear layers,
including one read back from an adapter folder before `PeftModel.from_pretrained`.

Merging dequantizes: `merge()` swaps the NF4 base for a dense nn.Linear in the compute dtype holding
dequant(W) + B @ A * scaling (computed in float32, rounded once) and keeps the NF4 layer aside; `unmerge()` puts the
original NF4 layer back, bit-exact. So `merge_and_unload()` yields a plain 16-bit transformers model.
"""

from __future__ import annotations

from typing import Any

import peft
import torch
from peft.tuners.lora import LoraLayer

from fusedrl.nn.nf4_linear import NF4Linear
from fusedrl.ops.nf4 import nf4_lora_linear


class NF4LoraLinear(torch.nn.Module, LoraLayer):
    """A peft LoRA layer whose base layer is an `NF4Linear` (plain LoRA; DoRA and other variants are refused)."""

    fuses_lora = True  # its own forward runs base + adapter in one op: callers should not split it

    def __init__(
        self,
        base_layer: torch.nn.Module,
        adapter_name: str,
        config: peft.LoraConfig,
        r: int = 0,
        lora_alpha: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        self.fan_in_fan_out = False
        self._nf4_base: NF4Linear | None = None  # the quantized base while a dense merged copy stands in for it
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def _get_in_out_features(self, module: torch.nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def resolve_lora_variant(self, *, config: peft.LoraConfig, **kwargs: Any) -> None:
        variants = {
            "use_dora": bool(getattr(config, "use_dora", False)),
            "alora_invocation_tokens": getattr(config, "alora_invocation_tokens", None) is not None,
            "arrow_config": getattr(config, "arrow_config", None) is not None,
            "velora_config": getattr(config, "velora_config", None) is not None,
        }
        requested = sorted(name for name, on in variants.items() if on)
        if requested:
            raise ValueError(
                f"NF4LoraLinear supports plain LoRA only; the peft config asks for {requested} "
                "(unset them, or load the model without load_in_4bit)"
            )
        return None

    # -----------------------------------------------------------------------------------------------------------
    # forward
    # -----------------------------------------------------------------------------------------------------------

    def _live_adapters(self) -> list[str]:
        return [name for name in self.active_adapters if name in self.lora_A]

    def _fused_applies(self, adapters: list[str]) -> bool:
        if len(adapters) != 1 or self.lora_bias.get(adapters[0], False):
            return False
        dropout = self.lora_dropout[adapters[0]]
        no_dropout = isinstance(dropout, torch.nn.Identity) or not self.training or dropout.p == 0.0
        base_bias = self.get_base_layer().bias
        return no_dropout and (base_bias is None or not base_bias.requires_grad)

    def _fused_call(self, x: torch.Tensor) -> torch.Tensor | None:
        """The fused op's result when the plain case holds (one active adapter, no dropout in effect, no adapter or
        trainable base bias, not merged, not disabled), else None. Reads the module dictionaries directly: this runs
        once per projection per step, and peft's generic helpers cost more host time than a decode step's kernel."""
        if self._disable_adapters or self.merged_adapters:
            return None
        active = self._active_adapter
        name = active if isinstance(active, str) else (active[0] if len(active) == 1 else None)
        modules = self._modules
        lora_A = modules["lora_A"]._modules.get(name) if name is not None else None
        if lora_A is None or self.lora_bias.get(name, False):
            return None
        dropout = modules["lora_dropout"]._modules[name]
        if self.training and not isinstance(dropout, torch.nn.Identity) and dropout.p != 0.0:
            return None
        base = modules["base_layer"]
        if type(base) is not NF4Linear:
            return None
        bias = base._parameters.get("bias")
        if bias is not None and bias.requires_grad:
            return None
        return nf4_lora_linear(
            x,
            base._buffers["weight"],
            base.quant_state,
            lora_A._parameters["weight"],
            modules["lora_B"]._modules[name]._parameters["weight"],
            self.scaling[name],
            None if bias is None else bias.to(x.dtype),
        )

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not args and not kwargs:
            fused = self._fused_call(x)
            if fused is not None:
                return fused
        self._check_forward_args(x, *args, **kwargs)
        if kwargs.pop("adapter_names", None) is not None:
            raise NotImplementedError("NF4LoraLinear does not support mixed-adapter batches (adapter_names=...)")
        base = self.get_base_layer()
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        adapters = self._live_adapters()
        if self.merged or not adapters:
            return self.base_layer(x, *args, **kwargs)
        if self._fused_applies(adapters):
            name = adapters[0]
            bias = None if base.bias is None else base.bias.to(x.dtype)
            return nf4_lora_linear(
                x,
                base.weight,
                base.quant_state,
                self.lora_A[name].weight,
                self.lora_B[name].weight,
                self.scaling[name],
                bias,
            )
        # Slower path: the NF4 matmul, then each adapter on its own dropped-out copy of x (peft's semantics).
        result = self.base_layer(x, *args, **kwargs)
        for name in adapters:
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            adapter_input = self.lora_dropout[name](x).to(lora_A.weight.dtype)
            result = result + (lora_B(lora_A(adapter_input)) * self.scaling[name]).to(result.dtype)
        return result

    # -----------------------------------------------------------------------------------------------------------
    # merge / unmerge
    # -----------------------------------------------------------------------------------------------------------

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """scaling * B @ A, (out_features, in_features) in float32."""
        lora_A = self.lora_A[adapter].weight.detach().float()
        lora_B = self.lora_B[adapter].weight.detach().float()
        return (lora_B @ lora_A) * self.scaling[adapter]

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Fold the adapters into a dense copy of the base weight (dequantized; the NF4 layer is kept for unmerge)."""
        from peft.tuners.tuners_utils import check_adapters_to_merge

        adapter_names = check_adapters_to_merge(self, adapter_names)
        adapter_names = [name for name in adapter_names if name in self.lora_A]
        if not adapter_names:
            return
        base = self.get_base_layer()
        if isinstance(base, NF4Linear):
            weight = base.dequantize(torch.float32)
            dtype = base.compute_dtype
        else:  # already merged once: keep adding to the dense copy
            weight = base.weight.detach().float()
            dtype = base.weight.dtype
        bias = None if base.bias is None else base.bias.detach().float()
        for name in adapter_names:
            weight = weight + self.get_delta_weight(name)
            if self.lora_bias.get(name, False):
                bias = self.lora_B[name].bias.detach().float() + (0 if bias is None else bias)
        if safe_merge and not torch.isfinite(weight).all():
            raise ValueError(f"NaNs or infs in the merged weight: the adapter(s) {adapter_names} seem broken")
        dense = torch.nn.Linear(base.in_features, base.out_features, bias=bias is not None, device="meta", dtype=dtype)
        dense.weight = torch.nn.Parameter(weight.to(dtype), requires_grad=False)
        if bias is not None:
            dense.bias = torch.nn.Parameter(bias.to(dtype), requires_grad=False)
        if isinstance(base, NF4Linear):
            self._nf4_base = base
        self.base_layer = dense
        self.merged_adapters.extend(adapter_names)

    def unmerge(self) -> None:
        """Put the original NF4 layer back (bit-exact: nothing is re-quantized)."""
        if not self.merged:
            return
        if self._nf4_base is not None:
            self.base_layer = self._nf4_base
            self._nf4_base = None
        self.merged_adapters.clear()

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def nf4_lora_config(peft_config: peft.LoraConfig, model: torch.nn.Module | None = None) -> peft.LoraConfig:
    """`peft_config` made ready for a model holding NF4Linear layers (modified in place and returned).

    Registers NF4Linear -> NF4LoraLinear with peft's custom-module dispatch. When target_modules is "all-linear"
    and `model` is given, spells it out as the leaf names of the model's NF4Linear and nn.Linear layers except its
    output layer (what "all-linear" means for a dense model).
    """
    if not isinstance(peft_config, peft.LoraConfig):
        raise TypeError(f"peft_config must be a peft.LoraConfig, got {type(peft_config).__name__}")
    peft_config._register_custom_module({NF4Linear: NF4LoraLinear})
    if isinstance(peft_config.target_modules, str) and peft_config.target_modules.lower() == "all-linear":
        if model is None:
            raise ValueError("nf4_lora_config: target_modules='all-linear' needs the model to resolve the names")
        peft_config.target_modules = linear_leaf_names(model)
    return peft_config


def linear_leaf_names(model: torch.nn.Module) -> set[str]:
    """Leaf names of every NF4Linear / nn.Linear in `model` except the output layer (e.g. {"q_proj", "up_proj"})."""
    get_output = getattr(model, "get_output_embeddings", None)
    output_layer = get_output() if callable(get_output) else None
    names = set()
    for name, module in model.named_modules():
        if module is output_layer or not isinstance(module, (NF4Linear, torch.nn.Linear)):
            continue
        names.add(name.rsplit(".", 1)[-1])
    output_names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if module is output_layer}
    if names & output_names:
        raise ValueError(
            f"the output layer's name {sorted(output_names)} is also the name of other linear layers: "
            "list target_modules explicitly"
        )
    if not names:
        raise ValueError("target_modules='all-linear' found no linear layers in the model")
    return names
