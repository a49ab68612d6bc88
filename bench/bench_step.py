"""One whole GRPO optimizer step at long context: peak GPU memory, pinned host memory, seconds per step.

Runs `fusedrl.GRPOTrainer.train()` for one or two optimizer steps (the public API, one micro-batch of 8
completions of one prompt) on a random-init model of a real shape with LoRA r16 on every linear layer (bf16, or
QLoRA: fusedrl's NF4 layers or bitsandbytes 4-bit, see step_models.py), with a fixed-length rollout engine (random
completions of exactly N tokens: generation is out of the picture), under each checkpointing mode:
  plain            gradient_checkpointing=True, unchunked MLP (torch.utils.checkpoint through transformers)
  offload          gradient_checkpointing="offload" + token chunks (MLP, norms) from the memory plan
  offload-eager    the same, but the layer's recompute also computes the chunked MLP's output (as before the fix:
                   the MLP runs three times per step instead of twice)
  offload-nochunk  gradient_checkpointing="offload", mlp_chunk_tokens=0
  chunk            gradient_checkpointing=True, mlp_chunk_tokens=8192 (chunking without offload)
  trl              a TRL-style step in the same process: transformers forward with logits for the completion
                   positions, fp32 log-softmax, the same dapo loss, transformers' own checkpointing
and prints the memory plan's estimate next to the measured peak. `--search LABELS` prints the plan's longest
context of the offload mode in 80 GB and in the card, on the GPU side and within the host's pinnable memory; a run
of that context in --runs confirms it (the summary names the longest measured context that stayed within 80 GB).
`--diagnose-dir DIR` first writes DIR/profile_<mode>.txt (torch.profiler over one warm step at --profile-context:
per-stream busy time, compute-stream gaps, host synchronisations, top kernels/ops) and DIR/memory_<context>.txt
(the live allocations at the peak of one --snapshot-context offload step, with their Python frames).

  python bench/bench_step.py --json step.json --time-budget 240          # GPU
  python bench/bench_step.py --runs "llama3.1-8b:bf16:4096:plain+offload,qwen3-4b:bf16:4096:offload"
  python bench/bench_step.py --cpu-smoke                                  # CPU: tiny shape, every path runs
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import fusedrl_import  # noqa: E402,F401  the installed fusedrl, else the source tree

from step_models import build_model  # noqa: E402

from fusedrl import GRPOConfig, GRPOTrainer  # noqa: E402
from fusedrl.model.tiny import tiny_word_tokenizer  # noqa: E402
from fusedrl.rollout.base import RolloutOutput, SamplingConfig  # noqa: E402
from fusedrl.train.checkpointing import pinnable_host_bytes  # noqa: E402
from fusedrl.train.memory_plan import ModelShape, available_host_bytes, estimate, longest_sequence  # noqa: E402

GIB = float(2**30)
# mode -> (gradient_checkpointing, mlp_chunk_tokens, defer the MLP in the recompute)
MODES = {"plain": (True, 0, True), "offload": ("offload", None, True), "offload-eager": ("offload", None, False),
         "offload-nochunk": ("offload", 0, True), "chunk": (True, 8192, True)}
PROMPT = "what is 1 + 1 ?"


class FixedLengthEngine:
    """Rollout engine returning random completions of exactly `length` tokens (no EOS), ids from `low..high`."""

    sampler_differs_from_trainer = False

    def __init__(self, length: int, low: int, high: int) -> None:
        self.length, self.low, self.high = length, low, high

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig,
                 generator: torch.Generator | None = None) -> RolloutOutput:
        count = len(prompt_ids)
        ids = torch.randint(self.low, self.high, (count, self.length), generator=torch.Generator().manual_seed(0))
        return RolloutOutput(completion_ids=ids, completion_mask=torch.ones_like(ids),
                             sampling_logp=torch.zeros(count, self.length),
                             truncated=torch.ones(count, dtype=torch.bool))

    def sleep(self) -> None:
        pass

    def wake(self) -> None:
        pass


def random_reward(prompts, completions, **kwargs) -> list[float]:
    return torch.rand(len(prompts), generator=torch.Generator().manual_seed(len(prompts))).tolist()


class StepProfiler:
    """Trainer callback: torch.profiler over the last of `steps` optimizer steps."""

    def __init__(self, steps: int) -> None:
        self.steps, self.prof = steps, None

    def _start(self) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        self.prof = torch.profiler.profile(activities=activities, record_shapes=False, with_stack=False)
        self.prof.__enter__()

    def on_train_begin(self, trainer) -> None:
        if self.steps == 1:
            self._start()

    def on_step_end(self, trainer) -> None:
        if trainer.state.global_step == self.steps - 1:
            torch.cuda.synchronize()
            self._start()
        elif trainer.state.global_step == self.steps and self.prof is not None:
            torch.cuda.synchronize()
            self.prof.__exit__(None, None, None)


def trainer_step(model, tokenizer, context: int, mode: str, steps: int, callbacks=()) -> dict[str, Any]:
    """`steps` optimizer steps of GRPOTrainer; the numbers of the last one (and the first's time)."""
    checkpointing, chunk, defer = MODES[mode]
    args = GRPOConfig(
        per_device_train_batch_size=8, num_generations=8, gradient_accumulation_steps=1, max_steps=steps,
        max_completion_length=context, max_prompt_length=16, learning_rate=1e-5, logging_steps=1, save_steps=0,
        gradient_checkpointing=checkpointing, mlp_chunk_tokens=chunk, output_dir="/tmp/bench_step",
    )
    low = len(tokenizer) // 2
    engine = FixedLengthEngine(context, low, len(tokenizer) - 1)
    trainer = GRPOTrainer(model, random_reward, args, [{"prompt": PROMPT}], tokenizer, rollout_engine=engine,
                          callbacks=list(callbacks))
    runner = getattr(model, "fusedrl_checkpointing", None)
    if runner is not None:
        runner.defer_mlp = defer
    pinned_before = runner.pinned_bytes() if runner is not None else 0
    state = trainer.train()
    seconds = [h["step_seconds"] - h.get("generation_seconds", 0.0) for h in state.history]
    plan = trainer.memory_plan
    return {"s_per_step": seconds[-1], "s_first_step": seconds[0],
            "s_before_last": seconds[-2] if len(seconds) > 1 else None,
            "pinned_gib": runner.pinned_bytes() / GIB if runner is not None else 0.0,
            "arena_grew_in_step": bool(runner is not None and runner.pinned_bytes() != pinned_before),
            "plan": plan.describe() if plan is not None else None,
            "plan_peak_gib": plan.peak_bytes / GIB if plan is not None else None,
            "mlp_chunk_tokens": plan.mlp_chunk_tokens if plan is not None else None,
            "deferred_layers": sum(runner._deferrable.values()) if runner is not None else 0}


def trl_style_step(model, tokenizer, context: int, steps: int) -> dict[str, Any]:
    """TRL's way: logits for the completion positions, fp32 log-softmax, the dapo loss, HF checkpointing."""
    runner = getattr(model, "fusedrl_checkpointing", None)
    if runner is not None:
        runner.uninstall(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    device = next(model.parameters()).device
    text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                         tokenize=False)
    prompt = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"]).view(1, -1)
    completion = torch.randint(len(tokenizer) // 2, len(tokenizer) - 1, (8, context),
                               generator=torch.Generator().manual_seed(0))
    ids = torch.cat([prompt.repeat(8, 1), completion], 1).to(device)
    advantages = torch.randn(8, device=device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=device.type == "cuda")
    seconds = 0.0
    for _ in range(steps):
        started = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=context + 1).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, -context:, None]).squeeze(-1)
        ratio = torch.exp(logp - logp.detach())
        per_token = -torch.min(ratio * advantages[:, None], torch.clamp(ratio, 0.8, 1.2) * advantages[:, None])
        loss = per_token.sum() / per_token.numel()  # dapo: over the active tokens (all active here)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del logits, logp, ratio, per_token, loss
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    return {"s_per_step": seconds, "pinned_gib": 0.0, "plan": None, "plan_peak_gib": None, "mlp_chunk_tokens": None}




