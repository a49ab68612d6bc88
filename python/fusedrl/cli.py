"""The `fusedrl` command: train (from a TOML file, or the offline demo), eval (greedy GSM8K accuracy), plot.

  fusedrl train [config.toml | --demo sums|gsm8k] [--resume RUN_DIR] [--max-steps N] [--output-dir DIR]
  fusedrl eval --model PATH [--adapter DIR] [--limit N] [--dataset gsm8k-offline|gsm8k|FILE.jsonl]
  fusedrl plot RUN_DIR [--output FILE.png]

TOML layout (the names are GRPOConfig's, fusedrl.LoraConfig's and load_model's):
  learning_rate = 1e-5            # GRPOConfig fields at top level and/or in a [train] table
  [model]   name_or_path = "...", dtype = "bfloat16", load_in_4bit = false, max_seq_length = 2048
  [lora]    r = 16, lora_alpha = 32, target_modules = "all-linear", lora_dropout = 0.0  (enabled = false: full model)
  [dataset] name = "gsm8k-offline" | "gsm8k" | "path/to/file.jsonl", split = "train", limit = 64
  [rewards] names = ["correctness_reward", "xmlcount_reward"], weights = [1.0, 0.5]   (or name = weight pairs)
Without a config file `train` runs the offline demo: SmolLM2-135M-Instruct on offline GSM8K problems, a few minutes
on a CPU. The resolved configuration is saved as RUN_DIR/run_config.json, so `--resume RUN_DIR` needs no file.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib  # Python >= 3.11
except ModuleNotFoundError:  # Python 3.10
    tomllib = None  # type: ignore[assignment]

RUN_CONFIG_FILE = "run_config.json"
SECTIONS = ("train", "model", "lora", "dataset", "rewards")
MODEL_KEYS = ("name_or_path", "dtype", "load_in_4bit", "max_seq_length")
DATASET_KEYS = ("name", "split", "limit", "seed")


class ConfigError(ValueError):
    """A problem in the user's TOML config or command line, with a message saying what to change."""


# ---------------------------------------------------------------------------------------------------------------
# run configuration
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class RunConfig:
    """Everything `fusedrl train` needs: GRPOConfig fields plus model, LoRA, dataset and reward choices."""

    train: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    lora: dict[str, Any] | None = field(default_factory=dict)  # None: train the full model
    dataset: dict[str, Any] = field(default_factory=dict)
    rewards: list[tuple[str, float]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "train": self.train,
            "model": self.model,
            "lora": self.lora,
            "dataset": self.dataset,
            "rewards": {
                "names": [n for n, _ in self.rewards],
                "weights": [w for _, w in self.rewards],
            },
        }


def _check_keys(section: str, values: dict[str, Any], allowed: Sequence[str]) -> None:
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ConfigError(f"[{section}]: unknown key(s) {unknown}; expected some of {list(allowed)}")


def _parse_rewards(table: Any) -> list[tuple[str, float]]:
    if not isinstance(table, dict):
        raise ConfigError(f"[rewards]: expected a table, got {table!r}")
    if "names" in table:
        _check_keys("rewards", table, ("names", "weights"))
        names = table["names"]
        weights = table.get("weights", [1.0] * len(names))
        if not isinstance(names, list) or not names or len(weights) != len(names):
            raise ConfigError(
                f"[rewards]: names must be a non-empty list and weights (optional) a list of the same "
                f"length; got names={names!r}, weights={weights!r}"
            )
        pairs = list(zip(names, weights))
    else:
        pairs = list(table.items())
    for name, weight in pairs:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ConfigError(f"[rewards]: the weight of {name!r} must be a number, got {weight!r}")
    return [(str(name), float(weight)) for name, weight in pairs]


def run_config_from_mapping(values: dict[str, Any]) -> RunConfig:
    """A RunConfig from a parsed TOML (or run_config.json) mapping; top-level scalars are GRPOConfig fields."""
    train = {k: v for k, v in values.items() if k not in SECTIONS}
    section_train = values.get("train", {})
    clash = sorted(set(train) & set(section_train))
    if clash:
        raise ConfigError(f"{clash} set both at top level and in [train]; keep one")
    train.update(section_train)
    model = dict(values.get("model", {}))
    _check_keys("model", model, MODEL_KEYS)
    lora_table = values.get("lora", {})
    lora: dict[str, Any] | None = dict(lora_table) if lora_table is not None else None
    if lora is not None and lora.pop("enabled", True) is False:
        lora = None
    dataset = dict(values.get("dataset", {}))
    _check_keys("dataset", dataset, DATASET_KEYS)
    rewards = _parse_rewards(values.get("rewards", {"names": ["correctness_reward"]}))
    return RunConfig(train=train, model=model, lora=lora, dataset=dataset, rewards=rewards)


