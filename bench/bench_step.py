"""One whole GRPO optimizer step at long context: peak GPU memory, pinned host memory, seconds per step.

Runs `fusedrl.GRPOTrainer.train()` for one or two optimizer steps (the public API, one micro-batch of 8
completions of one prompt) on a random-init model of a real shape with LoRA r16 on every linear layer, bf16, with a
fixed-length rollout engine (random completions of exactly --contexts tokens: generation is out of the picture),
under each checkpointing mode:
  plain     gradient_checkpointing=True, unchunked MLP (torch.utils.checkpoint through transformers)
  offload   gradient_checkpointing="offload" + MLP chunks (fusedrl.nn.offload), chunk size from the memory plan
  trl       a TRL-style step in the same process: transformers forward with logits for the completion positions,
            fp32 log-softmax, the same dapo loss, transformers' own checkpointing
and prints the memory plan's estimate next to the measured peak. `--search` then probes the longest context of the
offload mode that fits in 80 GB and in the card (the plan proposes, one real step confirms, 10% lower on OOM).

  python bench/bench_step.py --json step.json --time-budget 240          # GPU
  python bench/bench_step.py --cpu-smoke                                  # CPU: tiny shape, every path runs
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import transformers

ROOT = Path(__file__).resolve().parents[1]
import fusedrl_import  # noqa: E402,F401  the installed fusedrl, else the source tree

from fusedrl import GRPOConfig, GRPOTrainer  # noqa: E402
from fusedrl.model.tiny import tiny_word_tokenizer  # noqa: E402
from fusedrl.rollout.base import RolloutOutput, SamplingConfig  # noqa: E402
from fusedrl.train.memory_plan import ModelShape, estimate, longest_sequence  # noqa: E402

GIB = float(2**30)
SHAPES = {
    "llama3.1-8b": dict(cls="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                        tie_word_embeddings=False),
    "qwen3-4b": dict(cls="qwen3", hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                     rope_theta=1000000.0, tie_word_embeddings=True),
    "tiny": dict(cls="llama", hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False),
}
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


def build_model(shape: str, device: torch.device) -> torch.nn.Module:
    import peft

    spec = dict(SHAPES[shape])
    family = spec.pop("cls")
    config_cls = transformers.LlamaConfig if family == "llama" else transformers.Qwen3Config
    config = config_cls(max_position_embeddings=131072, **spec)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    lora = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
    return peft.get_peft_model(model, lora)


def trainer_step(model, tokenizer, context: int, mode: str, steps: int) -> dict[str, Any]:
    """`steps` optimizer steps of GRPOTrainer; the numbers of the last one."""
    args = GRPOConfig(
        per_device_train_batch_size=8, num_generations=8, gradient_accumulation_steps=1, max_steps=steps,
        max_completion_length=context, max_prompt_length=16, learning_rate=1e-5, logging_steps=1, save_steps=0,
        gradient_checkpointing="offload" if mode == "offload" else True,
        mlp_chunk_tokens=None if mode == "offload" else 0, output_dir="/tmp/bench_step",
    )
    low = len(tokenizer) // 2
    engine = FixedLengthEngine(context, low, len(tokenizer) - 1)
    trainer = GRPOTrainer(model, random_reward, args, [{"prompt": PROMPT}], tokenizer, rollout_engine=engine)
    state = trainer.train()
    last = state.history[-1]
    runner = getattr(model, "fusedrl_checkpointing", None)
    return {"s_per_step": last["step_seconds"] - last.get("generation_seconds", 0.0),
            "pinned_gib": runner.pinned_bytes() / GIB if runner is not None else 0.0,
            "plan": trainer.memory_plan.describe() if trainer.memory_plan is not None else None,
            "plan_peak_gib": trainer.memory_plan.peak_bytes / GIB if trainer.memory_plan is not None else None,
            "mlp_chunk_tokens": trainer.memory_plan.mlp_chunk_tokens if trainer.memory_plan is not None else None}


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


def run_one(model, tokenizer, shape: str, context: int, mode: str, steps: int, device: torch.device) -> dict:
    row: dict[str, Any] = {"shape": shape, "context": context, "mode": mode, "steps": steps}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    try:
        numbers = trl_style_step(model, tokenizer, context, steps) if mode == "trl" else \
            trainer_step(model, tokenizer, context, mode, steps)
        row.update(numbers, status="ok")
        if device.type == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated() / GIB
            row["reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
    except torch.OutOfMemoryError:
        row["status"] = "out of memory"
    except MemoryError as err:  # the plan refused it before running
        row["status"] = f"plan: {str(err)[:160]}"
    except Exception as err:  # noqa: BLE001 - report and go on with the next configuration
        row["status"] = f"error: {type(err).__name__}: {str(err)[:200]}"
        traceback.print_exc()
    finally:
        optimizer_free(model)
    print(format_row(row), flush=True)
    return row


def optimizer_free(model) -> None:
    for p in model.parameters():
        p.grad = None
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def format_row(r: dict) -> str:
    if r["status"] != "ok":
        return f"{r['shape']:12s} {r['context']:6d} {r['mode']:8s} {r['status']}"
    peak = f"{r['peak_gib']:6.1f}" if "peak_gib" in r else "     -"
    plan = f"{r['plan_peak_gib']:6.1f}" if r.get("plan_peak_gib") else "     -"
    return (f"{r['shape']:12s} {r['context']:6d} {r['mode']:8s} {r['s_per_step']:7.2f} s  peak {peak} GiB  "
            f"plan {plan} GiB  pinned {r['pinned_gib']:5.1f} GiB  chunk {r.get('mlp_chunk_tokens')}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="llama3.1-8b")
    parser.add_argument("--contexts", default="4096,16384,20480,32768")
    parser.add_argument("--modes", default="offload,plain")
    parser.add_argument("--timed-contexts", default="4096", help="contexts that get a warm-up step first")
    parser.add_argument("--trl-contexts", default="4096")
    parser.add_argument("--search", action="store_true")
    parser.add_argument("--time-budget", type=float, default=240.0, help="seconds; configurations past it are skipped")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--cpu-smoke", action="store_true")
    args = parser.parse_args()
    started = time.perf_counter()
    if args.cpu_smoke:
        args.shapes, args.contexts, args.timed_contexts, args.trl_contexts = "tiny", "24", "", "24"
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu_smoke else "cpu")
    card = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 0
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    print(f"bench_step: {card}, {total / GIB:.1f} GiB, torch {torch.__version__}, commit {commit or '?'}")
    tokenizer = tiny_word_tokenizer()
    rows: list[dict] = []
    timed = {int(c) for c in args.timed_contexts.split(",") if c}
    for shape in args.shapes.split(","):
        model = build_model(shape, device)
        for context in [int(c) for c in args.contexts.split(",")]:
            modes = args.modes.split(",") + (["trl"] if str(context) in args.trl_contexts.split(",") else [])
            for mode in modes:
                if time.perf_counter() - started > args.time_budget:
                    rows.append({"shape": shape, "context": context, "mode": mode, "status": "skipped (time budget)"})
                    continue
                rows.append(run_one(model, tokenizer, shape, context, mode, 2 if context in timed else 1, device))
        if args.search and device.type == "cuda":
            rows += search_longest(model, tokenizer, shape, device, total, started, args.time_budget)
        del model
    summary = targets(rows)
    for line in summary:
        print(line)
    if args.json:
        args.json.write_text(json.dumps({"meta": {"card": card, "total_gib": total / GIB, "commit": commit,
                                                  "torch": torch.__version__}, "rows": rows, "targets": summary},
                                        indent=1))
    return 0


def search_longest(model, tokenizer, shape, device, total, started, budget) -> list[dict]:
    """Longest context of the offload mode within 80 GB and within the card: the plan proposes, a step confirms."""
    rows = []
    model_shape = ModelShape.of(model, torch.bfloat16)
    for label, limit in (("80GB", 80e9), ("card", 0.95 * total)):
        proposal = longest_sequence(model_shape, 8, int(limit), offload=True, mlp_chunk_tokens=4096) // 1024 * 1024
        while proposal >= 1024 and time.perf_counter() - started < budget:
            row = run_one(model, tokenizer, shape, proposal, "offload", 1, device)
            row["search"] = label
            rows.append(row)
            if row["status"] == "ok" and row["reserved_gib"] * GIB <= limit:
                break
            proposal = int(proposal * 0.9) // 1024 * 1024
    return rows


def targets(rows: list[dict]) -> list[str]:
    ok = {(r["shape"], r["context"], r["mode"]): r for r in rows if r.get("status") == "ok" and "search" not in r}
    lines = []
    for (shape, context, mode), r in sorted(ok.items()):
        plain = ok.get((shape, context, "plain"))
        if mode == "offload" and plain and r.get("steps") == 2:
            cost = r["s_per_step"] / plain["s_per_step"] - 1
            lines.append(f"target offload cost <= 5% ({shape} {context}): {cost * 100:+.1f}% "
                         f"{'MET' if cost <= 0.05 else 'MISSED'}")
        if mode == "offload" and "peak_gib" in r and r.get("plan_peak_gib"):
            lines.append(f"plan vs measured ({shape} {context}): {r['plan_peak_gib']:.1f} vs {r['peak_gib']:.1f} GiB "
                         f"({(r['plan_peak_gib'] / r['peak_gib'] - 1) * 100:+.0f}%)")
    for shape, context, limit, unit in (("llama3.1-8b", 16384, 45.0, "GiB"), ("llama3.1-8b", 20480, 40.0, "GB")):
        r = ok.get((shape, context, "offload"))
        if r and "peak_gib" in r:
            value = r["peak_gib"] * GIB / (GIB if unit == "GiB" else 1e9)
            verdict = "MET" if value <= limit else "MISSED"
            lines.append(f"target {shape} 8 x {context} peak <= {limit:.0f} {unit}: {value:.1f} {unit} {verdict}")
    return lines


if __name__ == "__main__":
    sys.exit(main())
