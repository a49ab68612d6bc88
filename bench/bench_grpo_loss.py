"""Benchmark of the fused lm-head + log-softmax + GRPO loss against its peers, in one process on one card.

Times forward+backward (or the no-grad forward, for logprob-only) of:
  naive    PyTorch as TRL does it: bf16 logits materialised, fp32 log_softmax, gather, the GRPO loss formulas
  liger    Liger-Kernel's LigerFusedLinearGRPOLoss as TRL builds it (its default chunk_size; logprob-only uses
           its chunk_forward)
  fusedrl  fusedrl.ops.grpo_loss / fusedrl.ops.selective_logp
and the floor: one bf16 (N,H) @ (H,V) torch.mm. A mode's floor is that GEMM time times the GEMMs the mode
needs (frozen lm-head: 2, trainable lm-head: 3, logprob-only: 1).

The peers live in grpo_loss_peers.py; runs are timed by triton.testing.do_bench on a GPU (torch.utils.benchmark
without triton, and on the CPU), see timing.py. Reports median ms, peak extra memory (max_memory_allocated over what the inputs already hold; the produced
gradients count as extra), achieved TFLOP/s (2*N*H*V per needed GEMM), ratio to the floor, speedup over naive
and the relative error of loss / gradients / logp against the naive path. Prints a table, checks the targets
at N=16384 and writes every number to --json.

  python bench/bench_grpo_loss.py --quick --json out.json     # GPU: N=16384, Qwen3-4B-like shape
  python bench/bench_grpo_loss.py --cpu-smoke                 # CPU: tiny shapes, checks every path runs
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from grpo_loss_peers import (
    Inputs,
    Step,
    StepResult,
    build_fusedrl,
    build_liger,
    build_naive,
    liger_default_chunk_size,
    liger_version,
    make_inputs,
    naive_source,
)
from bench_report import format_ms, print_report
from timing import time_runs_ms, timer_name

GIB = float(1 << 30)


@dataclasses.dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int
    vocab: int


SHAPES: dict[str, ModelShape] = {
    "qwen3-4b": ModelShape("qwen3-4b", 2560, 151936),
    "llama3.1-8b": ModelShape("llama3.1-8b", 4096, 128256),
    "tiny": ModelShape("tiny", 96, 1031),
}


@dataclasses.dataclass(frozen=True)
class Mode:
    name: str
    gemms: int  # GEMMs of N x H x V the mode needs at least
    trainable_head: bool
    level: str | None  # importance_sampling_level; None for logprob-only
    target_ratio: float  # target: time <= target_ratio * gemms * one GEMM (at the target N)
    target_extra_gib: float | None  # target: peak extra memory (None: no memory target)


MODES: dict[str, Mode] = {
    "frozen_token": Mode("frozen_token", 2, False, "token", 1.25, 0.5),
    "frozen_sequence": Mode("frozen_sequence", 2, False, "sequence", 1.25, 0.5),
    "trainable_token": Mode("trainable_token", 3, True, "token", 1.25, None),
    "logprob": Mode("logprob", 1, False, None, 1.15, None),
}
IMPLS = ("naive", "liger", "fusedrl")
TARGET_N = 16384


# --------------------------------------------------------------------------------------------- timing


def clear_grads(inputs: Inputs) -> None:
    inputs.hidden.grad = None
    inputs.weight.grad = None


def measure(step: Step, inputs: Inputs, device: torch.device, warmup: int,
            seconds_per_measure: float) -> tuple[list[float], float | None, StepResult]:
    """Warm up (compilation, autotuning), measure peak extra memory on one run, then time runs with the
    library timer (timing.py) for about seconds_per_measure."""
    def run() -> StepResult:
        clear_grads(inputs)
        return step()

    for _ in range(max(1, warmup)):
        run()
    peak_extra: float | None = None
    clear_grads(inputs)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        result = step()
        torch.cuda.synchronize()
        peak_extra = (torch.cuda.max_memory_allocated() - base) / GIB
    else:
        result = step()
    return time_runs_ms(run, device, seconds_per_measure), peak_extra, result


def rel_err(value: torch.Tensor, reference: torch.Tensor) -> float:
    value, reference = value.float(), reference.float()  # float32 norms: enough, and half the memory
    denom = reference.norm().item()
    diff = (value - reference).norm().item()
    return diff / denom if denom > 0 else diff


def snapshot(result: StepResult, inputs: Inputs) -> dict[str, torch.Tensor]:
    """What a run produced, kept to compare implementations (gradients included)."""
    out = {k: v.detach().clone() for k, v in result.items()}
    if inputs.hidden.grad is not None:
        out["grad_hidden"] = inputs.hidden.grad.detach().clone()
    if inputs.weight.grad is not None:
        out["grad_weight"] = inputs.weight.grad.detach().clone()
    return out


# --------------------------------------------------------------------------------------------- driver


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def free_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


class Bench:
    def __init__(self, args: argparse.Namespace, device: torch.device) -> None:
        self.args, self.device = args, device
        self.rows: list[dict[str, Any]] = []
        self.started = time.monotonic()
        self.meta = self._meta()

    def _meta(self) -> dict[str, Any]:
        fusedrl_version = None
        try:
            import fusedrl

            fusedrl_version = getattr(fusedrl, "__version__", None)
        except ImportError:
            pass
        commit = self.args.commit
        if commit is None:
            try:
                commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                        cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or None
            except (OSError, subprocess.SubprocessError):
                commit = None
        cuda = self.device.type == "cuda"
        return {
            "device": torch.cuda.get_device_name(self.device) if cuda else "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda, "liger_kernel": liger_version(),
            "liger_chunk_size": liger_default_chunk_size(), "timer": timer_name(self.device),
            "fusedrl": fusedrl_version, "commit": commit,
            "allow_tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "args": vars(self.args), "target_n": TARGET_N, "naive": naive_source(self.args.naive),
        }

    def over_budget(self) -> bool:
        return self.args.time_budget > 0 and time.monotonic() - self.started > self.args.time_budget

    def write_json(self) -> None:
        if self.args.json:
            Path(self.args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(self.args.json).write_text(json.dumps(
                {"meta": self.meta, "rows": self.rows, "targets": self.target_checks()}, indent=1))

    def record(self, **row: Any) -> dict[str, Any]:
        self.rows.append(row)
        self.write_json()
        return row

    def run_gemm(self, shape: ModelShape, inputs: Inputs, n_tokens: int) -> float | None:
        a = inputs.hidden.detach().reshape(-1, shape.hidden)
        b = inputs.weight.detach().t()  # (H, V) view
        base = dict(shape=shape.name, n_tokens=n_tokens, mode="gemm", impl="torch.mm")
        try:
            times, peak, _ = measure(lambda: {"out": torch.mm(a, b)}, inputs, self.device, self.args.warmup,
                                     self.args.seconds_per_measure)
        except Exception as exc:  # noqa: BLE001 - recorded and reported; the bench continues
            status = "OOM" if is_oom(exc) else f"error: {type(exc).__name__}: {str(exc)[:300]}"
        else:
            status = "ok"
        if status != "ok":
            free_memory(self.device)  # after the except block: the exception's frames no longer hold tensors
            self.record(**base, status=status)
            return None
        ms = statistics.median(times)
        flops = 2.0 * n_tokens * shape.hidden * shape.vocab
        self.record(**base, status="ok", ms=ms, ms_min=min(times), reps=len(times), peak_extra_gib=peak,
                    tflops=flops / ms / 1e9)
        return ms

    def run_impl(self, impl: str, shape: ModelShape, mode: Mode, inputs: Inputs, n_tokens: int,
                 gemm_ms: float | None, reference: dict[str, torch.Tensor] | None,
                 naive_ms: float | None) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
        base = dict(shape=shape.name, n_tokens=n_tokens, mode=mode.name, impl=impl)
        if self.over_budget():
            return self.record(**base, status="skipped: --time-budget reached"), None
        inputs.hidden.requires_grad_(mode.level is not None)
        inputs.weight.requires_grad_(mode.trainable_head)
        note = None
        try:
            if impl == "naive":
                step = build_naive(inputs, mode.level, self.args.epsilon, self.meta["naive"])
            elif impl == "liger":
                step = build_liger(inputs, mode.level, self.args.epsilon, compiled=self.args.liger_compiled)
            else:
                step = build_fusedrl(inputs, mode.level, self.args.epsilon)
        except ImportError as exc:
            return self.record(**base, status=f"skipped: not importable ({exc})"), None
        try:
            try:
                times, peak, result = measure(step, inputs, self.device, self.args.warmup,
                                              self.args.seconds_per_measure)
            except Exception as exc:  # noqa: BLE001 - torch.compile trouble: retry Liger eagerly, say so
                if impl != "liger" or is_oom(exc) or not self.args.liger_compiled or mode.level is None:
                    raise
                note = f"torch.compile failed ({type(exc).__name__}); ran Liger with compiled=False"
                free_memory(self.device)
                step = build_liger(inputs, mode.level, self.args.epsilon, compiled=False)
                times, peak, result = measure(step, inputs, self.device, self.args.warmup,
                                              self.args.seconds_per_measure)
            produced = snapshot(result, inputs)
        except Exception as exc:  # noqa: BLE001 - recorded and reported; the bench continues
            if is_oom(exc):
                status = "OOM"
            else:
                status = f"error: {type(exc).__name__}: {str(exc)[:300]}"
                traceback.print_exc(limit=3)
        else:
            status = "ok"
        clear_grads(inputs)
        if status != "ok":
            free_memory(self.device)  # after the except block: the exception's frames no longer hold tensors
            return self.record(**base, status=status), None
        ms = statistics.median(times)
        flops = mode.gemms * 2.0 * n_tokens * shape.hidden * shape.vocab
        floor_ms = None if gemm_ms is None else mode.gemms * gemm_ms
        row = dict(
            **base, status="ok", note=note, ms=ms, ms_min=min(times), reps=len(times), peak_extra_gib=peak,
            tflops=flops / ms / 1e9, floor_ms=floor_ms, floor_x=None if floor_ms is None else ms / floor_ms,
            speedup_vs_naive=None if naive_ms is None else naive_ms / ms,
        )
        if reference is not None and impl != "naive":
            row["rel_err_vs_naive"] = {k: rel_err(produced[k], reference[k]) for k in reference if k in produced}
        free_memory(self.device)
        return self.record(**row), produced

    def run_config(self, shape: ModelShape, n_tokens: int) -> None:
        args = self.args
        if self.over_budget():
            self.record(shape=shape.name, n_tokens=n_tokens, mode="all", impl="-",
                        status="skipped: --time-budget reached")
            return
        try:
            inputs = make_inputs(shape, n_tokens, args.seq_len, args.masked_fraction, torch.bfloat16,
                                 self.device, args.seed)
        except torch.OutOfMemoryError:
            inputs = None
        if inputs is None:
            free_memory(self.device)
            self.record(shape=shape.name, n_tokens=n_tokens, mode="inputs", impl="-", status="OOM")
            return
        masked = 1.0 - inputs.completion_mask.float().mean().item()
        print(f"[bench] {shape.name} N={n_tokens} (B={n_tokens // args.seq_len}, T={args.seq_len}) masked="
              f"{masked:.1%} inputs={inputs.footprint_bytes() / GIB:.2f} GiB", flush=True)
        gemm_ms = self.run_gemm(shape, inputs, n_tokens)
        for mode_name in args.modes:
            mode = MODES[mode_name]
            reference: dict[str, torch.Tensor] | None = None
            naive_ms: float | None = None
            for impl in args.impls:
                row, produced = self.run_impl(impl, shape, mode, inputs, n_tokens, gemm_ms, reference, naive_ms)
                if impl == "naive" and row["status"] == "ok":
                    reference, naive_ms = produced, row["ms"]
                print(f"[bench]   {mode.name:16s} {impl:8s} {format_ms(row)}", flush=True)
            del reference
            free_memory(self.device)
        del inputs
        free_memory(self.device)

    def target_checks(self) -> list[dict[str, Any]]:
        checks = []
        for row in self.rows:
            if row["impl"] != "fusedrl" or row["n_tokens"] != TARGET_N or row.get("status") != "ok":
                continue
            mode = MODES[row["mode"]]
            if row.get("floor_x") is None:
                continue
            time_ok = row["floor_x"] <= mode.target_ratio
            mem_ok = True
            if mode.target_extra_gib is not None and row.get("peak_extra_gib") is not None:
                mem_ok = row["peak_extra_gib"] <= mode.target_extra_gib
            checks.append(dict(shape=row["shape"], mode=mode.name, floor_x=row["floor_x"],
                               target_x=mode.target_ratio, peak_extra_gib=row.get("peak_extra_gib"),
                               target_extra_gib=mode.target_extra_gib, passed=time_ok and mem_ok))
        return checks


def parse_list(text: str, allowed: tuple[str, ...] | list[str], what: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in items if item not in allowed]
    if unknown or not items:
        raise SystemExit(f"{what}: expected a comma list of {', '.join(allowed)}; got {text!r}")
    return items


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only N=16384 with the qwen3-4b shape")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU: checks every path runs")
    parser.add_argument("--shapes", default=None,
                        help=f"comma list of {', '.join(SHAPES)} (default: qwen3-4b,llama3.1-8b; --quick: qwen3-4b)")
    parser.add_argument("--n-tokens", default=None,
                        help="comma list of token counts N = B*T (default: 4096,16384,65536; --quick: 16384)")
    parser.add_argument("--seq-len", type=int, default=1024, help="completion length T (N must be a multiple)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma list of {', '.join(MODES)}")
    parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma list of {', '.join(IMPLS)}")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seconds-per-measure", type=float, default=2.0,
                        help="measuring time per configuration given to the library timer (median reported)")
    parser.add_argument("--time-budget", type=float, default=0.0,
                        help="seconds; once spent, remaining measurements are recorded as skipped (0 = none)")
    parser.add_argument("--masked-fraction", type=float, default=0.25)
    parser.add_argument("--epsilon", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-liger-compile", dest="liger_compiled", action="store_false",
                        help="run Liger with compiled=False (default: its default, compiled=True)")
    parser.add_argument("--naive", choices=("reference", "inline"), default="reference",
                        help="naive peer: fusedrl.ops.reference (TRL-like, computes entropy too; used when "
                             "importable) or this file's leaner inline version")
    parser.add_argument("--commit", default=None,
                        help="commit to record (default: git rev-parse here; the GPU machine's copy has no git)")
    parser.add_argument("--json", default=None, help="write all results to this path")
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        args.shapes, args.n_tokens, args.seq_len = args.shapes or "tiny", args.n_tokens or "256", 32
        args.warmup, args.seconds_per_measure, args.liger_compiled = 1, 0.05, False
    elif args.quick:
        args.shapes, args.n_tokens = args.shapes or "qwen3-4b", args.n_tokens or str(TARGET_N)
    else:
        args.shapes, args.n_tokens = args.shapes or "qwen3-4b,llama3.1-8b", args.n_tokens or "4096,16384,65536"
    args.shapes = parse_list(args.shapes, list(SHAPES), "--shapes")
    args.modes = parse_list(args.modes, list(MODES), "--modes")
    args.impls = parse_list(args.impls, IMPLS, "--impls")
    try:
        args.n_tokens = [int(n) for n in args.n_tokens.split(",")]
    except ValueError:
        raise SystemExit(f"--n-tokens: expected a comma list of integers; got {args.n_tokens!r}") from None
    bad = [n for n in args.n_tokens if n <= 0 or n % args.seq_len]
    if bad:
        raise SystemExit(f"--n-tokens: each N must be a positive multiple of --seq-len={args.seq_len}; got {bad}")
    if args.impls[0] != "naive" and "naive" in args.impls:
        args.impls.remove("naive")
        args.impls.insert(0, "naive")  # naive runs first: it is the reference for errors and speedups
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cpu_smoke:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        print("no CUDA device: run with --cpu-smoke for the tiny CPU check", file=sys.stderr)
        return 2
    bench = Bench(args, device)
    for shape_name in args.shapes:
        for n_tokens in args.n_tokens:
            bench.run_config(SHAPES[shape_name], n_tokens)
    bench.write_json()
    print_report(bench, TARGET_N)
    if args.json:
        print(f"\nwrote {args.json}")
    failed = [row for row in bench.rows if str(row.get("status", "")).startswith("error")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