def _toml_module() -> Any:
    if tomllib is not None:
        return tomllib
    try:
        import tomli
    except ModuleNotFoundError as error:
        raise ConfigError("reading TOML configs on Python 3.10 needs tomli: pip install tomli") from error
    return tomli


def load_run_config(path: str | Path) -> RunConfig:
    """Read a TOML config file (or a run's run_config.json)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config: {path} does not exist")
    toml = _toml_module()
    try:
        if path.suffix == ".json":
            values = json.loads(path.read_text(encoding="utf-8"))
        else:
            with path.open("rb") as f:
                values = toml.load(f)
    except (toml.TOMLDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"config: {path} is not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {error}")
    return run_config_from_mapping(values)


def demo_run_config(name: str | None = None) -> RunConfig:
    """A built-in demo (fusedrl.demo: "sums" by default, "gsm8k"), for this machine's device."""
    import torch

    from fusedrl.demo import DEFAULT_DEMO, demo_mapping

    try:
        return run_config_from_mapping(demo_mapping(name or DEFAULT_DEMO, on_gpu=torch.cuda.is_available()))
    except ValueError as error:
        raise ConfigError(str(error)) from error


# ---------------------------------------------------------------------------------------------------------------
# building the pieces
# ---------------------------------------------------------------------------------------------------------------


def resolve_model_path(name_or_path: str) -> str:
    """ "smollm2-offline" -> the converted offline SmolLM2 folder; anything else is passed to transformers."""
    if name_or_path != "smollm2-offline":
        return name_or_path
    from fusedrl.model.offline import smollm2_path

    return str(smollm2_path())


def build_dataset(spec: dict[str, Any], default_split: str = "train") -> Any:
    """[dataset] name: "gsm8k-offline" (packaged problems), "gsm8k" (the Hub), or a local .jsonl file."""
    name = spec.get("name", "gsm8k-offline")
    limit = spec.get("limit")
    seed = spec.get("seed", 0)
    if name == "gsm8k-offline":
        from fusedrl.data.gsm8k import load_offline_gsm8k

        try:
            return load_offline_gsm8k(limit, seed=seed)
        except RuntimeError as error:  # the package with the offline problems is missing: says how to install it
            raise ConfigError(str(error)) from error
    if name == "sums":
        from fusedrl.data.sums import sums_dataset

        return sums_dataset(spec.get("split", default_split), limit)
    if name == "gsm8k":
        from fusedrl.data.gsm8k import load_gsm8k

        dataset = load_gsm8k(spec.get("split", default_split))
    elif str(name).endswith((".jsonl", ".json")):
        dataset = _load_jsonl_dataset(Path(name))
    else:
        raise ConfigError(f"[dataset] name: expected 'sums', 'gsm8k-offline', 'gsm8k' or a .jsonl file, got {name!r}")
    return dataset.select(range(min(limit, len(dataset)))) if limit is not None else dataset


def _load_jsonl_dataset(path: Path) -> Any:
    import datasets

    from fusedrl.data.gsm8k import gsm8k_rows_to_dataset

    if not path.is_file():
        raise ConfigError(f"[dataset] name: {path} does not exist")
    dataset = datasets.load_dataset("json", data_files=str(path), split="train")
    if "prompt" in dataset.column_names:
        return dataset
    if {"question", "answer"} <= set(dataset.column_names):
        return gsm8k_rows_to_dataset(dataset)
    raise ConfigError(
        f"[dataset] {path}: rows need a 'prompt' column (text or chat messages) or GSM8K "
        f"'question' + 'answer' ('... #### N'); found columns {dataset.column_names}"
    )


def build_rewards(pairs: list[tuple[str, float]]) -> tuple[list[Any], list[float]]:
    from fusedrl.rewards import get_reward_function

    try:
        return [get_reward_function(name) for name, _ in pairs], [weight for _, weight in pairs]
    except ValueError as error:
        raise ConfigError(f"[rewards]: {error}") from error


# ---------------------------------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------------------------------


