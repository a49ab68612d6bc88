"""NF4Linear and its peft LoRA layer: values against the dequantized dense layer, gradients, bitsandbytes' state-dict
keys both ways, casts that must not touch the statistics, merge/unmerge, dropout, refusals, and a CUDA run."""

from __future__ import annotations

import copy

import peft
import pytest
import torch

from fusedrl.nn.nf4_linear import NF4Linear
from fusedrl.nn.nf4_lora import NF4LoraLinear, linear_leaf_names, nf4_lora_config
from fusedrl.ops.nf4 import nf4_dequantize, nf4_quantize

BNB_KEYS = {"absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4"}

# (out_features, in_features): one block, a partial last block, more than 256 blocks (two nested-absmax scales)
SHAPES = [(8, 8), (24, 40), (300, 64)]


def _linear(out_features, in_features, generator, bias=False, dtype=torch.float32, device="cpu"):
    linear = torch.nn.Linear(in_features, out_features, bias=bias, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=generator) * 0.1)
        if bias:
            linear.bias.copy_(torch.randn(out_features, generator=generator))
    return linear.to(device)


class TwoLayers(torch.nn.Module):
    """A stand-in for a decoder block: two linear layers with the usual projection names."""

    def __init__(self, hidden, inner, generator, dtype=torch.float32):
        super().__init__()
        self.up_proj = _linear(inner, hidden, generator, dtype=dtype)
        self.down_proj = _linear(hidden, inner, generator, bias=True, dtype=dtype)

    def forward(self, x):
        return self.down_proj(torch.relu(self.up_proj(x)))


def _quantize_children(module, compress_statistics=True):
    for name, child in list(module.named_children()):
        if isinstance(child, torch.nn.Linear):
            setattr(module, name, NF4Linear.from_linear(child, compress_statistics=compress_statistics))
    return module


def _dequantized_children(module):
    """A dense copy of `module` whose linear layers hold the dequantized NF4 weights."""
    dense = copy.deepcopy(module)
    for name, child in list(dense.named_children()):
        if isinstance(child, NF4Linear):
            setattr(dense, name, child.to_linear(torch.float32))
    return dense


def _adapter_state(model):
    return {name: value for name, value in model.state_dict().items() if "lora_" in name}


def _randomize_lora_B(model, generator):
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)


# ---------------------------------------------------------------------------------------------------------------
# NF4Linear
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("out_features", "in_features"), SHAPES)
@pytest.mark.parametrize("compress_statistics", [True, False])
def test_forward_and_backward_equal_the_dequantized_dense_layer(generator, out_features, in_features,
                                                                compress_statistics):
    linear = _linear(out_features, in_features, generator, bias=True)
    layer = NF4Linear.from_linear(linear, compress_statistics=compress_statistics)
    packed, state = nf4_quantize(linear.weight.detach(), compress_statistics=compress_statistics)
    assert torch.equal(layer.weight, packed), f"seed {generator.initial_seed()}"
    dense = nf4_dequantize(packed, state, torch.float32)
    assert torch.equal(layer.dequantize(torch.float32), dense)

    x = torch.randn(5, in_features, generator=generator, requires_grad=True)
    grad_output = torch.randn(5, out_features, generator=generator)
    y = layer(x)
    y.backward(grad_output)
    expected = torch.nn.functional.linear(x.detach(), dense, linear.bias.detach())
    torch.testing.assert_close(y, expected, rtol=0, atol=0, msg=f"seed {generator.initial_seed()}")
    torch.testing.assert_close(x.grad, grad_output @ dense, rtol=1e-6, atol=1e-6)
    assert not layer.weight.requires_grad and not layer.bias.requires_grad


def test_state_dict_has_bitsandbytes_keys_and_round_trips(generator):
    layer = NF4Linear.from_linear(_linear(24, 40, generator, bias=True))
    state = layer.state_dict()
    assert set(state) == {"weight", "bias"} | {f"weight.{key}" for key in BNB_KEYS}
    assert state["weight"].dtype == torch.uint8 and state["weight"].shape == (24 * 40 // 2, 1)

    fresh = NF4Linear(40, 24, bias=True, compute_dtype=torch.float32, device="meta")
    fresh.load_state_dict(state, assign=True)
    assert fresh.weight.device.type == "cpu"
    x = torch.randn(3, 40, generator=generator)
    assert torch.equal(fresh(x), layer(x))
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), state.values()))

    filled = NF4Linear(40, 24, bias=True, compute_dtype=torch.float32)  # zeros, then loaded in place
    filled.load_state_dict(state)
    assert torch.equal(filled(x), layer(x))


def test_loading_a_wrong_shape_names_the_key(generator):
    state = NF4Linear.from_linear(_linear(24, 40, generator)).state_dict()
    with pytest.raises(RuntimeError, match=r"weight.*shape"):
        NF4Linear(40, 32).load_state_dict(state)
    with pytest.raises(RuntimeError, match="weight.absmax"):
        NF4Linear(40, 24).load_state_dict({"weight": state["weight"]})


