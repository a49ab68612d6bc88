"""A transformers training model whose base weights are views of a vLLM model's parameters (no second copy).

`build_shared_model` builds the transformers model on the meta device (no memory), then gives every parameter a
`torch.nn.Parameter` that is a view of the matching vLLM tensor: same name for plain layers and norms; a row slice
of vLLM's fused `qkv_proj` (q | k | v) and `gate_up_proj` (gate | up) weights and biases, using the fused layer's
`output_sizes`; the first `vocab_size` rows of vLLM's (possibly padded) embedding and lm-head. Tied weights stay
tied. Buffers (rotary frequencies) are rebuilt on the real device from the config. Any parameter without a vLLM
counterpart raises, so a training model is never half shared.

`SharedWeights` records the data pointers of vLLM's parameters; `check_unchanged` raises if vLLM re-allocated any
(CUDA graphs and our views would then read freed memory), and `check_shares_storage` proves that every base
parameter of the training model lives inside a vLLM parameter's storage.
"""

from __future__ import annotations

import torch
import transformers

# vLLM's LoRA wrappers put the original layer under `.base_layer`; names are compared without it.
_LORA_WRAPPER = ".base_layer"


def vllm_parameters(vllm_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """vLLM's parameters by name, LoRA wrappers' `.base_layer` removed, LoRA slot buffers excluded."""
    return {name.replace(_LORA_WRAPPER, ""): param for name, param in vllm_model.named_parameters()}


def _fused_slices(vllm_model: torch.nn.Module) -> dict[str, tuple[str, int]]:
    """{sub-module leaf name: (fused leaf name, index)} from vLLM's packed_modules_mapping (q_proj -> qkv_proj, 0)."""
    mapping = getattr(vllm_model, "packed_modules_mapping", None) or {}
    return {sub: (fused, index) for fused, subs in mapping.items() for index, sub in enumerate(subs)}


def _output_sizes(vllm_model: torch.nn.Module, fused_module_name: str) -> list[int]:
    module = vllm_model.get_submodule(fused_module_name)
    module = getattr(module, "base_layer", module)
    sizes = getattr(module, "output_sizes", None)
    if not sizes:
        raise RuntimeError(f"vLLM's fused layer {fused_module_name} has no output_sizes to slice it by")
    return [int(size) for size in sizes]


def vllm_view_for(
    name: str, shape: torch.Size, vllm_model: torch.nn.Module, params: dict[str, torch.Tensor]
) -> torch.Tensor:
    """The view of vLLM's storage that plays the transformers parameter `name` of `shape`."""
    module_name, _, leaf = name.rpartition(".")
    parent, _, module_leaf = module_name.rpartition(".")
    if name in params:
        tensor = params[name]
        if tensor.shape == shape:
            return tensor.data
        if tensor.dim() == len(shape) >= 1 and tensor.shape[1:] == shape[1:] and tensor.shape[0] >= shape[0]:
            return tensor.data[: shape[0]]  # vocabulary padded by vLLM
        raise RuntimeError(f"vLLM's {name} has shape {tuple(tensor.shape)}, transformers expects {tuple(shape)}")
    fused = _fused_slices(vllm_model).get(module_leaf)
    if fused is not None:
        fused_module = f"{parent}.{fused[0]}" if parent else fused[0]
        fused_name = f"{fused_module}.{leaf}"
        if fused_name in params:
            sizes = _output_sizes(vllm_model, fused_module)
            start = sum(sizes[: fused[1]])
            view = params[fused_name].data[start : start + sizes[fused[1]]]
            if view.shape != shape:
                raise RuntimeError(
                    f"slice {fused[1]} of vLLM's {fused_name} has shape {tuple(view.shape)}, "
                    f"transformers' {name} expects {tuple(shape)}"
                )
            return view
    raise RuntimeError(
        f"no vLLM tensor for the transformers parameter {name} {tuple(shape)}: this architecture's vLLM and "
        "transformers layouts differ; fast_inference supports Llama, Mistral, Qwen2 and Qwen3-style models"
    )


def _rebuild_meta_buffers(model: torch.nn.Module, device: torch.device) -> None:
    """Recreate modules whose buffers are still on the meta device (rotary embeddings) from their config."""
    for module_name, module in list(model.named_modules()):
        if not any(buffer.is_meta for buffer in module.buffers(recurse=False)):
            continue
        config = getattr(module, "config", None)
        if config is None:
            raise RuntimeError(f"cannot rebuild the buffers of {module_name} ({type(module).__name__}): no config")
        with torch.device(device):
            rebuilt = type(module)(config)
        parent_name, _, leaf = module_name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, leaf, rebuilt)


def build_shared_model(
    config: transformers.PretrainedConfig, vllm_model: torch.nn.Module, dtype: torch.dtype
) -> transformers.PreTrainedModel:
    """A transformers causal LM for `config` whose every parameter is a frozen view of `vllm_model`'s storage."""
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    params = vllm_parameters(vllm_model)
    device = next(iter(params.values())).device
    shared: dict[int, torch.nn.Parameter] = {}  # meta parameter id -> its replacement, so tied weights stay tied
    for name, meta_param in model.named_parameters(remove_duplicate=False):
        replacement = shared.get(id(meta_param))
        if replacement is None:
            view = vllm_view_for(name, meta_param.shape, vllm_model, params)
            if view.dtype != dtype:
                raise RuntimeError(f"vLLM's tensor for {name} is {view.dtype}, the training dtype is {dtype}")
            replacement = torch.nn.Parameter(view, requires_grad=False)
            shared[id(meta_param)] = replacement
        module_name, _, leaf = name.rpartition(".")
        model.get_submodule(module_name)._parameters[leaf] = replacement
    _rebuild_meta_buffers(model, device)
    return model


class SharedWeights:
    """Where vLLM's parameters live, to prove sharing and detect re-allocation."""

    def __init__(self, vllm_model: torch.nn.Module) -> None:
        self.vllm_model = vllm_model
        self.pointers = {name: param.data_ptr() for name, param in vllm_parameters(vllm_model).items()}
        self.storages = {
            param.untyped_storage().data_ptr(): param.untyped_storage().nbytes()
            for param in vllm_parameters(vllm_model).values()
        }

    def check_unchanged(self) -> None:
        """Raise if vLLM moved or replaced any parameter since construction."""
        now = {name: param.data_ptr() for name, param in vllm_parameters(self.vllm_model).items()}
        moved = sorted(name for name, pointer in self.pointers.items() if now.get(name) != pointer)
        if moved:
            raise RuntimeError(
                f"vLLM re-allocated {len(moved)} shared weight tensors (first: {moved[:3]}); the training model's "
                "views no longer alias vLLM's weights"
            )

    def check_shares_storage(self, training_model: torch.nn.Module) -> int:
        """Raise unless every non-LoRA parameter of `training_model` lies in a vLLM parameter's storage.

        Returns the bytes of base weights the training model does not duplicate (tied weights counted once): what
        a separate transformers copy of the weights would have taken.
        """
        shared_bytes = 0
        for name, param in training_model.named_parameters():  # tied parameters are listed once
            if "lora_" in name:
                continue
            if param.untyped_storage().data_ptr() not in self.storages:
                raise RuntimeError(f"the training model's {name} does not share storage with vLLM's weights")
            shared_bytes += param.numel() * param.element_size()
        if shared_bytes == 0:
            raise RuntimeError("the training model has no base parameters to share")
        return shared_bytes