def command_train(args: argparse.Namespace) -> int:
    from fusedrl.model.export import save_lora
    from fusedrl.model.load import load_model
    from fusedrl.model.lora import LoraConfig
    from fusedrl.plot import plot_run
    from fusedrl.train.callbacks import default_callbacks
    from fusedrl.train.checkpoint import find_latest_checkpoint
    from fusedrl.train.config import GRPOConfig
    from fusedrl.train.trainer import GRPOTrainer

    if args.config is not None:
        run = load_run_config(args.config)
    elif args.resume is not None and (Path(args.resume) / RUN_CONFIG_FILE).is_file():
        run = load_run_config(Path(args.resume) / RUN_CONFIG_FILE)
    else:
        run = demo_run_config(args.demo)
        _announce_demo(args.demo, run)
    if args.output_dir is not None:
        run.train["output_dir"] = args.output_dir
    elif args.resume is not None:
        run.train["output_dir"] = str(args.resume)
    if args.max_steps is not None:
        run.train["max_steps"] = args.max_steps
    resume_from = None
    if args.resume is not None:
        resume_from = find_latest_checkpoint(args.resume)
        if resume_from is None:
            raise ConfigError(f"--resume: {args.resume} holds no complete checkpoint-<step> directory")

    rewards, weights = build_rewards(run.rewards)
    run.train.setdefault("reward_weights", weights)
    try:
        config = GRPOConfig.from_dict(run.train)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"[train]: {error}") from error
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / RUN_CONFIG_FILE).write_text(json.dumps(run.to_json(), indent=2), encoding="utf-8")

    model_spec = dict(run.model)
    name_or_path = resolve_model_path(model_spec.pop("name_or_path", "smollm2-offline"))
    lora = LoraConfig(**run.lora) if run.lora is not None else None
    model, tokenizer = load_model(
        name_or_path,
        lora=lora,
        gradient_checkpointing=config.gradient_checkpointing,
        **model_spec,
    )
    dataset = build_dataset(run.dataset)

    from fusedrl.threads import ThreadTuner

    callbacks = default_callbacks(config, resume_from=resume_from)
    logger = callbacks[-1]
    if not torch_on_gpu():  # a CPU run: one torch thread per free core, re-checked every step
        callbacks.insert(0, ThreadTuner())
    trainer = GRPOTrainer(model, rewards, config, dataset, processing_class=tokenizer, callbacks=callbacks)
    try:
        trainer.train()
    finally:
        logger.close()
    final = save_lora(model, output_dir / "final_adapter", tokenizer) if lora is not None else None
    picture = plot_run(output_dir)
    print(
        f"fusedrl: done: {trainer.state.global_step} steps; run directory {output_dir}"
        + (f"; adapter {final}" if final else "")
        + f"\nfusedrl: reward curve: {picture}"
    )
    _print_eval_lines(run, final)
    return 0


def torch_on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _announce_demo(name: str | None, run: RunConfig) -> None:
    from fusedrl.demo import DEFAULT_DEMO, get_demo

    demo = get_demo(name or DEFAULT_DEMO)
    print(f"fusedrl: running the {demo.name!r} demo ({demo.description}); expect "
          f"{demo.estimate_text(torch_on_gpu())}. Run directory {run.train['output_dir']}", flush=True)


def _print_eval_lines(run: RunConfig, adapter: Path | None) -> None:
    from fusedrl.demo import eval_command

    model = run.model.get("name_or_path", "smollm2-offline")
    trained = eval_command(run.dataset.get("name", ""), model, str(adapter) if adapter else None)
    if trained is not None:
        print(f"fusedrl: evaluate on held-out questions (about a minute on a CPU):\n  {trained}")
        if adapter is not None:
            print(f"  {eval_command(run.dataset['name'], model, None)}   # the model before training")


def held_out_problems(limit: int, dataset: str) -> Any:
    """Problems not used by the demo's training: the last `limit` of the seed-0 shuffle (offline), or GSM8K test."""
    if dataset == "sums":
        from fusedrl.data.sums import HELD_OUT, sums_dataset

        if not 1 <= limit <= HELD_OUT:
            raise ConfigError(f"--limit: expected 1..{HELD_OUT} held-out sums, got {limit}")
        return sums_dataset("test", limit)
    if dataset == "gsm8k-offline":
        from fusedrl.demo import DEMO_TRAIN_PROBLEMS
        from fusedrl.data.gsm8k import load_offline_gsm8k

        problems = load_offline_gsm8k(None, seed=0)
        available = len(problems) - DEMO_TRAIN_PROBLEMS
        if not 1 <= limit <= available:
            raise ConfigError(f"--limit: expected 1..{available} held-out offline problems, got {limit}")
        return problems.select(range(len(problems) - limit, len(problems)))
    return build_dataset({"name": dataset, "split": "test", "limit": limit})


