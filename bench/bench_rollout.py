"""Rollout benchmark: the static-cache CUDA-graph decode loop vs transformers `generate` vs the bandwidth floor.

For each model shape (random init, bf16, LoRA r16 on every linear layer, unmerged) and batch size: ms per decode
step and tokens/s of our loop (`StaticDecodeLoop`) and of transformers' `generate` with its dynamic cache (the
built-in engine before this loop, timed over `--hf-tokens` new tokens minus a 1-token call for its prefill),
the bandwidth floor of one decode step (parameter bytes + the KV bytes attended at the mean context, divided by
the measured device-to-device copy bandwidth), prefill time, capture time, and peak memory during generation
against weights + KV cache. Then a GRPO generation round (`--round-prompts` x `--round-group` completions) with
both engines; the transformers round is extrapolated from `--hf-tokens` steps unless --full-round.

    python bench/bench_rollout.py [--shapes llama3.1-8b,qwen3-4b] [--batches 1,8,64,256] [--json F]
                                  [--attention fused,sdpa] [--time-budget S] [--cpu-smoke]

--attention lists the static loop's attention modes to run (each a row per batch; the first is the one the GRPO round
uses). The GRPO round is `--round-prompts` distinct prompts, each repeated `--round-group` times, as a GRPO
generation call lays them out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import transformers

import fusedrl_import  # noqa: E402,F401  the installed fusedrl, else the source tree
from fusedrl.rollout import BuiltinEngine, SamplingConfig  # noqa: E402
from fusedrl.rollout.static_decode import StaticDecodeLoop  # noqa: E402

SHAPES = {
    "llama3.1-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                        max_position_embeddings=131072, tie_word_embeddings=False),
    "qwen3-4b": dict(model_type="qwen3", hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                     rope_theta=1000000.0, max_position_embeddings=40960, tie_word_embeddings=True),
    "tiny": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False),
}


def build_model(shape: str, device: torch.device, dtype: torch.dtype):
    import peft

    spec = dict(SHAPES[shape])
    config = transformers.AutoConfig.for_model(spec.pop("model_type"), **spec)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    lora = peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0)
    model = peft.get_peft_model(model, lora)
    with torch.no_grad():  # non-zero B, so the adapters change the outputs
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01)
    model.eval()
    return model, config


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a device-to-device copy (read + write counted)."""
    if device.type != "cuda":
        return float("nan")
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / 10
    del src, dst
    return 2 * (1 << 30) / seconds


def weight_bytes(model) -> int:
    """Bytes one decode step reads: every parameter except an untied embedding table (only B rows are read)."""
    embed = model.get_input_embeddings().weight
    tied = model.get_output_embeddings().weight.data_ptr() == embed.data_ptr()
    seen, total = set(), 0
    for param in model.parameters():
        if param.data_ptr() in seen or (param.data_ptr() == embed.data_ptr() and not tied):
            continue
        seen.add(param.data_ptr())
        total += param.numel() * param.element_size()
    return total


def kv_bytes_per_token(config, dtype) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_hf(engine: BuiltinEngine, prompts, tokens: int, device) -> tuple[float, float]:
    """(prefill s, ms per decode step) of transformers generate, from a 1-token and a (1 + tokens)-token call."""
    times = []
    for new in (1, 1 + tokens):
        sampling = SamplingConfig(max_new_tokens=new, temperature=1.0)
        sync(device)
        start = time.perf_counter()
        engine.generate(prompts, sampling, torch.Generator(device).manual_seed(0))
        sync(device)
        times.append(time.perf_counter() - start)
        engine.sleep()
    return times[0], 1e3 * (times[1] - times[0]) / tokens