def run_one(model, tokenizer, label: str, context: int, mode: str, steps: int, device: torch.device,
            callbacks=()) -> dict:
    row: dict[str, Any] = {"model": label, "context": context, "mode": mode, "steps": steps}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        # The model's own bytes and anything an earlier run left behind: the peak below counts them too.
        row["allocated_before_gib"] = torch.cuda.memory_allocated() / GIB
        row["model_gib"] = ModelShape.of(model, torch.bfloat16).weight_bytes / GIB
    try:
        numbers = trl_style_step(model, tokenizer, context, steps) if mode == "trl" else \
            trainer_step(model, tokenizer, context, mode, steps, callbacks)
        row.update(numbers, status="ok")
        if device.type == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated() / GIB
            row["reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
    except torch.OutOfMemoryError:
        row["status"] = "out of memory"
    except MemoryError as err:  # the plan refused it before running
        row["status"] = f"plan: {str(err)[:300]}"
    except Exception as err:  # noqa: BLE001 - report and go on with the next configuration
        row["status"] = f"error: {type(err).__name__}: {str(err)[:300]}"
        traceback.print_exc()
    finally:
        optimizer_free(model)
    print(format_row(row), flush=True)
    return row


def optimizer_free(model) -> None:
    for p in model.parameters():
        p.grad = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def format_row(r: dict) -> str:
    if r["status"] != "ok":
        return f"{r['model']:18s} {r['context']:6d} {r['mode']:15s} {r['status']}"
    peak = f"{r['peak_gib']:6.1f}" if "peak_gib" in r else "     -"
    plan = f"{r['plan_peak_gib']:6.1f}" if r.get("plan_peak_gib") else "     -"
    return (f"{r['model']:18s} {r['context']:6d} {r['mode']:15s} {r['s_per_step']:7.2f} s  peak {peak} GiB  "
            f"plan {plan} GiB  pinned {r['pinned_gib']:5.1f} GiB  chunk {r.get('mlp_chunk_tokens')}  "
            f"(first step {r.get('s_first_step', r['s_per_step']):.2f} s){_left_behind(r)}")


def _left_behind(r: dict) -> str:
    """A warning when more than the model was allocated before the run (an earlier run's leftovers count in the
    peak)."""
    extra = r.get("allocated_before_gib", 0.0) - r.get("model_gib", 0.0)
    return f"  [{extra:.1f} GiB beyond the model allocated before the run]" if extra > 0.5 else ""


def parse_runs(text: str) -> list[tuple[str, str, int, list[str]]]:
    """"shape:quant:context:mode+mode,..." -> [(shape, quant, context, modes)]."""
    runs = []
    for item in filter(None, text.split(",")):
        shape, quant, context, modes = item.split(":")
        runs.append((shape, quant, int(context), modes.split("+")))
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default=None, help="shape:quant:context:mode+mode,... (overrides the next three)")
    parser.add_argument("--shapes", default="llama3.1-8b")
    parser.add_argument("--contexts", default="4096,16384,20480,32768")
    parser.add_argument("--modes", default="offload,plain")
    parser.add_argument("--timed-contexts", default="4096", help="contexts that get a warm-up step first")
    parser.add_argument("--trl-contexts", default="4096")
    parser.add_argument("--search", default="", help="model labels (shape:quant) whose longest context is probed")
    parser.add_argument("--diagnose-dir", type=Path, default=None)
    parser.add_argument("--diagnose-model", default="llama3.1-8b:bf16", help="shape:quant the diagnosis profiles")
    parser.add_argument("--profile-context", type=int, default=4096)
    parser.add_argument("--profile-modes", default="plain,offload,offload-eager,offload-nochunk,chunk")
    parser.add_argument("--profile-ops", default="offload", help="profiled modes that also get the aten-op table")
    parser.add_argument("--snapshot-context", type=int, default=20480)
    parser.add_argument("--pin-first", action="store_true",
                        help="pin the arena of the longest offload run of each model once, before its first run")
    parser.add_argument("--time-budget", type=float, default=240.0, help="seconds; configurations past it are skipped")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--cpu-smoke", action="store_true")
    args = parser.parse_args()
    started = time.perf_counter()
    if args.cpu_smoke:
        args.runs = "tiny:bf16:24:offload+plain+trl+offload-eager+chunk"
        args.timed_contexts = ""
    if args.runs is None:
        trl = {int(c) for c in args.trl_contexts.split(",") if c}
        args.runs = ",".join(f"{shape}:bf16:{c}:{'+'.join(args.modes.split(',') + (['trl'] if int(c) in trl else []))}"
                             for shape in args.shapes.split(",") for c in args.contexts.split(","))
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu_smoke else "cpu")
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 0
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    print(f"bench_step: {card}, {total / GIB:.1f} GiB, torch {torch.__version__}, commit {commit or '?'}", flush=True)
    tokenizer = tiny_word_tokenizer()
    rows: list[dict] = []
    timed = {int(c) for c in args.timed_contexts.split(",") if c}
    runs = parse_runs(args.runs)
    searched = set(filter(None, args.search.split(",")))
    model, label = None, None

    def save() -> list[str]:  # after every configuration: a run killed by its time limit keeps what it measured
        summary = targets(rows)
        if args.json:
            meta = {"card": card, "total_gib": total / GIB, "commit": commit, "torch": torch.__version__}
            args.json.write_text(json.dumps({"meta": meta, "rows": rows, "targets": summary}, indent=1))
        return summary

    if args.diagnose_dir is not None and device.type == "cuda":
        shape, quant = args.diagnose_model.split(":")
        model, label = build_model(shape, device, quant), args.diagnose_model
        if args.pin_first:
            pin_longest(model, label, runs, args.snapshot_context, device)
        rows += diagnose(model, tokenizer, device, args, started)
        save()
    for shape, quant, context, modes in runs:
        if label != f"{shape}:{quant}":
            model = label = None
            optimizer_free(torch.nn.Module())
            if time.perf_counter() - started > args.time_budget:
                rows += [skipped(f"{shape}:{quant}", context, mode) for mode in modes]
                continue
            try:
                model, label = build_model(shape, device, quant), f"{shape}:{quant}"
                if args.pin_first and device.type == "cuda":
                    pin_longest(model, label, runs, 0, device)
            except Exception as err:  # noqa: BLE001 - e.g. bitsandbytes without CUDA support
                traceback.print_exc()
                rows += [{"model": f"{shape}:{quant}", "context": context, "mode": mode,
                          "status": f"error building the model: {type(err).__name__}: {str(err)[:200]}"}
                         for mode in modes]
                continue
        for mode in modes:
            if time.perf_counter() - started > args.time_budget:
                rows.append(skipped(label, context, mode))
                continue
            rows.append(run_one(model, tokenizer, label, context, mode, 2 if context in timed else 1, device))
            save()
        if label in searched and device.type == "cuda":
            searched.discard(label)
            rows += search_longest(model, label, total)
    for line in save():
        print(line)
    return 0


