"""`fusedrl eval`: accuracy of a model (and adapter) on held-out GSM8K problems or one-digit sums.

Greedy by default; `--temperature T --samples K` measures the sampled accuracy instead (K completions per problem at
temperature T, from a seeded generator), which is what GRPO trains: the quick demo's base model is often right when
greedy but rarely when sampled at the training temperature, and the demo's eval lines show that difference."""

from __future__ import annotations

import argparse
from typing import Any

from fusedrl.data.loading import build_dataset
from fusedrl.demo import DEMO_TRAIN_PROBLEMS
from fusedrl.model.offline import resolve_model_path
from fusedrl.run_config import ConfigError


def held_out_problems(limit: int, dataset: str) -> Any:
    """Problems not used by the demo's training: the last `limit` of the seed-0 shuffle (offline), or GSM8K test."""
    if dataset == "sums":
        from fusedrl.data.sums import HELD_OUT, sums_dataset

        if not 1 <= limit <= HELD_OUT:
            raise ConfigError(f"--limit: expected 1..{HELD_OUT} held-out sums, got {limit}")
        return sums_dataset("test", limit)
    if dataset == "gsm8k-offline":
        from fusedrl.data.gsm8k import load_offline_gsm8k

        problems = load_offline_gsm8k(None, seed=0)
        available = len(problems) - DEMO_TRAIN_PROBLEMS
        if not 1 <= limit <= available:
            raise ConfigError(f"--limit: expected 1..{available} held-out offline problems, got {limit}")
        return problems.select(range(len(problems) - limit, len(problems)))
    return build_dataset({"name": dataset, "split": "test", "limit": limit})


def evaluate_accuracy(
    model: Any,
    tokenizer: Any,
    problems: Any,
    max_new_tokens: int,
    batch_size: int = 8,
    dataset: str = "gsm8k",
    temperature: float | None = None,
    samples_per_problem: int = 1,
    seed: int = 0,
) -> tuple[float, list[dict[str, Any]]]:
    """Fraction of completions that are right, and the samples: greedy (temperature None) or `samples_per_problem`
    completions per problem sampled at `temperature`. Right: correctness_reward > 0 (the XML answer equals the
    truth), or for "sums" final_number_reward == 1 (the last number is the sum)."""
    import torch

    from fusedrl.rewards import correctness_reward, final_number_reward
    from fusedrl.rollout import BuiltinEngine, SamplingConfig
    from fusedrl.train.batching import tokenize_prompts

    if temperature is None and samples_per_problem != 1:
        raise ConfigError(f"--samples {samples_per_problem} needs --temperature (greedy decoding gives one answer)")
    if samples_per_problem < 1:
        raise ConfigError(f"--samples: expected an integer >= 1, got {samples_per_problem}")
    if temperature is not None and not temperature > 0:
        raise ConfigError(f"--temperature: expected a positive number (leave it out for greedy), got {temperature}")
    engine = BuiltinEngine(model, tokenizer)
    if temperature is None:
        sampling = SamplingConfig(max_new_tokens=max_new_tokens, greedy=True)
    else:
        sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature)
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    rows_of = [i for i in range(len(problems)) for _ in range(samples_per_problem)]
    samples = []
    model.eval()
    for start in range(0, len(rows_of), batch_size):
        rows = problems.select(rows_of[start : start + batch_size])
        prompt_ids = tokenize_prompts(tokenizer, list(rows["prompt"]), max_prompt_length=None)
        with torch.no_grad():
            out = engine.generate(prompt_ids, sampling, generator=generator)
        lengths = out.completion_mask.sum(1).tolist()
        texts = tokenizer.batch_decode(
            [ids[:n].tolist() for ids, n in zip(out.completion_ids, lengths)],
            skip_special_tokens=True,
        )
        if dataset == "sums":
            scores = final_number_reward(rows["prompt"], texts, answer=list(rows["answer"]))
        else:
            scores = correctness_reward(rows["prompt"], texts, answer=list(rows["answer"]))
        samples += [
            {"answer": a, "completion": t, "correct": bool(s and s > 0)}
            for a, t, s in zip(rows["answer"], texts, scores)
        ]
    accuracy = sum(s["correct"] for s in samples) / max(len(samples), 1)
    return accuracy, samples


def run_eval(args: argparse.Namespace) -> int:
    """`fusedrl eval`: load the model (and adapter), print a few completions and the accuracy."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fusedrl.model.export import load_lora

    from fusedrl.model.load import check_model_location

    path = resolve_model_path(args.model)
    check_model_location(path)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if torch.cuda.is_available():
        model = model.cuda()
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if args.adapter is not None:
        model = load_lora(model, args.adapter)
    problems = held_out_problems(args.limit, args.dataset)
    accuracy, samples = evaluate_accuracy(model, tokenizer, problems, args.max_new_tokens, dataset=args.dataset,
                                          temperature=args.temperature, samples_per_problem=args.samples)
    how = "greedy" if args.temperature is None else f"sampled at temperature {args.temperature:g}"
    for sample in samples[: args.show]:
        print(f"--- answer {sample['answer']} ({'correct' if sample['correct'] else 'wrong'})\n{sample['completion']}")
    print(
        f"accuracy: {accuracy:.3f} ({sum(s['correct'] for s in samples)}/{len(samples)} {how}, "
        f"max_new_tokens={args.max_new_tokens})"
    )
    return 0
