"""default_callbacks gives a Python-API run the checkpoints and metrics log that `fusedrl train` writes."""

from __future__ import annotations

import json

from fusedrl.model.tiny import tiny_model_from_tokenizer, tiny_word_tokenizer
from fusedrl.train.callbacks import default_callbacks
from fusedrl.train.checkpoint import CheckpointCallback, find_latest_checkpoint
from fusedrl.train.config import GRPOConfig
from fusedrl.train.metrics_log import MetricsLogger
from fusedrl.train.trainer import GRPOTrainer


def test_default_callbacks_checkpoint_and_log(tmp_path):
    tokenizer = tiny_word_tokenizer()
    model = tiny_model_from_tokenizer(tokenizer, hidden=32, layers=1, seed=0)
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=3, max_steps=3, save_steps=2, logging_steps=1, dtype="float32",
                      gradient_checkpointing=False, learning_rate=1e-2)
    callbacks = default_callbacks(args)
    assert isinstance(callbacks[0], CheckpointCallback) and isinstance(callbacks[-1], MetricsLogger)
    rows = [{"prompt": f"what is {d}"} for d in range(4)]
    trainer = GRPOTrainer(model, lambda prompts, completions, **kw: [float(len(c)) for c in completions], args,
                          rows, tokenizer, callbacks=callbacks)
    try:
        trainer.train()
    finally:
        callbacks[-1].close()
    assert find_latest_checkpoint(tmp_path).name == "checkpoint-3"  # every 2 steps and at the end
    assert (tmp_path / "checkpoint-2").is_dir()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