def pin_longest(model, label: str, runs, extra_context: int, device) -> None:
    """Pin once the arena the longest offload run of this model needs; later trainers take it over (no repinning
    per run). Prints how long pinning took: it is part of the first step's cost in a real run."""
    from fusedrl.nn.offload import OffloadedCheckpointing

    contexts = [c for shape, quant, c, modes in runs if f"{shape}:{quant}" == label
                and any(m.startswith("offload") for m in modes)] + ([extra_context] if extra_context else [])
    if not contexts:
        return
    plan = estimate(ModelShape.of(model, torch.bfloat16), 8, 16 + max(contexts), offload=True, mlp_chunk_tokens=8192)
    runner = OffloadedCheckpointing.install(model, offload=True, mlp_chunk_tokens=8192)
    started = time.perf_counter()
    pinned = runner.reserve(device, plan.pinned_host_bytes)
    print(f"pinned {plan.pinned_host_bytes / GIB:.1f} GiB of host memory for {label} at {max(contexts)} tokens per "
          f"completion in {time.perf_counter() - started:.1f} s ({'ok' if pinned else 'FAILED'})", flush=True)


def skipped(label: str, context: int, mode: str) -> dict:
    row = {"model": label, "context": context, "mode": mode, "status": "skipped (time budget)"}
    print(format_row(row), flush=True)
    return row


