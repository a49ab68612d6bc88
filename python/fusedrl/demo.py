"""The built-in demos of `fusedrl train`: what each trains, and an honest estimate of how long it takes.

  sums   (default) SmolLM2-135M-Instruct + LoRA learns to answer one-digit sums (reward: the last number of the
         completion is the sum). Measured on the 2-core box, quiet (commit after 1980cb2): the reward went 0.00, 0.13,
         0.25, 0.25, 0.50, 0.75, 0.63, 1.00 over steps 1-8 and stayed 0.75-1.00 to step 20; 9-10 s a step, 3 min 38 s
         for the whole command (model load included), 2.7 GB peak resident memory. A checkpoint every 4 steps (about
         40 s of work). Its eval line samples 4 answers per held-out question at the training temperature: 0.14
         before training, 0.71 after (greedy decoding was already 0.85 before: what GRPO teaches here is to put the
         sampled answers where the greedy one is).
  gsm8k  the same model on offline GSM8K problems with the XML reasoning format: a long run (see estimate_text);
         on a CPU its reward barely moves in 16 steps - it shows the pipeline, not learning.

Each demo is a mapping in the layout of a TOML config (the same as `examples/<name>.toml`, which a test keeps equal),
so `fusedrl train examples/sums.toml` and `fusedrl train` run the same thing.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fusedrl.run_config import ConfigError, RunConfig, run_config_from_mapping

DEFAULT_DEMO = "sums"


@dataclass(frozen=True)
class Demo:
    name: str
    description: str
    config: dict[str, Any]  # TOML layout: GRPOConfig fields in [train], plus [model], [lora], [dataset], [rewards]
    cpu_seconds_per_step: float  # measured on the 2-core CI-like CPU (firstrun report), quiet machine
    gpu_seconds_per_step: float

    def estimate_text(self, on_gpu: bool) -> str:
        steps = self.config["train"]["max_steps"]
        per_step = self.gpu_seconds_per_step if on_gpu else self.cpu_seconds_per_step
        minutes = steps * per_step / 60
        where = "GPU" if on_gpu else "2-core CPU"
        return (f"{steps} steps at about {per_step:.0f} s each on a {where}: about {minutes:.0f} min "
                f"(+ about 30 s to convert the model on first use)")


_SMOLLM2 = {"name_or_path": "smollm2-offline", "dtype": "float32", "max_seq_length": 512}

SUMS = Demo(
    name="sums",
    description="SmolLM2-135M-Instruct learns to answer one-digit sums",
    config={
        "train": {
            "output_dir": "runs/fusedrl-demo",
            "max_steps": 20,
            "learning_rate": 7e-4,
            "num_generations": 4,
            # 4 questions x 4 completions per step, in two micro-batches of 8: half the activation memory
            "per_device_train_batch_size": 8,
            "gradient_accumulation_steps": 2,
            "max_completion_length": 8,
            "max_prompt_length": 64,
            "temperature": 1.0,
            "loss_type": "dapo",
            "beta": 0.0,
            "logging_steps": 1,
            "save_steps": 4,
            "save_total_limit": 2,
            "log_completions": True,
            "num_completions_to_print": 1,
            "gradient_checkpointing": False,
            "dtype": "float32",
            "seed": 0,
            "warmup_steps": 0,
            "lr_scheduler_type": "constant",
        },
        "model": dict(_SMOLLM2),
        "lora": {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"},
        "dataset": {"name": "sums"},
        "rewards": {"names": ["final_number_reward"], "weights": [1.0]},
    },
    cpu_seconds_per_step=10.0,
    gpu_seconds_per_step=1.0,
)

GSM8K = Demo(
    name="gsm8k",
    description="SmolLM2-135M-Instruct on 16 offline GSM8K problems, XML reasoning format (long on a CPU)",
    config={
        "train": {
            "output_dir": "runs/fusedrl-gsm8k",
            "max_steps": 16,
            "learning_rate": 2e-5,
            "num_generations": 8,
            "per_device_train_batch_size": 16,
            "gradient_accumulation_steps": 1,
            "max_completion_length": 32,
            "max_prompt_length": 256,
            "temperature": 1.0,
            "loss_type": "dapo",
            "beta": 0.0,
            "logging_steps": 1,
            "save_steps": 2,
            "save_total_limit": 2,
            "log_completions": True,
            "num_completions_to_print": 1,
            # activations of 16 x ~250-token sequences in float32 are ~5 GB without recomputation
            "gradient_checkpointing": True,
            "dtype": "float32",
            "seed": 0,
            "warmup_steps": 0,
            "lr_scheduler_type": "constant",
        },
        "model": dict(_SMOLLM2),
        "lora": {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"},
        "dataset": {"name": "gsm8k-offline", "limit": 16},
        # proximity_reward scores the last number written, so 32-token completions already get graded rewards
        "rewards": {"names": ["proximity_reward", "correctness_reward", "xmlcount_reward"], "weights": [1.0, 1.0, 0.5]},
    },
    cpu_seconds_per_step=30.0,
    gpu_seconds_per_step=2.0,
)

DEMOS: dict[str, Demo] = {demo.name: demo for demo in (SUMS, GSM8K)}
# the GSM8K demo trains on the first problems of the seed-0 shuffle; `fusedrl eval --dataset gsm8k-offline` the last
DEMO_TRAIN_PROBLEMS = GSM8K.config["dataset"]["limit"]

# `fusedrl eval` lines for runs on the demo datasets: held-out questions, a completion length that fits the task
_EVAL_ARGS = {
    "sums": "--dataset sums --limit 20 --max-new-tokens 8 --temperature 1 --samples 4",
    "gsm8k-offline": "--dataset gsm8k-offline --limit 4 --max-new-tokens 64",
}


def get_demo(name: str) -> Demo:
    if name not in DEMOS:
        raise ConfigError(f"--demo: unknown demo {name!r}; choose one of {sorted(DEMOS)}")
    return DEMOS[name]


def demo_mapping(name: str, on_gpu: bool = False) -> dict[str, Any]:
    """A deep copy of the demo's TOML-layout mapping; on a GPU in bfloat16 with gradient checkpointing."""
    values = copy.deepcopy(get_demo(name).config)
    if on_gpu:
        values["train"].update(dtype="bfloat16", gradient_checkpointing=True)
        values["model"]["dtype"] = "bfloat16"
    return values


