"""The `fusedrl` command: train (from a TOML file, or the offline demo), eval (greedy GSM8K accuracy), plot.

  fusedrl train [config.toml] [--resume RUN_DIR] [--max-steps N] [--output-dir DIR]
  fusedrl eval --model PATH [--adapter DIR] [--limit N] [--dataset gsm8k-offline|gsm8k|FILE.jsonl]
  fusedrl plot RUN_DIR [--output FILE.png]

The TOML layout is described in run_config.py, the demo in demo.py, evaluation in evaluate.py.
Without a config file `train` runs the offline demo: SmolLM2-135M-Instruct on offline GSM8K problems, a few minutes
on a CPU. The resolved configuration is saved as RUN_DIR/run_config.json, so `--resume RUN_DIR` needs no file.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fusedrl.demo import announce_demo, demo_run_config, print_eval_lines
from fusedrl.run_config import RUN_CONFIG_FILE, ConfigError, RunConfig, load_run_config, run_config_from_mapping

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
    """Everything the user gave is checked (config, rewards, dataset, model, trainer, resumed checkpoint) before
    anything is written, so a bad input leaves the run directory as it was."""
    from fusedrl.data.loading import build_dataset
    from fusedrl.model.export import save_lora
    from fusedrl.model.load import load_model
    from fusedrl.model.lora import LoraConfig
    from fusedrl.model.offline import resolve_model_path
    from fusedrl.plot import plot_run
    from fusedrl.train.callbacks import default_callbacks
    from fusedrl.train.checkpoint import find_latest_checkpoint, restore_trainer_checkpoint
    from fusedrl.train.config import GRPOConfig
    from fusedrl.train.trainer import GRPOTrainer

    run = _run_config_of(args)
    resume_from = None
    if args.resume is not None:
        resume_from = find_latest_checkpoint(args.resume)
        if resume_from is None:
            raise ConfigError(f"--resume: {args.resume} holds no complete checkpoint-<step> directory")

    rewards, weights = build_rewards(run.rewards)
    run.train.setdefault("reward_weights", weights)
    config = _section("train", GRPOConfig.from_dict, run.train)
    output_dir = Path(config.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"output_dir: {output_dir} is a file; expected a directory (new, or an earlier run's)")
    lora = _section("lora", LoraConfig.from_dict, run.lora) if run.lora is not None else None
    dataset = build_dataset(run.dataset)
    model_spec = dict(run.model)
    name_or_path = resolve_model_path(model_spec.pop("name_or_path", "smollm2-offline"))
    if config.use_vllm:  # vLLM is started by load_model and shares the model's weights
        model_spec["fast_inference"] = True
        model_spec["gpu_memory_utilization"] = config.vllm_gpu_memory_utilization
        if config.vllm_max_model_length is not None:
            model_spec["max_seq_length"] = config.vllm_max_model_length
    model, tokenizer = _section("model", lambda spec: load_model(
        name_or_path, lora=lora, gradient_checkpointing=config.gradient_checkpointing is not False,  # plain or offload
        **spec), model_spec)
    trainer = _section("train", lambda _: GRPOTrainer(model, rewards, config, dataset, processing_class=tokenizer),
                       None)
    if resume_from is not None:
        restore_trainer_checkpoint(trainer, resume_from)  # raises CheckpointError before anything is written

    callbacks = default_callbacks(config)
    import torch

    if not torch.cuda.is_available():  # a CPU run: one torch thread per free core, re-checked every step
        from fusedrl.threads import ThreadTuner

        callbacks.insert(0, ThreadTuner())
    for callback in callbacks:
        trainer.add_callback(callback)
    (output_dir / RUN_CONFIG_FILE).write_text(json.dumps(run.to_json(), indent=2), encoding="utf-8")
    try:
        trainer.train()
    finally:
        callbacks[-1].close()
    final = save_lora(model, output_dir / "final_adapter", tokenizer) if lora is not None else None
    picture = plot_run(output_dir)
    print(
        f"fusedrl: done: {trainer.state.global_step} steps; run directory {output_dir}"
        + (f"; adapter {final}" if final else "")
        + f"\nfusedrl: reward curve: {picture}"
    )
    print_eval_lines(run, final)
    return 0


def _run_config_of(args: argparse.Namespace) -> RunConfig:
    """The run's configuration: the TOML file, a resumed run's saved config, or the demo; command-line overrides."""
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
    return run


def _section(name: str, build: Callable[[Any], Any], values: Any) -> Any:
    """build(values), with a TypeError/ValueError turned into a one-line ConfigError naming the section."""
    try:
        return build(values)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"[{name}]: {error}") from error


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

    evaluate = commands.add_parser("eval", help="accuracy of a model (and adapter) on held-out problems, greedy or sampled")
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
    evaluate.add_argument("--temperature", type=float, default=None,
                          help="sample at this temperature instead of greedy decoding (seeded)")
    evaluate.add_argument("--samples", type=int, default=1, help="completions per problem when sampling (default 1)")
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
    from fusedrl.train.checkpoint_files import CheckpointError

    if getattr(args, "demo", None) is not None and args.config is not None:
        print("fusedrl: error: --demo runs a built-in config; give either a config file or --demo", file=sys.stderr)
        return 2
    if args.command == "eval":
        from fusedrl.threads import use_free_cores

        use_free_cores()
    try:
        return args.handler(args)
    except (ConfigError, CheckpointError, FileNotFoundError, NotADirectoryError) as error:
        print(f"fusedrl: error: {_one_line(error)}", file=sys.stderr)
        return 2


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= 400 else text[:397] + "..."


if __name__ == "__main__":
    sys.exit(main())