def diagnose(model, tokenizer, device, args, started) -> list[dict]:
    """Profile one warm step per mode at --profile-context, then a memory snapshot of one offload step at
    --snapshot-context (the snapshot gets the last 70 s of the budget whatever the profiles took)."""
    from step_diagnosis import profile_summary, snapshot_summary

    out = args.diagnose_dir
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    snapshot_reserve = 70.0
    for index, mode in enumerate(filter(None, args.profile_modes.split(","))):
        if time.perf_counter() - started > args.time_budget - snapshot_reserve:
            rows.append(skipped(args.diagnose_model, args.profile_context, f"profile {mode}"))
            continue
        profiler = StepProfiler(3 if index == 0 else 2)  # the very first step also warms the kernels up
        row = run_one(model, tokenizer, args.diagnose_model, args.profile_context, mode, profiler.steps, device,
                      callbacks=[profiler])
        row["diagnosis"] = "profile"
        if row["status"] == "ok":  # the table compares unprofiled warm steps
            row["s_profiled_step"], row["s_per_step"] = row["s_per_step"], row["s_before_last"]
        rows.append(row)
        if profiler.prof is not None:
            label = (f"{mode} at {args.profile_context} tokens per completion, unprofiled warm step "
                     f"{row.get('s_per_step') or 0:.2f} s, profiled {row.get('s_profiled_step') or 0:.2f} s")
            try:
                text = profile_summary(profiler.prof, label, with_ops=mode in args.profile_ops.split(","))
            except Exception:  # noqa: BLE001 - a summary that fails must not cost the measurements after it
                text = f"== profile: {label} ==\nsummary failed:\n{traceback.format_exc()}"
            (out / f"profile_{mode}.txt").write_text(text + "\n")
            print(text.split("top ")[0], flush=True)
        profiler.prof = None
    if args.snapshot_context:
        torch.cuda.empty_cache()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.memory._record_memory_history(enabled="all", context="all", stacks="python", max_entries=2_000_000)
        try:
            row = run_one(model, tokenizer, args.diagnose_model, args.snapshot_context, "offload", 1, device)
            snapshot = torch.cuda.memory._snapshot()
        finally:
            torch.cuda.memory._record_memory_history(enabled=None)
        row["diagnosis"] = "memory snapshot"
        rows.append(row)
        label = (f"offload step at {args.snapshot_context} tokens per completion, measured peak "
                 f"{row.get('peak_gib', 0):.2f} GiB, plan {row.get('plan_peak_gib')}")
        try:
            text = snapshot_summary(snapshot, baseline, label)
        except Exception:  # noqa: BLE001
            text = f"== memory snapshot: {label} ==\nsummary failed:\n{traceback.format_exc()}"
        (out / f"memory_{args.snapshot_context}.txt").write_text(text + "\n")
        print("\n".join(text.splitlines()[:40]), flush=True)
        del snapshot
    return rows