def test_dtype_casts_leave_the_statistics_exact(generator):
    layer = NF4Linear.from_linear(_linear(300, 64, generator))
    before = {key: value.clone() for key, value in layer.state_dict().items()}
    x = torch.randn(2, 64, generator=generator, dtype=torch.float16)
    expected = torch.nn.functional.linear(x.float(), layer.dequantize(torch.float32)).half()
    layer.half()
    after = layer.state_dict()
    assert all(torch.equal(before[key], after[key]) for key in before)
    torch.testing.assert_close(layer(x), expected, rtol=2e-3, atol=2e-3)  # fp16 GEMM vs fp32-then-round


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="in_features"):
        NF4Linear(0, 4)
    with pytest.raises(ValueError, match="blocksize"):
        NF4Linear(4, 4, blocksize=32)
    with pytest.raises(TypeError, match="linear"):
        NF4Linear.from_linear(torch.nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match="x must end in in_features=8"):
        NF4Linear.from_linear(torch.nn.Linear(8, 8))(torch.zeros(2, 7))


def test_bitsandbytes_reads_our_state_dict_and_we_read_theirs(generator):
    bnb = pytest.importorskip("bitsandbytes")
    linear = _linear(24, 64, generator, bias=True)
    ours = NF4Linear.from_linear(linear)
    theirs = bnb.nn.Linear4bit(64, 24, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    state = ours.state_dict()
    # what transformers does with a pre-quantized checkpoint: Params4bit.from_prequantized on the serialized keys
    theirs.weight = bnb.nn.Params4bit.from_prequantized(
        state["weight"], {k.removeprefix("weight."): v for k, v in state.items() if k.startswith("weight.")},
        device="cpu", module=theirs)
    theirs.bias = torch.nn.Parameter(state["bias"], requires_grad=False)
    x = torch.randn(4, 64, generator=generator)
    torch.testing.assert_close(theirs(x), ours(x), rtol=1e-6, atol=1e-6)

    reference = bnb.nn.Linear4bit(64, 24, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    reference.load_state_dict(linear.state_dict())
    reference = reference.to("cpu")  # quantizes
    theirs_state = reference.state_dict()
    back = NF4Linear(64, 24, bias=True, compute_dtype=torch.float32, device="meta")
    back.load_state_dict(theirs_state, assign=True)
    assert torch.equal(back.weight, theirs_state["weight"])
    torch.testing.assert_close(back(x), reference(x), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# peft LoRA over NF4Linear
# ---------------------------------------------------------------------------------------------------------------


def _lora_pair(generator, dropout=0.0, bias="none"):
    """(QLoRA model, dense LoRA model over the dequantized weights), same adapter values."""
    base = _quantize_children(TwoLayers(40, 72, generator))
    dense = _dequantized_children(base)
    config = dict(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=dropout, bias=bias)
    qlora = peft.get_peft_model(base, nf4_lora_config(peft.LoraConfig(**config), base))
    reference = peft.get_peft_model(dense, peft.LoraConfig(**{**config, "target_modules": ["up_proj", "down_proj"]}))
    _randomize_lora_B(qlora, generator)
    reference.load_state_dict(_adapter_state(qlora), strict=False)
    return qlora, reference


def test_peft_wraps_nf4_layers_with_the_fused_layer(generator):
    qlora, _ = _lora_pair(generator)
    layers = [m for m in qlora.modules() if isinstance(m, NF4LoraLinear)]
    assert len(layers) == 2 and all(isinstance(m.base_layer, NF4Linear) for m in layers)
    trainable = {n for n, p in qlora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert linear_leaf_names(_quantize_children(TwoLayers(8, 8, generator))) == {"up_proj", "down_proj"}


def test_qlora_forward_and_gradients_match_dense_lora(generator):
    qlora, reference = _lora_pair(generator)
    x = torch.randn(3, 5, 40, generator=generator)
    grad_output = torch.randn(3, 5, 40, generator=generator)
    outputs = []
    for model in (qlora, reference):
        inputs = x.clone().requires_grad_()
        y = model(inputs)
        y.backward(grad_output)
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        outputs.append((y, inputs.grad, grads))
    (y, dx, grads), (y_ref, dx_ref, grads_ref) = outputs
    message = f"seed {generator.initial_seed()}"
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5, msg=message)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-5, msg=message)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-5, msg=f"{name}, {message}")


def test_fused_fast_path_follows_adapter_switches_scaling_and_disabling(generator):
    qlora, _ = _lora_pair(generator)
    layer = next(m for m in qlora.modules() if isinstance(m, NF4LoraLinear))
    layer.update_layer("second", 4, lora_alpha=4, config=peft.LoraConfig(r=4, lora_alpha=4))
    torch.nn.init.normal_(layer.lora_B["second"].weight, generator=generator)
    x = torch.randn(3, layer.in_features, generator=generator)
    base = layer.get_base_layer()

    def expected(name):
        w = base.dequantize(torch.float32)
        a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
        return x @ w.t() + layer.scaling[name] * (x @ a.t()) @ b.t()

    with torch.no_grad():
        for name in ("default", "second", "default"):  # set_adapter between calls: no stale adapter
            layer.set_adapter(name)
            assert layer._fused_call(x) is not None
            torch.testing.assert_close(layer(x), expected(name), rtol=1e-5, atol=1e-5)
        layer.scale_layer(0.5)  # scaling changes in place
        torch.testing.assert_close(layer(x), expected("default"), rtol=1e-5, atol=1e-5)
        layer.enable_adapters(False)
        assert layer._fused_call(x) is None
        torch.testing.assert_close(layer(x), x @ base.dequantize(torch.float32).t(), rtol=1e-5, atol=1e-5)


def test_dropout_takes_the_composed_path_with_peft_semantics(generator):
    qlora, reference = _lora_pair(generator, dropout=0.3)
    x = torch.randn(4, 40, generator=generator)
    outputs = []
    for model in (qlora, reference):
        torch.manual_seed(1234)  # same dropout masks in both
        outputs.append(model(x))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
    qlora.eval()
    reference.eval()
    torch.testing.assert_close(qlora(x), reference(x), rtol=1e-5, atol=1e-5)


def test_trainable_bias_gets_its_gradient(generator):
    qlora, reference = _lora_pair(generator, bias="all")
    x = torch.randn(4, 40, generator=generator)
    for model in (qlora, reference):
        model(x).square().sum().backward()
    bias = dict(qlora.named_parameters())["base_model.model.down_proj.base_layer.bias"]
    bias_ref = dict(reference.named_parameters())["base_model.model.down_proj.base_layer.bias"]
    assert bias.requires_grad
    torch.testing.assert_close(bias.grad, bias_ref.grad, rtol=1e-5, atol=1e-5)


def test_merge_is_dense_and_unmerge_restores_the_nf4_bytes(generator):
    qlora, reference = _lora_pair(generator)
    layer = qlora.base_model.model.up_proj
    nf4_base = layer.base_layer
    x = torch.randn(4, 40, generator=generator)
    expected = qlora(x)
    layer.merge()
    assert isinstance(layer.base_layer, torch.nn.Linear) and layer.merged
    torch.testing.assert_close(qlora(x), expected, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    assert layer.base_layer is nf4_base and not layer.merged
    assert torch.equal(qlora(x), expected)

    merged = copy.deepcopy(qlora).merge_and_unload()
    assert not any(isinstance(m, NF4Linear) for m in merged.modules())
    torch.testing.assert_close(merged(x), reference(x), rtol=1e-5, atol=1e-5)


def test_lora_variants_and_mixed_batches_are_refused(generator):
    base = _quantize_children(TwoLayers(16, 16, generator))
    with pytest.raises(ValueError, match=r"plain LoRA only.*use_dora"):
        peft.get_peft_model(base, nf4_lora_config(peft.LoraConfig(r=2, target_modules="all-linear", use_dora=True),
                                                  base))
    with pytest.raises(ValueError, match="needs the model"):
        nf4_lora_config(peft.LoraConfig(r=2, target_modules="all-linear"))
    with pytest.raises(TypeError, match="peft_config"):
        nf4_lora_config({"r": 2})


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_qlora_layer_on_cuda_matches_dense_lora(generator, dtype):
    base = _quantize_children(TwoLayers(128, 320, generator))
    dense = _dequantized_children(base)
    base, dense = base.cuda(), dense.cuda()
    config = dict(r=8, lora_alpha=16)
    qlora = peft.get_peft_model(base, nf4_lora_config(peft.LoraConfig(**config, target_modules="all-linear"), base))
    reference = peft.get_peft_model(dense, peft.LoraConfig(**config, target_modules=["up_proj", "down_proj"]))
    _randomize_lora_B(qlora, generator)
    reference.load_state_dict(_adapter_state(qlora), strict=False)
    x = torch.randn(64, 128, generator=generator).to("cuda", dtype)
    results = []
    for model in (qlora, reference):
        inputs = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=dtype):
            y = model(inputs)
        y.float().square().mean().backward()
        results.append((y.float(), inputs.grad.float(),
                        [p.grad for n, p in sorted(model.named_parameters()) if p.requires_grad]))
    tolerance = 2e-2 if dtype == torch.bfloat16 else 5e-3  # half-precision GEMMs summed in different orders
    torch.testing.assert_close(results[0][0], results[1][0], rtol=tolerance, atol=tolerance)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=tolerance, atol=tolerance)
    for grad, grad_ref in zip(results[0][2], results[1][2]):
        torch.testing.assert_close(grad, grad_ref, rtol=5 * tolerance, atol=tolerance)
