"""The `fusedrl` command: train (from a TOML file, or the offline demo), eval (greedy GSM8K accuracy), plot.

  fusedrl train [config.toml | --demo sums|gsm8k] [--resume RUN_DIR] [--max-steps N] [--output-dir DIR]
  fusedrl eval --model PATH [--adapter DIR] [--limit N] [--dataset sums|gsm8k-offline|gsm8k|FILE.jsonl]
  fusedrl plot RUN_DIR [--output FILE.png]

The TOML layout is described in run_config.py, the demo in demo.py, evaluation in evaluate.py.
Without a config file `train` runs the offline demo: SmolLM2-135M-Instruct on offline GSM8K problems, a few minutes
on a CPU. The resolved configuration is saved as RUN_DIR/run_config.json, so `--resume RUN_DIR` needs no file.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fusedrl.demo import announce_demo, demo_run_config, print_eval_lines
from fusedrl.run_config import RUN_CONFIG_FILE, ConfigError, load_run_config, run_config_from_mapping

__all__ = ["ConfigError", "build_parser", "demo_run_config", "load_run_config", "main", "run_config_from_mapping"]

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
    import torch

    from fusedrl.model.export import save_lora
    from fusedrl.threads import ThreadTuner
    from fusedrl.data.loading import build_dataset
    from fusedrl.model.load import load_model
    from fusedrl.model.offline import resolve_model_path
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
        announce_demo(args.demo, run)
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

    callbacks = default_callbacks(config, resume_from=resume_from)
    if not torch.cuda.is_available():  # a CPU run: one torch thread per free core, re-checked every step
        callbacks.insert(0, ThreadTuner())
    logger = callbacks[-1]
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
    print_eval_lines(run, final)
    return 0


def command_eval(args: argparse.Namespace) -> int:
    from fusedrl.evaluate import run_eval

    return run_eval(args)


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
        from fusedrl.threads import use_free_cores

        use_free_cores()
    try:
        return args.handler(args)
    except (ConfigError, FileNotFoundError) as error:
        print(f"fusedrl: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