def search_longest(model, label, total) -> list[dict]:
    """The plan's longest context of the offload mode for 80 GB and for the card, on the GPU side alone and with the
    pinned arena within 3/4 of the host's available memory plus the arena already pinned (a run of that context
    confirms it: --runs)."""
    rows = []
    shape = ModelShape.of(model, torch.bfloat16)
    host_budget = pinnable_host_bytes(available_host_bytes(), getattr(model, "fusedrl_checkpointing", None))
    for limit_label, limit in (("80GB", 80e9), ("card", 0.95 * total)):
        gpu_only = longest_sequence(shape, 8, int(limit), offload=True, mlp_chunk_tokens=8192)
        with_host = longest_sequence(shape, 8, int(limit), offload=True, mlp_chunk_tokens=8192,
                                     host_budget_bytes=host_budget)
        host_text = f"{host_budget / GIB:.0f}" if host_budget else "?"
        print(f"search {label} {limit_label}: plan's longest sequence {gpu_only} tokens on the GPU side, {with_host} "
              f"with the pinned arena within {host_text} GiB of host memory (3/4 of MemAvailable + the arena already "
              "pinned)", flush=True)
        rows.append({"model": label, "search": limit_label, "status": "plan", "gpu_only_tokens": gpu_only,
                     "with_host_tokens": with_host, "host_budget_gib": host_budget / GIB if host_budget else None,
                     "context": with_host, "mode": "offload"})
    return rows


