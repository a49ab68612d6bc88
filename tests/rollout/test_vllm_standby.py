"""The CUDA standby path as far as it runs without a GPU or vLLM: memory plan, guards, the sleep/wake calls.

A fake LLM records the calls, so the order (pause, release only the KV cache; empty the trainer's cache, map the KV
cache, resume) is checked exactly; the real vLLM sleep mode has never run here (no CUDA vLLM on these machines).
"""

from __future__ import annotations

import pytest
import torch
import transformers

from fusedrl.rollout.vllm_standby import (
    DEFAULT_MARGIN_BYTES,
    GIB,
    MAX_UTILIZATION,
    MIN_KV_CACHE_BYTES,
    Standby,
    check_sleep_mode_allowed,
    check_training_fits,
    expandable_segments_enabled,
    lora_parameter_count,
    plan_gpu_memory_utilization,
)


class RecordingLLM:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def sleep(self, level: int = 1) -> None:
        self.calls.append(("sleep", level))

    def release_kv_cache_memory(self) -> None:
        self.calls.append(("release_kv_cache_memory",))

    def wake_up(self, tags=None) -> None:
        self.calls.append(("wake_up", tuple(tags) if tags is not None else None))


def test_cpu_standby_is_a_no_op():
    llm = RecordingLLM()
    standby = Standby(llm, torch.device("cpu"), enabled=True)
    standby.release()
    standby.restore()
    assert llm.calls == [] and not standby.active


def test_cuda_standby_releases_only_the_kv_cache(monkeypatch):
    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    llm = RecordingLLM()
    standby = Standby(llm, torch.device("cuda", 0), enabled=True)
    standby.release()
    standby.release()  # idempotent
    assert llm.calls == [("sleep", 0), ("release_kv_cache_memory",)]
    standby.restore()
    standby.restore()
    assert llm.calls[2:] == [("wake_up", ("kv_cache",)), ("wake_up", ("scheduling",))]
    assert emptied == [True]
    assert all(call[0] != "sleep" or call[1] == 0 for call in llm.calls)  # never level 1/2: weights stay put


def test_disabled_cuda_standby_does_nothing():
    llm = RecordingLLM()
    standby = Standby(llm, torch.device("cuda", 0), enabled=False)
    standby.release()
    standby.restore()
    assert llm.calls == []


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({}, False),
        ({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}, True),
        ({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128, expandable_segments:True"}, True),
        ({"PYTORCH_ALLOC_CONF": "expandable_segments:true"}, True),
        ({"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"}, False),
    ],
)
def test_expandable_segments_detection(settings, expected):
    assert expandable_segments_enabled(settings) is expected


def test_sleep_mode_refused_with_expandable_segments():
    bad = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    with pytest.raises(RuntimeError, match="expandable_segments"):
        check_sleep_mode_allowed(torch.device("cuda", 0), bad)
    check_sleep_mode_allowed(torch.device("cpu"), bad)  # CPU has no sleep mode to break
    check_sleep_mode_allowed(torch.device("cuda", 0), {})


def test_plan_leaves_room_for_the_trainer_and_the_margin():
    total = 80 * GIB
    weights = 16 * GIB
    resident = 3 * GIB
    utilization = plan_gpu_memory_utilization(weights, total, resident)
    assert utilization == round((total - DEFAULT_MARGIN_BYTES - resident) / total, 3)
    assert utilization * total + resident + DEFAULT_MARGIN_BYTES <= total + 0.0005 * total
    assert utilization * total >= weights + MIN_KV_CACHE_BYTES


def test_plan_is_capped_and_refuses_what_cannot_fit():
    assert plan_gpu_memory_utilization(GIB, 1000 * GIB, 0) == MAX_UTILIZATION
    with pytest.raises(RuntimeError, match="cannot hold the weights"):
        plan_gpu_memory_utilization(20 * GIB, 24 * GIB, 3 * GIB)
    with pytest.raises(ValueError, match="weight_bytes"):
        plan_gpu_memory_utilization(-1, GIB, 0)
    with pytest.raises(ValueError, match="total_bytes"):
        plan_gpu_memory_utilization(0, 0, 0)


def test_training_fit_and_suggestion():
    total, weights = 80 * GIB, 16 * GIB
    fits = check_training_fits(training_peak_bytes=20 * GIB, weight_bytes=weights, total_bytes=total, utilization=0.5)
    assert fits.fits and fits.suggested_utilization is None
    assert fits.free_for_training_bytes == total - DEFAULT_MARGIN_BYTES - weights
    tight = check_training_fits(training_peak_bytes=40 * GIB, weight_bytes=weights, total_bytes=total, utilization=0.9)
    assert tight.fits and tight.suggested_utilization == round((total - DEFAULT_MARGIN_BYTES - 40 * GIB + weights) / total, 3)
    too_big = check_training_fits(training_peak_bytes=70 * GIB, weight_bytes=weights, total_bytes=total, utilization=0.3)
    assert not too_big.fits and too_big.suggested_utilization is not None


def test_lora_parameter_count_matches_peft():
    import peft

    config = transformers.LlamaConfig(hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=64)
    for targets in ("all-linear", ["q_proj", "v_proj", "down_proj"]):
        adapted = peft.get_peft_model(transformers.AutoModelForCausalLM.from_config(config),
                                      peft.LoraConfig(r=4, target_modules=targets, task_type="CAUSAL_LM"))
        trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
        assert lora_parameter_count(config, 4, targets) == trainable
