"""The console report of bench_grpo_loss.py: one table row per measurement, then the target checks."""

from __future__ import annotations

from typing import Any


def format_ms(row: dict[str, Any]) -> str:
    return f"{row['ms']:.2f} ms" if row.get("status") == "ok" else row["status"]


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_report(bench: Any, target_n: int) -> None:
    """The table of every row of a finished Bench, then its target checks."""
    meta = bench.meta
    print(f"\n== GRPO loss bench on {meta['device']} | torch {meta['torch']} cuda {meta['cuda']} | liger "
          f"{meta['liger_kernel']} (chunk_size {meta['liger_chunk_size']}) | fusedrl {meta['fusedrl']} commit "
          f"{meta['commit']} | timer {meta['timer']} | T={bench.args.seq_len} "
          f"bf16 | naive={meta['naive']} ==")
    print("x_floor = ms / (mode's GEMM count x one torch.mm); speedup = naive ms / ms; peak GiB includes grads")
    header = (f"{'shape':12s} {'N':>6s} {'mode':16s} {'impl':8s} {'ms':>9s} {'peakGiB':>8s} {'TFLOP/s':>8s} "
              f"{'x_floor':>7s} {'speedup':>7s}  rel_err / status")
    print(header)
    print("-" * len(header))
    for row in bench.rows:
        if row.get("status") != "ok":
            print(f"{row['shape']:12s} {row['n_tokens']:>6d} {row['mode']:16s} {row['impl']:8s} {row['status']}")
            continue
        errs = row.get("rel_err_vs_naive") or {}
        err_text = " ".join(f"{k}={v:.1e}" for k, v in errs.items())
        if row.get("note"):
            err_text += f" ({row['note']})"
        print(f"{row['shape']:12s} {row['n_tokens']:>6d} {row['mode']:16s} {row['impl']:8s} {row['ms']:9.2f} "
              f"{fmt(row.get('peak_extra_gib'), '8.3f')} {fmt(row.get('tflops'), '8.1f')} "
              f"{fmt(row.get('floor_x'), '7.2f')} {fmt(row.get('speedup_vs_naive'), '7.2f')}  {err_text}")
    checks = bench.target_checks()
    print(f"\nTargets (fusedrl at N={target_n}): frozen <= 1.25 x 2 GEMMs and <= 0.5 GiB extra; trainable <= "
          f"1.25 x 3 GEMMs; logprob <= 1.15 x 1 GEMM")
    if bench.device.type != "cuda":
        print("  not evaluated: targets apply to a CUDA device")
    elif not checks:
        print(f"  none evaluated (no successful fusedrl row at N={target_n} with a GEMM floor)")
    for check in checks:
        mem = "" if check["target_extra_gib"] is None else (
            f", extra {fmt(check['peak_extra_gib'], '.3f')} GiB (<= {check['target_extra_gib']})")
        verdict = "PASS" if check["passed"] else "FAIL"
        print(f"  {verdict} {check['shape']:12s} {check['mode']:16s} {check['floor_x']:.2f} x floor "
              f"(<= {check['target_x']}){mem}")
