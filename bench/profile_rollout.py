"""Where the time of one static-loop decode step (and of the prefill) goes: torch.profiler kernel tables.

For each batch size: one eager decode step and one CUDA-graph replay of the same step, profiled with CUPTI; kernels
are grouped into kinds (GEMM, attention, norm, elementwise, sampling/reduction, copies) with their count per step,
count per layer and total device time. The prefill of `--prefill-rows` x `--prompt-len` tokens is profiled too, to
see which attention kernel SDPA picks there. Writes the tables to stdout and a JSON summary.

    python bench/profile_rollout.py [--shape llama3.1-8b] [--batches 8,256] [--attention sdpa,fused] [--json F]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fusedrl_import  # noqa: E402,F401
from bench_rollout import build_model  # noqa: E402
from fusedrl.rollout import SamplingConfig  # noqa: E402
from fusedrl.rollout.static_decode import StaticDecodeLoop  # noqa: E402

KINDS = (  # first match wins
    ("attention", r"flash|fmha|attention|attn|sdpa|efficient"),
    ("gemm", r"gemm|cutlass|sm90_xmma|nvjet|cublas|splitk|gemv|matmul"),
    ("norm", r"rms_norm|rmsnorm|layer_norm|norm"),
    ("rotary/cache", r"rotary|cache_write|index_copy|indexcopy|roll"),
    ("sampling/reduce", r"reduce|softmax|topk|sort|scan|cumsum|argmax|searchsorted|logsumexp|gather|scatter"),
    ("copy/cast", r"copy|cast|convert|cat|fill"),
    ("elementwise", r"elementwise|vectorized|unrolled|mul|add|silu"),
)


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, pattern in KINDS:
        if re.search(pattern, low):
            return kind
    return "other"


def kernel_table(prof, steps: int, layers: int) -> dict:
    """{kind: {count per step, per layer, us per step}} plus the top kernels, from a profiler's device events."""
    kinds, kernels = {}, {}
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = event.device_time_total if hasattr(event, "device_time_total") else event.cuda_time_total
        entry = kernels.setdefault(event.name, [0, 0.0])
        entry[0] += 1
        entry[1] += us
    for name, (count, us) in kernels.items():
        k = kinds.setdefault(kind_of(name), [0, 0.0])
        k[0] += count
        k[1] += us
    total_count = sum(c for c, _ in kinds.values())
    total_us = sum(u for _, u in kinds.values())
    return dict(
        kernels_per_step=total_count / steps, kernels_per_layer=total_count / steps / layers,
        device_us_per_step=total_us / steps,
        kinds={k: dict(per_step=c / steps, per_layer=c / steps / layers, us_per_step=u / steps)
               for k, (c, u) in sorted(kinds.items(), key=lambda kv: -kv[1][1])},
        top=[dict(name=n[:110], per_step=c / steps, us_per_step=u / steps)
             for n, (c, u) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[:25]],
    )


def print_table(title: str, table: dict) -> None:
    print(f"\n== {title}: {table['kernels_per_step']:.0f} kernels/step ({table['kernels_per_layer']:.1f} per layer), "
          f"{table['device_us_per_step'] / 1e3:.2f} ms device time/step")
    for kind, v in table["kinds"].items():
        print(f"  {kind:16s} {v['per_step']:7.1f}/step {v['per_layer']:6.2f}/layer {v['us_per_step'] / 1e3:8.3f} ms")
    for top in table["top"][:15]:
        print(f"    {top['us_per_step']:9.1f} us  x{top['per_step']:6.1f}  {top['name']}")


def profiled(fn, steps: int):
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    return prof


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama3.1-8b")
    parser.add_argument("--batches", default="8,256")
    parser.add_argument("--attention", default="sdpa", help="comma list of StaticDecodeLoop attention modes")
    parser.add_argument("--prompt-len", type=int, default=510, help="the profiled step attends ~ this + 2 slots")
    parser.add_argument("--prefill-rows", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json", default="profile_rollout.json")
    args = parser.parse_args()

    device = torch.device("cuda")
    model, config = build_model(args.shape, device, torch.bfloat16)
    layers, vocab = config.num_hidden_layers, config.vocab_size
    generator = torch.Generator().manual_seed(1)
    result = dict(shape=args.shape, device=torch.cuda.get_device_name(), torch=torch.__version__, runs=[])
    for attention in args.attention.split(","):
        try:
            loop = StaticDecodeLoop(model, [vocab - 1], 0, attention=attention)
        except TypeError:  # a loop without the attention option: the SDPA path
            loop = StaticDecodeLoop(model, [vocab - 1], 0)
        for batch in [int(b) for b in args.batches.split(",")]:
            prompts = torch.randint(1, vocab - 1, (batch, args.prompt_len), generator=generator).tolist()
            sampling = SamplingConfig(max_new_tokens=2, temperature=1.0)
            slot = args.prompt_len + 1
            with torch.no_grad():
                loop.generate(prompts, sampling, torch.Generator(device).manual_seed(0))  # cache, state, graphs
                state = loop._states[batch]
                kv_len = loop._kv_len(slot, loop._cache) if hasattr(loop, "_kv_len") else loop._cache.length

                def eager_step():
                    state.slot.fill_(slot)  # one tiny fill kernel per step; keeps every write inside the cache
                    state.step.zero_()
                    loop._decode_step(state, kv_len, sampling)

                eager = kernel_table(profiled(eager_step, args.steps), args.steps, layers)
                print_table(f"{attention} batch {batch} eager step (kv_len {kv_len})", eager)
                run = dict(attention=attention, batch=batch, kv_len=kv_len, eager=eager)
                graph = loop._graphs.get((batch, kv_len, sampling))
                if graph is not None:
                    def replay_step():
                        state.slot.fill_(slot)
                        state.step.zero_()
                        graph.replay()

                    replay = kernel_table(profiled(replay_step, args.steps), args.steps, layers)
                    print_table(f"{attention} batch {batch} graph replay", replay)
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    for _ in range(20):
                        replay_step()
                    torch.cuda.synchronize()
                    run["replay"] = replay
                    run["replay_ms"] = (time.perf_counter() - start) / 20 * 1e3
                    print(f"   graph replay wall time {run['replay_ms']:.2f} ms/step")
                result["runs"].append(run)
            loop.release()
        rows, length = args.prefill_rows, 256
        prompts = torch.randint(1, vocab - 1, (rows, length), generator=generator).tolist()
        prompts[0] = prompts[0][: length // 2]  # one shorter prompt: left padding, as in a real batch
        sampling = SamplingConfig(max_new_tokens=1, temperature=1.0)
        with torch.no_grad():
            prof = profiled(lambda: loop.generate(prompts, sampling, torch.Generator(device).manual_seed(0)), 1)
        prefill = kernel_table(prof, 1, layers)
        print_table(f"{attention} prefill {rows} x {length} (one row shorter)", prefill)
        print(f"   prefill wall {loop.stats['prefill_s']:.3f} s")
        result["runs"].append(dict(attention=attention, prefill_rows=rows, prefill=prefill,
                                   prefill_s=loop.stats["prefill_s"]))
        loop.release()
        del loop
    Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