def eval_command(dataset: str, model: str, adapter: str | None) -> str | None:
    """The `fusedrl eval` line (about a minute on a CPU) for a run on a demo dataset; None for other datasets."""
    if dataset not in _EVAL_ARGS:
        return None
    adapter_args = f" --adapter {adapter}" if adapter else ""
    return f"fusedrl eval --model {model}{adapter_args} {_EVAL_ARGS[dataset]}"


def _on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def demo_run_config(name: str | None = None) -> RunConfig:
    """The RunConfig of a demo ("sums" when name is None) for this machine's device."""
    return run_config_from_mapping(demo_mapping(name or DEFAULT_DEMO, on_gpu=_on_gpu()))


def announce_demo(name: str | None, run: RunConfig) -> None:
    """The line printed before a demo starts: what it trains and how long it should take here."""
    demo = get_demo(name or DEFAULT_DEMO)
    print(f"fusedrl: running the {demo.name!r} demo ({demo.description}); expect "
          f"{demo.estimate_text(_on_gpu())}; run directory {run.train['output_dir']}", flush=True)


def print_eval_lines(run: RunConfig, adapter: Path | None) -> None:
    """After a run on a demo dataset: the `fusedrl eval` lines for the trained adapter and for the model before."""
    model = run.model.get("name_or_path", "smollm2-offline")
    dataset = run.dataset.get("name", "")
    trained = eval_command(dataset, model, str(adapter) if adapter else None)
    if trained is None:
        return
    print(f"fusedrl: evaluate on held-out questions (about a minute on a CPU):\n  {trained}")
    if adapter is not None:
        print(f"  {eval_command(dataset, model, None)}   # the model before training")
