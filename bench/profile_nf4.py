"""Where the time of fusedrl's NF4 + LoRA linear goes, next to bf16 + peft LoRA and bitsandbytes + peft.

For each (shape, M): one forward+backward (or a no-grad forward with --fwd) under torch.profiler, after warm-up;
prints the key averages (self CUDA time, self CPU time, calls) per implementation, and a summary per step:
  host ms   wall time of the Python call with the GPU queue drained first (what the CPU spends issuing it)
  gpu ms    sum of the CUDA kernel times (what the GPU spends, with no gaps)
  event ms  CUDA-event time of the call (what bench_nf4.py reports: max of the two, plus gaps)
  kernels   by group: nf4 (dequant, fused small-M, LoRA down), gemm (cuBLAS / cutlass), elementwise (copies, adds,
            scales, casts), other
so a slower row says whether the host or the GPU is the cause. Writes --json.

  python bench/profile_nf4.py --shapes q,k --tokens 4096 --json profile_nf4.json
  python bench/profile_nf4.py --shapes q,gate,down --tokens 1,8 --fwd
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import fusedrl_import  # noqa: F401  the installed fusedrl, else the source tree
from bench_nf4 import PROJECTIONS, Clock, build_layers

GROUPS = (("nf4", ("nf4",)), ("gemm", ("gemm", "sm90_", "cutlass", "cublas", "xmma", "splitk")),
          ("elementwise", ("elementwise", "copy", "mul", "add", "fill", "cast", "reduce")))


def kernel_group(name: str) -> str:
    lowered = name.lower()
    for group, keys in GROUPS:
        if any(k in lowered for k in keys):
            return group
    return "other"


def host_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(times)


def profile(fn, steps: int):
    from torch.profiler import ProfilerActivity, profile as torch_profile

    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    kernels: dict[str, dict] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = kernels.setdefault(event.name, dict(us=0.0, calls=0))
            entry["us"] += event.time_range.elapsed_us() / steps
            entry["calls"] += 1
    table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=70)
    return kernels, table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama3.1-8b")
    parser.add_argument("--shapes", default="q,k")
    parser.add_argument("--tokens", default="4096")
    parser.add_argument("--fwd", action="store_true", help="no-grad forward instead of forward+backward")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--no-bnb", action="store_true")
    parser.add_argument("--tables", action="store_true", help="print the profiler's key-average tables too")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device, dtype = torch.device("cuda"), torch.bfloat16
    with_bnb = not args.no_bnb
    if with_bnb:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            with_bnb = False
    mode = "fwd" if args.fwd else "fwd+bwd"
    print(f"profile_nf4 on {torch.cuda.get_device_name()} | torch {torch.__version__} | {mode}")
    results = []
    for name in args.shapes.split(","):
        n, k = PROJECTIONS[args.model][name]
        layers, _ = build_layers(n, k, device, dtype, with_bnb)
        for m in (int(t) for t in args.tokens.split(",")):
            x = torch.randn(m, k, device=device, dtype=dtype)
            grad = torch.randn(m, n, device=device, dtype=dtype)
            for impl, (layer, params) in layers.items():
                if args.fwd:
                    def fn(layer=layer):
                        with torch.no_grad():
                            return layer(x)
                else:
                    def fn(layer=layer, params=params):
                        xg = x.detach().requires_grad_()
                        y = layer(xg)
                        torch.autograd.grad(y, [xg, *params], grad)
                for _ in range(3):
                    fn()
                kernels, table = profile(fn, 5)
                groups: dict[str, float] = {}
                for kname, entry in kernels.items():
                    groups[kernel_group(kname)] = groups.get(kernel_group(kname), 0.0) + entry["us"] / 1e3
                row = dict(shape=[n, k], name=name, m=m, mode=mode, impl=impl, host_ms=host_ms(fn, args.reps),
                           event_ms=Clock(torch.device("cuda"), args.reps).time_ms(fn), gpu_ms=sum(groups.values()), groups=groups,
                           kernels={kn: e for kn, e in sorted(kernels.items(), key=lambda kv: -kv[1]["us"])[:12]})
                results.append(row)
                group_text = " ".join(f"{g} {ms:.3f}" for g, ms in sorted(groups.items()))
                print(f"{name:5s} M={m:<6d} {impl:8s} host {row['host_ms']:.3f} ms | gpu {row['gpu_ms']:.3f} ms "
                      f"({group_text}) | event {row['event_ms']:.3f} ms", flush=True)
                for kn, e in list(row["kernels"].items())[:8]:
                    print(f"        {e['us']:9.1f} us x{e['calls'] // 5:<3d} {kn[:110]}")
                if args.tables:
                    print(table)
        del layers
        torch.cuda.empty_cache()
    if args.json:
        args.json.write_text(json.dumps(dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                                             mode=mode, rows=results), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