def evaluate_greedy(
    model: Any,
    tokenizer: Any,
    problems: Any,
    max_new_tokens: int,
    batch_size: int = 8,
    dataset: str = "gsm8k",
) -> tuple[float, list[dict[str, Any]]]:
    """Fraction of problems whose greedy completion is right, and the samples. Right: correctness_reward > 0 (the
    XML answer equals the truth), or for "sums" number_answer_reward == 1 (just the number)."""
    import torch

    from fusedrl.rewards import correctness_reward, number_answer_reward
    from fusedrl.rollout import BuiltinEngine, SamplingConfig
    from fusedrl.train.batching import tokenize_prompts

    engine = BuiltinEngine(model, tokenizer)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, greedy=True)
    samples = []
    model.eval()
    for start in range(0, len(problems), batch_size):
        rows = problems.select(range(start, min(start + batch_size, len(problems))))
        prompt_ids = tokenize_prompts(tokenizer, list(rows["prompt"]), max_prompt_length=None)
        with torch.no_grad():
            out = engine.generate(prompt_ids, sampling)
        lengths = out.completion_mask.sum(1).tolist()
        texts = tokenizer.batch_decode(
            [ids[:n].tolist() for ids, n in zip(out.completion_ids, lengths)],
            skip_special_tokens=True,
        )
        if dataset == "sums":
            scores = [s == 1.0 for s in number_answer_reward(rows["prompt"], texts, answer=list(rows["answer"]))]
        else:
            scores = correctness_reward(rows["prompt"], texts, answer=list(rows["answer"]))
        samples += [
            {"answer": a, "completion": t, "correct": bool(s and s > 0)}
            for a, t, s in zip(rows["answer"], texts, scores)
        ]
    accuracy = sum(s["correct"] for s in samples) / max(len(samples), 1)
    return accuracy, samples


def command_eval(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fusedrl.model.export import load_lora

    path = resolve_model_path(args.model)
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
    accuracy, samples = evaluate_greedy(model, tokenizer, problems, args.max_new_tokens, dataset=args.dataset)
    for sample in samples[: args.show]:
        print(f"--- answer {sample['answer']} ({'correct' if sample['correct'] else 'wrong'})\n{sample['completion']}")
    print(
        f"accuracy: {accuracy:.3f} ({sum(s['correct'] for s in samples)}/{len(samples)} greedy, "
        f"max_new_tokens={args.max_new_tokens})"
    )
    return 0


def command_plot(args: argparse.Namespace) -> int:
    from fusedrl.plot import plot_run

    print(plot_run(args.run_dir, args.output))
    return 0


# ---------------------------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusedrl", description="GRPO-family RL training for LLMs.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train with a TOML config (or run the offline demo)")
    train.add_argument(
        "config",
        nargs="?",
        type=Path,
        help="TOML file; omitted: the offline SmolLM2 demo",
    )
    train.add_argument(
        "--resume",
        type=Path,
        metavar="RUN_DIR",
        help="continue from RUN_DIR's latest checkpoint",
    )
    train.add_argument("--demo", metavar="NAME", help="without a config: which demo, 'sums' (default) or 'gsm8k'")
    train.add_argument("--max-steps", type=int, metavar="N", help="override max_steps")
    train.add_argument("--output-dir", metavar="DIR", help="override output_dir (the run directory)")
    train.set_defaults(handler=command_train)

    evaluate = commands.add_parser("eval", help="greedy GSM8K accuracy of a model (and adapter)")
    evaluate.add_argument(
        "--model",
        required=True,
        help="HF folder or Hub id; 'smollm2-offline' for the demo model",
    )
    evaluate.add_argument("--adapter", type=Path, help="LoRA adapter folder (e.g. RUN_DIR/final_adapter)")
    evaluate.add_argument("--limit", type=int, default=20, help="number of held-out problems (default 20)")
    evaluate.add_argument("--dataset", default="gsm8k-offline", help="sums | gsm8k-offline | gsm8k | FILE.jsonl")
    evaluate.add_argument("--max-new-tokens", type=int, default=256)
    evaluate.add_argument("--show", type=int, default=2, help="completions to print")
    evaluate.set_defaults(handler=command_eval)

    plot = commands.add_parser("plot", help="draw a run's curves from RUN_DIR/metrics.jsonl")
    plot.add_argument("run_dir", type=Path)
    plot.add_argument("--output", type=Path, help="PNG path (default RUN_DIR/metrics.png)")
    plot.set_defaults(handler=command_plot)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and run the command; user errors print one line and return 2."""
    args = build_parser().parse_args(argv)
    if getattr(args, "max_steps", None) is not None and args.max_steps < 1:
        print("fusedrl: error: --max-steps must be >= 1", file=sys.stderr)
        return 2
    if getattr(args, "demo", None) is not None and args.config is not None:
        print("fusedrl: error: --demo runs a built-in config; give either a config file or --demo", file=sys.stderr)
        return 2
    if args.command == "eval":
        _use_free_cores()
    try:
        return args.handler(args)
    except (ConfigError, FileNotFoundError) as error:
        print(f"fusedrl: error: {error}", file=sys.stderr)
        return 2


def _use_free_cores() -> None:
    """One torch thread per core that other processes leave free (see fusedrl.threads); training re-checks per step."""
    import torch

    from fusedrl.threads import free_cores

    if not torch.cuda.is_available():
        torch.set_num_threads(free_cores())


if __name__ == "__main__":
    sys.exit(main())