def run_ours(loop: StaticDecodeLoop, prompts, new_tokens: int, device) -> dict:
    sampling = SamplingConfig(max_new_tokens=new_tokens, temperature=1.0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        ids, _ = loop.generate(prompts, sampling, torch.Generator(device).manual_seed(0))
    sync(device)
    total = time.perf_counter() - start
    stats = dict(loop.stats)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    cache_bytes = loop._cache.nbytes if loop._cache is not None else 0
    loop.release()
    steps = max(1, stats["decode_steps"])
    return dict(total_s=total, prefill_s=stats["prefill_s"], capture_s=stats["capture_s"],
                step_ms=1e3 * stats["decode_s"] / steps, steps=stats["decode_steps"], tokens=int(ids.numel()),
                peak_gib=peak / 2**30, weights_gib=base / 2**30, cache_gib=cache_bytes / 2**30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="llama3.1-8b,qwen3-4b")
    parser.add_argument("--batches", default="1,8,64,256")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--hf-tokens", type=int, default=16, help="decode steps timed for transformers generate")
    parser.add_argument("--attention", default="fused,sdpa", help="static-loop attention modes, first used in the round")
    parser.add_argument("--round-prompts", type=int, default=64)
    parser.add_argument("--round-group", type=int, default=8)
    parser.add_argument("--full-round", action="store_true", help="run the transformers round end to end")
    parser.add_argument("--no-round", action="store_true")
    parser.add_argument("--time-budget", type=float, default=1e9, help="seconds; later configurations are skipped")
    parser.add_argument("--json", default="bench_rollout.json")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shape on the CPU, to check the script runs")
    args = parser.parse_args()

    begin = time.perf_counter()
    if args.cpu_smoke:
        device, dtype = torch.device("cpu"), torch.float32
        args.shapes, args.batches, args.prompt_len, args.new_tokens = "tiny", "1,4", 8, 8
        args.hf_tokens, args.round_prompts, args.round_group = 4, 2, 2
    else:
        if not torch.cuda.is_available():
            sys.exit("bench_rollout.py needs a CUDA GPU (or --cpu-smoke)")
        device, dtype = torch.device("cuda"), torch.bfloat16
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    bandwidth = copy_bandwidth(device)
    print(f"card: {card} | torch {torch.__version__} | transformers {transformers.__version__} | "
          f"copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    rows, rounds = [], []
    for shape in args.shapes.split(","):
        if time.perf_counter() - begin > args.time_budget:
            rows.append(dict(shape=shape, status="skipped: time budget"))
            continue
        model, config = build_model(shape, device, dtype)
        vocab = config.vocab_size
        tokenizer = SimpleNamespace(eos_token_id=vocab - 1, pad_token_id=0)  # random weights: EOS is rare
        hf_engine = BuiltinEngine(model, tokenizer, static_decode=False)
        modes = args.attention.split(",")
        loops = {mode: StaticDecodeLoop(model, [vocab - 1], 0, attention=mode) for mode in modes}
        wbytes, kv_token = weight_bytes(model), kv_bytes_per_token(config, dtype)
        generator = torch.Generator().manual_seed(1)
        for batch in [int(b) for b in args.batches.split(",")]:
            if time.perf_counter() - begin > args.time_budget:
                rows.append(dict(shape=shape, batch=batch, status="skipped: time budget"))
                continue
            prompts = torch.randint(1, vocab - 1, (batch, args.prompt_len), generator=generator).tolist()
            hf = None
            for mode, loop in loops.items():
                row = dict(shape=shape, batch=batch, attention=mode, status="ok")
                try:
                    ours = run_ours(loop, prompts, args.new_tokens, device)
                    if hf is None:
                        hf = time_hf(hf_engine, prompts, args.hf_tokens, device)
                except torch.cuda.OutOfMemoryError as err:
                    loop.release()
                    row["status"] = f"OOM: {str(err)[:80]}"
                    rows.append(row)
                    continue
                hf_prefill, hf_step = hf
                mean_context = args.prompt_len + args.new_tokens / 2
                floor_ms = 1e3 * (wbytes + batch * mean_context * kv_token) / bandwidth
                row.update(ours, hf_step_ms=hf_step, hf_prefill_s=hf_prefill, floor_ms=floor_ms,
                           floor_x=ours["step_ms"] / floor_ms, speedup_vs_hf=hf_step / ours["step_ms"],
                           tokens_per_s=1e3 * batch / ours["step_ms"], hf_tokens_per_s=1e3 * batch / hf_step,
                           mem_x=ours["peak_gib"] / (ours["weights_gib"] + ours["cache_gib"]) if ours["cache_gib"]
                           else None)
                rows.append(row)
                print(json.dumps(row))
        if not args.no_round and time.perf_counter() - begin < args.time_budget:
            count = args.round_prompts * args.round_group
            distinct = torch.randint(1, vocab - 1, (args.round_prompts, args.prompt_len), generator=generator).tolist()
            prompts = [prompt for prompt in distinct for _ in range(args.round_group)]
            ours = run_ours(loops[modes[0]], prompts, args.new_tokens, device)
            if args.full_round:
                sampling = SamplingConfig(max_new_tokens=args.new_tokens, temperature=1.0)
                sync(device)
                start = time.perf_counter()
                hf_engine.generate(prompts, sampling, torch.Generator(device).manual_seed(0))
                sync(device)
                hf_total, how = time.perf_counter() - start, "measured"
            else:
                hf_prefill, hf_step = time_hf(hf_engine, prompts, args.hf_tokens, device)
                hf_total, how = hf_prefill + hf_step * (args.new_tokens - 1) / 1e3, "extrapolated"
            rounds.append(dict(shape=shape, attention=modes[0], completions=count, ours_s=ours["total_s"], ours_capture_s=ours["capture_s"],
                               ours_prefill_s=ours["prefill_s"], ours_step_ms=ours["step_ms"], hf_s=hf_total,
                               hf_how=how, speedup=hf_total / ours["total_s"], peak_gib=ours["peak_gib"],
                               mem_x=ours["peak_gib"] / (ours["weights_gib"] + ours["cache_gib"])))
            print(json.dumps(rounds[-1]))
        del model, hf_engine, loops
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print(f"\n{'shape':12s} {'attn':5s} {'batch':>5s} {'ms/step':>8s} {'floor':>7s} {'x floor':>7s} {'HF ms':>8s} {'x HF':>6s} "
          f"{'tok/s':>9s} {'prefill s':>9s} {'capture s':>9s} {'peak GiB':>8s} {'x(w+kv)':>7s}")
    for r in rows:
        if r.get("status") != "ok":
            print(f"{r['shape']:12s} {r.get('attention', '-'):5s} {r.get('batch', '-')!s:>5s} {r['status']}")
            continue
        print(f"{r['shape']:12s} {r['attention']:5s} {r['batch']:5d} {r['step_ms']:8.2f} {r['floor_ms']:7.2f} {r['floor_x']:7.2f} "
              f"{r['hf_step_ms']:8.2f} {r['speedup_vs_hf']:6.1f} {r['tokens_per_s']:9.0f} {r['prefill_s']:9.3f} "
              f"{r['capture_s']:9.3f} {r['peak_gib']:8.2f} {r['mem_x'] or float('nan'):7.3f}")
    for r in rounds:
        print(f"GRPO round {r['shape']} ({r['attention']}): {r['completions']} x {args.new_tokens} tokens: ours {r['ours_s']:.2f} s "
              f"(capture {r['ours_capture_s']:.2f} s, prefill {r['ours_prefill_s']:.2f} s), transformers "
              f"{r['hf_s']:.1f} s ({r['hf_how']}) -> {r['speedup']:.1f}x; peak {r['peak_gib']:.2f} GiB "
              f"= {r['mem_x']:.3f} x (weights + KV)")
    meta = dict(device=card, bandwidth_tb_s=bandwidth / 1e12, torch=torch.__version__,
                transformers=transformers.__version__, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                hf_tokens=args.hf_tokens, dtype=str(dtype))
    Path(args.json).write_text(json.dumps(dict(meta=meta, rows=rows, rounds=rounds), indent=1))


if __name__ == "__main__":
    main()