def targets(rows: list[dict]) -> list[str]:
    ok = {(r["model"], r["context"], r["mode"]): r for r in rows
          if r.get("status") == "ok" and "search" not in r and "diagnosis" not in r}
    for r in rows:  # the diagnosis' steps count where the table has no row of its own
        if r.get("status") == "ok" and "diagnosis" in r:
            ok.setdefault((r["model"], r["context"], r["mode"]), r)
    lines = []
    for (label, context, mode), r in sorted(ok.items()):
        plain = ok.get((label, context, "plain"))
        if mode.startswith("offload") or mode == "chunk":
            if plain and r.get("steps", 1) >= 2 and plain.get("steps", 1) >= 2:
                cost = r["s_per_step"] / plain["s_per_step"] - 1
                verdict = ("MET" if cost <= 0.05 else "MISSED") if mode == "offload" else "(diagnosis)"
                lines.append(f"target offload cost <= 5% ({label} {context} {mode}): {cost * 100:+.1f}% {verdict}")
        if "peak_gib" in r and r.get("plan_peak_gib"):
            error = r["plan_peak_gib"] / r["peak_gib"] - 1
            verdict = "within 10%" if abs(error) <= 0.1 else "OFF"
            lines.append(f"plan vs measured ({label} {context} {mode}): {r['plan_peak_gib']:.1f} vs "
                         f"{r['peak_gib']:.1f} GiB ({error * 100:+.0f}%) {verdict}")
    for label, context, limit, unit in (("llama3.1-8b:bf16", 16384, 45.0, "GiB"),
                                        ("llama3.1-8b:bf16", 20480, 40.0, "GB")):
        r = ok.get((label, context, "offload"))
        if r and "peak_gib" in r:
            value = r["peak_gib"] * GIB / (GIB if unit == "GiB" else 1e9)
            verdict = "MET" if value <= limit else "MISSED"
            lines.append(f"target {label} 8 x {context} peak <= {limit:.0f} {unit}: {value:.1f} {unit} {verdict}")
    for label in sorted({r["model"] for r in ok.values()}):
        goal = 65536 if ":nf4" in label or ":bnb" in label else 32768
        fitted = [r for (model, _, mode), r in ok.items() if model == label and mode == "offload"
                  and "reserved_gib" in r and r["reserved_gib"] * GIB <= 80e9]
        if fitted:
            best = max(fitted, key=lambda r: r["context"])
            verdict = "MET" if best["context"] >= goal else "MISSED"
            lines.append(f"target {label} longest measured context in 80 GB >= {goal}: {best['context']} "
                         f"(peak {best['peak_gib']:.1f} GiB, reserved {best['reserved_gib']:.1f} GiB) {verdict}")
    return lines


if __name__ == "__main__":
    sys.exit(main())
