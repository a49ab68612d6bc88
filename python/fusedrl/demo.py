"""The offline demo that `fusedrl train` runs without a config file."""

from __future__ import annotations

from fusedrl.run_config import RunConfig

DEMO_TRAIN_PROBLEMS = 16  # the demo trains on the first problems of the seed-0 shuffle; eval uses the last ones


def demo_run_config() -> RunConfig:
    """The offline demo: SmolLM2-135M-Instruct, 16 GSM8K problems, short completions, 16 steps of 2 x 8 completions.

    About 10 s a step on a quiet 2-core CPU (plus 30 s converting the model once); seconds on a GPU.
    """
    import torch

    on_gpu = torch.cuda.is_available()
    return RunConfig(
        train={
            "output_dir": "runs/fusedrl-demo",
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
            "save_steps": 8,
            "save_total_limit": 2,
            "log_completions": True,
            "num_completions_to_print": 1,
            "dtype": "bfloat16" if on_gpu else "float32",
            "gradient_checkpointing": on_gpu,
            "seed": 0,
            "warmup_steps": 0,
            "lr_scheduler_type": "constant",
        },
        model={
            "name_or_path": "smollm2-offline",
            "dtype": "bfloat16" if on_gpu else "float32",
            "max_seq_length": 512,
        },
        lora={"r": 16, "lora_alpha": 32, "target_modules": "all-linear"},
        dataset={"name": "gsm8k-offline", "limit": DEMO_TRAIN_PROBLEMS},
        # proximity_reward scores the last number written, so 32-token completions already get graded rewards
        rewards=[
            ("proximity_reward", 1.0),
            ("correctness_reward", 1.0),
            ("xmlcount_reward", 0.5),
        ],
    )
