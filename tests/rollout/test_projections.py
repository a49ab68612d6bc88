"""ProjectionGroup: grouped base GEMMs + one LoRA-A GEMM against peft's own forward (float32 adapters over float32 and
bf16 bases, biases, residual in place), live adapter refresh into the same buffers, and the fallback cases."""

from __future__ import annotations

import pytest
import torch

from fusedrl.rollout.llama_family import _linear
from fusedrl.rollout.projections import ProjectionGroup


class _Block(torch.nn.Module):
    def __init__(self, bias: bool):
        super().__init__()
        self.q = torch.nn.Linear(37, 24, bias=bias)
        self.k = torch.nn.Linear(37, 8, bias=bias)
        self.v = torch.nn.Linear(37, 8, bias=bias)
        self.o = torch.nn.Linear(24, 37, bias=False)


def _peft_block(dtype, bias: bool, targets=("q", "k", "v", "o"), **lora):
    import peft

    model = peft.get_peft_model(_Block(bias).to(dtype), peft.LoraConfig(r=5, lora_alpha=7, target_modules=list(targets),
                                                                         **lora)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    return model, model.base_model.model


TOLERANCE = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=3e-2, rtol=2e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_group_matches_peft(dtype, bias):
    model, block = _peft_block(dtype, bias)
    assert block.q.lora_A["default"].weight.dtype == torch.float32  # peft's float32 adapters over the base
    group = ProjectionGroup([block.q, block.k, block.v], _linear)
    assert group.refresh() and group.fused
    x = torch.randn(3, 2, 37).to(dtype)
    with torch.no_grad():
        ours = group(x)
        expected = [block.q(x), block.k(x), block.v(x)]
    for got, want in zip(ours, expected):
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lora", [True, False])
def test_residual_is_added_in_place(dtype, lora):
    model, block = _peft_block(dtype, bias=False, targets=("o",) if lora else ("q",))
    group = ProjectionGroup([block.o], _linear)
    group.refresh()
    assert (group.a_cat is not None) == lora
    x, residual = torch.randn(5, 24).to(dtype), torch.randn(5, 37).to(dtype)
    with torch.no_grad():
        expected = residual + block.o(x)
        out = group(x, residual=residual)[0]
        assert out.data_ptr() == residual.data_ptr()
        torch.testing.assert_close(out, expected, **TOLERANCE[dtype])
        strided = torch.randn(37, 5).to(dtype).t()  # not contiguous: a new tensor, same values
        torch.testing.assert_close(group(x, residual=strided)[0], strided + block.o(x), **TOLERANCE[dtype])


def test_refresh_copies_new_adapter_values_into_the_same_buffers():
    model, block = _peft_block(torch.float32, bias=False)
    group = ProjectionGroup([block.q, block.k, block.v], _linear)
    group.refresh()
    buffers = (group.a_cat.data_ptr(), group.b_block.data_ptr())
    with torch.no_grad():
        block.k.lora_B["default"].weight.mul_(-2)
        block.q.lora_A["default"].weight.add_(0.5)
    assert group.refresh() is False  # same layout: in place, so captured graphs stay valid
    assert (group.a_cat.data_ptr(), group.b_block.data_ptr()) == buffers
    x = torch.randn(4, 37)
    with torch.no_grad():
        for got, module in zip(group(x), (block.q, block.k, block.v)):
            torch.testing.assert_close(got, module(x), **TOLERANCE[torch.float32])
    group.release()  # the engine's sleep: copies freed, the next refresh re-allocates (graphs must be re-captured)
    assert group.a_cat is None and not group.fused
    assert group.refresh() is True and group.fused


def test_partial_targets_and_disabled_adapters():
    model, block = _peft_block(torch.float32, bias=True, targets=("q", "v"))
    group = ProjectionGroup([block.q, block.k, block.v], _linear)  # k is a plain nn.Linear here
    group.refresh()
    assert group.fused and group.a_cat.shape[0] == 10 and not group.b_block[24:32].any()  # no block for k
    x = torch.randn(4, 37)
    with torch.no_grad():
        for got, module in zip(group(x), (block.q, block.k, block.v)):
            torch.testing.assert_close(got, module(x), **TOLERANCE[torch.float32])
        with model.disable_adapter():
            group.refresh()
            for got, module in zip(group(x), (block.q, block.k, block.v)):
                torch.testing.assert_close(got, module(x), **TOLERANCE[torch.float32])


def test_unfusable_modules_run_as_is():
    model, block = _peft_block(torch.float32, bias=False, use_dora=True)
    group = ProjectionGroup([block.q, block.k], _linear)
    assert group.refresh() is False and not group.fused
    x, residual = torch.randn(4, 37), torch.randn(4, 24)
    with torch.no_grad():
        torch.testing.assert_close(group(x)[0], block.q(x))
        single = ProjectionGroup([block.q], _linear)
        assert single.refresh() is False and not single.fused
        torch.testing.assert_close(single(x, residual=residual.clone())[0], residual + block.q(x))


def test_training_mode_falls_back_and_reports_the_change():
    model, block = _peft_block(torch.float32, bias=False)
    group = ProjectionGroup([block.q], _linear)
    assert group.refresh() is True and group.fused
    model.train()  # dropout may be active: peft's own forward
    assert group.refresh() is True and not group.fused
    model.eval()
    assert group.refresh() is True and group.fused
