"""The training model's base weights are vLLM's tensors: one copy, correct slices, pointers that never move."""

from __future__ import annotations

import torch

from vllm_helpers import chat_prompt


def test_every_base_parameter_lives_in_vllm_storage(shared_model):
    model, _ = shared_model
    engine = model.vllm_engine
    base_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" not in n)
    assert engine.shared.check_shares_storage(model) == base_bytes == engine.shared_bytes
    print(f"\nbase weights shared with vLLM, not duplicated: {engine.shared_bytes / 2**20:.1f} MiB")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable), trainable[:4]


def test_vllm_kept_its_linear_weights_unpacked(shared_model):
    """On CPU vLLM would repack linear weights for oneDNN and empty the parameters; our loader keeps them."""
    from vllm.model_executor.layers.linear import LinearBase

    from fusedrl.rollout.vllm_setup import live_model

    model, _ = shared_model
    linears = [m for m in live_model(model.vllm_engine.llm).modules() if isinstance(m, LinearBase)]
    assert linears
    for layer in linears:
        assert layer.weight.numel() > 0 and layer.cpu_linear is torch.nn.functional.linear


def test_fused_slices_match_the_checkpoint(shared_model):
    """q/k/v and gate/up views of vLLM's fused weights equal the checkpoint's separate matrices, bit for bit."""
    import transformers

    model, _ = shared_model
    folder = model.get_base_model().config._name_or_path
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ours = {n.replace(".base_layer", ""): p for n, p in model.get_base_model().named_parameters()}
    for name, param in reference.named_parameters():
        assert torch.equal(ours[name], param), name
    ids = torch.tensor([[1, 17, 300, 4000, 9, 2]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_a_write_through_vllm_is_seen_by_the_trainer(shared_model):
    from fusedrl.rollout.vllm_setup import live_model

    model, _ = shared_model
    vllm_qkv = live_model(model.vllm_engine.llm).model.layers[3].self_attn.qkv_proj.base_layer.weight
    k_proj = model.get_base_model().model.layers[3].self_attn.k_proj.base_layer.weight
    q_rows = model.get_base_model().model.layers[3].self_attn.q_proj.base_layer.weight.shape[0]
    original = vllm_qkv[q_rows, 5].item()
    with torch.no_grad():
        vllm_qkv[q_rows, 5] = 123.0
    try:
        assert k_proj[0, 5].item() == 123.0
    finally:
        with torch.no_grad():
            vllm_qkv[q_rows, 5] = original


def test_pointers_do_not_move_across_vllm_calls(shared_model):
    from fusedrl.rollout import SamplingConfig

    model, tokenizer = shared_model
    engine = model.vllm_engine
    before = {n: p.data_ptr() for n, p in model.named_parameters() if "lora_" not in n}
    engine.wake()
    engine.generate([chat_prompt(tokenizer, "Name a colour.")], SamplingConfig(max_new_tokens=4))
    engine.sleep()
    engine.sync_weights()
    engine.shared.check_unchanged()
    assert {n: p.data_ptr() for n, p in model.named_parameters() if "lora_" not in n} == before
