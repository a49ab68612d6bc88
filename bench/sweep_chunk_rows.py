"""Sweeps the fused loss op's rows per chunk at one shape: time of forward+backward (frozen head) and of the
logprob-only pass, and the extra peak memory, against the GEMM floor measured in the same process (CUDA).

    python bench/sweep_chunk_rows.py --hidden 2560 --vocab 151936 --tokens 16384 --rows 512,768,1024,1280,1536,2048
"""

from __future__ import annotations

import argparse
import json

import torch

from fusedrl.ops import grpo_loss, selective_logp


def median_ms(fn, reps: int = 7) -> float:
    fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=2560)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--rows", default="512,768,1024,1280,1536,2048")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    n, h, v = args.tokens, args.hidden, args.vocab
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(1, n, h, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    weight = (torch.randn(v, h, device="cuda", generator=g) / h**0.5).bfloat16()
    ids = torch.randint(0, v, (1, n), device="cuda", generator=g)
    mask = torch.ones(1, n, dtype=torch.long, device="cuda")
    adv = torch.ones(1, device="cuda")
    gemm = median_ms(lambda: hidden.detach()[0] @ weight.T)
    print(f"{torch.cuda.get_device_name()}: N={n} H={h} V={v}; one GEMM {gemm:.2f} ms")
    rows_out = []
    for rows in [int(r) for r in args.rows.split(",")] + [None]:
        def step():
            hidden.grad = None
            grpo_loss(hidden, weight, ids, mask, adv, loss_type="grpo", chunk_size=rows).loss.backward()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        frozen = median_ms(step)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        logprob = median_ms(lambda: selective_logp(hidden.detach(), weight, ids, chunk_size=rows))
        row = dict(rows=rows or "default", frozen_ms=frozen, frozen_x=frozen / (2 * gemm), logprob_ms=logprob,
                   logprob_x=logprob / gemm, peak_extra_gib=peak)
        rows_out.append(row)
        print(f"rows {str(rows or 'default'):>8}: frozen {frozen:7.2f} ms ({frozen / (2 * gemm):.3f} x 2 GEMMs), "
              f"logprob {logprob:7.2f} ms ({logprob / gemm:.3f} x GEMM), peak extra {peak:.3f} GiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), n=n, h=h, v=v, gemm_ms=gemm, rows=rows_out), f, indent=1)


if __name__ == "__main__":
    main()
