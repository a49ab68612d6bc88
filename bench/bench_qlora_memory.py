"""GPU memory of a Llama-3.1-8B-shaped QLoRA model right after loading: fusedrl vs bitsandbytes + peft.

  fusedrl   fusedrl.load_model(dir, load_in_4bit=True, dtype=bf16, lora=LoraConfig()) — NF4Linear layers (our
            quantizer, bitsandbytes' bytes), embeddings / lm-head / norms in bf16, r=16 LoRA on every linear
  bnb       transformers + BitsAndBytesConfig(nf4, double quant, bf16 compute) + peft's
            prepare_model_for_kbit_training (which upcasts the non-4-bit weights to float32) + the same LoRA;
            skipped where bitsandbytes is not installed
  bnb-noupcast  the same without prepare_model_for_kbit_training (what bitsandbytes costs without the upcast)

A random-init checkpoint of the shape (bf16 safetensors, about 16 GB for the full 8B) is written once to --workdir;
each variant then loads it in its own process, so one variant's caching allocator cannot hide another's memory.
Reported: torch.cuda.memory_allocated() after loading (the model's tensors) and max_memory_allocated() during the
load (the quantization's transient), in GiB; the arithmetic expectation of the fusedrl model; the target
(issue 12): fusedrl after loading <= 6.0 GiB. Prints a table, writes --json.

  python bench/bench_qlora_memory.py --json bench_qlora_memory.json [--layers 32] [--workdir /tmp/qlora-bench]
  python bench/bench_qlora_memory.py --cpu-smoke     # CPU: a 2-layer narrow model, checks the script runs
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
import fusedrl_import  # noqa: E402,F401  the installed fusedrl, else the source tree

GIB = float(1 << 30)
TARGET_GIB = 6.0
LLAMA_3_1_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                    rope_theta=500000.0, tie_word_embeddings=False)
SMOKE = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=False)


def write_checkpoint(folder: Path, shape: dict, device: str) -> None:
    """A random-init bf16 Llama of `shape` (weights ~ N(0, 0.02), drawn on `device`) and a small tokenizer, once."""
    import transformers

    from fusedrl.model.tiny import tiny_word_tokenizer

    if (folder / "config.json").is_file():
        return
    started = time.perf_counter()
    config = transformers.LlamaConfig(**shape)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.fill_(1.0)
            else:
                parameter.normal_(0.0, 0.02, generator=generator)
    print(f"initialised the random model on {device} in {time.perf_counter() - started:.0f} s; saving", flush=True)
    model.save_pretrained(folder)  # rotary buffers are not saved: every loader recomputes them
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    tiny_word_tokenizer().save_pretrained(folder)
    print(f"wrote {folder} in {time.perf_counter() - started:.0f} s", flush=True)


def measure(variant: str, folder: Path, device: str) -> dict:
    """Load `folder` as `variant` on `device`; the memory it holds afterwards (this process only)."""
    import transformers

    from fusedrl.model import LoraConfig, load_model

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    started = time.perf_counter()
    if variant == "fusedrl":
        model, _ = load_model(folder, dtype="bfloat16", load_in_4bit=True, lora=LoraConfig(), device=device)
    else:
        import peft

        quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_use_double_quant=True,
                                                       bnb_4bit_compute_dtype=torch.bfloat16)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16,
                                                                  quantization_config=quantization,
                                                                  device_map={"": device})
        if variant == "bnb":
            model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                         gradient_checkpointing_kwargs={"use_reentrant": False})
        model = peft.get_peft_model(model, LoraConfig().to_peft())
    seconds = time.perf_counter() - started
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    tensor_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    result = {"variant": variant, "load_s": seconds, "tensor_gib": tensor_bytes / GIB}
    if cuda:
        torch.cuda.synchronize()
        result["allocated_gib"] = (torch.cuda.memory_allocated() - base) / GIB
        result["peak_gib"] = (torch.cuda.max_memory_allocated() - base) / GIB
    return result


def expected_fusedrl_gib(shape: dict) -> float:
    """Arithmetic: the fusedrl QLoRA model built on the meta device (tests/model/test_nf4_model.py does the same)."""
    import peft
    import transformers

    from fusedrl.model import LoraConfig
    from fusedrl.model.quantize import quantize_linear_layers  # noqa: F401  (documents the layout being counted)
    from fusedrl.nn.nf4_linear import NF4Linear
    from fusedrl.nn.nf4_lora import nf4_lora_config

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**shape),
                                                              dtype=torch.bfloat16)
    head = model.get_output_embeddings()
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and module is not head:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, NF4Linear.empty_like(module, compute_dtype=torch.bfloat16))
    model = peft.get_peft_model(model, nf4_lora_config(LoraConfig().to_peft(), model))
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values()) / GIB


def run_child(variant: str, folder: Path, device: str) -> dict | None:
    print(f"loading as {variant} (own process)", flush=True)
    command = [sys.executable, __file__, "--child", variant, "--workdir", str(folder), "--device", device]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        print(f"{variant}: failed (exit {done.returncode})\n{done.stderr[-3000:]}", flush=True)
        return None
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (32 = the full 8B shape)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/fusedrl-qlora-memory"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--variants", default="fusedrl,bnb,bnb-noupcast", help="comma-separated subset")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shape on CPU: checks the script runs")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print("RESULT " + json.dumps(measure(args.child, args.workdir, args.device)), flush=True)
        return

    shape = dict(SMOKE if args.cpu_smoke else LLAMA_3_1_8B)
    if not args.cpu_smoke:
        shape["num_hidden_layers"] = args.layers
    device = "cpu" if args.cpu_smoke else args.device
    folder = args.workdir / f"llama-{shape['hidden_size']}x{shape['num_hidden_layers']}"
    folder.parent.mkdir(parents=True, exist_ok=True)
    write_checkpoint(folder, shape, device)

    variants = [v for v in args.variants.split(",") if v]
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        variants = [v for v in variants if not v.startswith("bnb")]
        print("bitsandbytes not installed: measuring fusedrl only", flush=True)
    card = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    expected = expected_fusedrl_gib(shape)
    rows = [row for row in (run_child(v, folder, device) for v in variants) if row is not None]

    print(f"\nQLoRA memory after loading — {card}, Llama shape {shape['hidden_size']} x "
          f"{shape['num_hidden_layers']} layers, vocab {shape['vocab_size']}, LoRA r=16 all linear")
    print(f"{'variant':<14}{'tensors GiB':>12}{'allocated GiB':>15}{'peak GiB':>10}{'load s':>8}{'vs fusedrl':>12}")
    ours = next((r for r in rows if r["variant"] == "fusedrl"), None)
    for row in rows:
        key = "allocated_gib" if "allocated_gib" in row else "tensor_gib"
        ratio = row[key] / ours[key] if ours else float("nan")
        print(f"{row['variant']:<14}{row['tensor_gib']:>12.3f}{row.get('allocated_gib', float('nan')):>15.3f}"
              f"{row.get('peak_gib', float('nan')):>10.3f}{row['load_s']:>8.1f}{ratio:>11.2f}x")
    print(f"arithmetic (fusedrl, meta device): {expected:.3f} GiB; target after loading <= {TARGET_GIB} GiB "
          f"(for the full 32-layer shape)")
    met = None
    if ours is not None and shape["num_hidden_layers"] == 32 and "allocated_gib" in ours:
        met = ours["allocated_gib"] <= TARGET_GIB
        print(f"target met: {met}")
    if args.json:
        args.json.write_text(json.dumps({"card": card, "shape": shape, "expected_fusedrl_gib": expected,
                                         "target_gib": TARGET_GIB, "target_met": met, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
