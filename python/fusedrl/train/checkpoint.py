"""Training checkpoints: `checkpoint-<step>/` directories under a run directory, written atomically.

A checkpoint holds:
  adapter_model.safetensors + adapter_config.json   the LoRA adapter in PEFT format (model.save_pretrained);
                                                     a model without LoRA is saved whole the same way
  state.pt                                           the rest of the run's state, e.g. GRPOTrainer.state_dict()
                                                     without its JSON part (optimizer, scheduler, scaler, RNGs,
                                                     the generation round still being trained on)
  trainer_state.json                                 the JSON part (step, history, model signature); written last

Writes are atomic: everything goes into a hidden temporary sibling directory, every file and the directory are
fsynced, then the directory is renamed into place and the `latest` pointer is replaced atomically. A crash or an
OSError (disk full, permission denied) at any point leaves every earlier checkpoint and the pointer intact; the
error raised (CheckpointError) names the path and the cause. Rotation (save_total_limit) only runs after the new
checkpoint and the pointer are durable, and never deletes the checkpoint the pointer names.

The trainer owns its state (GRPOTrainer.state_dict / load_state_dict); this module only moves it to and from disk.
CheckpointCallback saves every save_steps and at the end, and restores a run in on_train_begin.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .checkpoint_files import (
    CHECKPOINT_PREFIX,
    LATEST_POINTER,
    TEMP_PREFIX,
    TRAINER_STATE_FILE,
    TRASH_PREFIX,
    CheckpointError,
    describe_os_error,
    find_latest_checkpoint,
    fsync_path,
    fsync_tree,
    list_checkpoints,
    remove_stale_temporaries,
    resolve_checkpoint,
    rotate_checkpoints,
    write_text_atomic,
)

STATE_FILE = "state.pt"

__all__ = [
    "CheckpointCallback", "CheckpointError", "find_latest_checkpoint", "list_checkpoints", "load_checkpoint",
    "restore_trainer_checkpoint", "save_checkpoint", "save_trainer_checkpoint",
]


# ---------------------------------------------------------------------------------------------------------------
# save
# ---------------------------------------------------------------------------------------------------------------


def _write_files(target: Path, model: torch.nn.Module | None, trainer_state: Mapping[str, Any],
                 state: Mapping[str, Any] | None) -> None:
    if model is not None:
        if not hasattr(model, "save_pretrained"):
            raise CheckpointError(f"model: expected a peft.PeftModel or transformers PreTrainedModel with "
                                  f"save_pretrained, got {type(model).__name__}")
        model.save_pretrained(target)
    if state is not None:
        torch.save(dict(state), target / STATE_FILE)
    # trainer_state.json marks the checkpoint complete, so it goes last
    (target / TRAINER_STATE_FILE).write_text(json.dumps(dict(trainer_state), indent=2), encoding="utf-8")


def save_checkpoint(
    run_dir: str | os.PathLike[str],
    step: int,
    *,
    model: torch.nn.Module | None,
    trainer_state: Mapping[str, Any],
    state: Mapping[str, Any] | None = None,
    save_total_limit: int | None = None,
) -> Path:
    """Atomically write `run_dir/checkpoint-<step>/`, point `run_dir/latest` at it, rotate old ones.

    trainer_state must be JSON-serialisable; state may hold tensors and plain containers (torch.save, loaded back
    with weights_only=True). Returns the checkpoint path. Raises CheckpointError naming the path on any OSError;
    earlier checkpoints and the pointer are then unchanged.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CheckpointError(f"step: expected a non-negative int, got {step!r}")
    if save_total_limit is not None and save_total_limit < 1:
        raise CheckpointError(f"save_total_limit: expected None or an int >= 1, got {save_total_limit!r}")
    try:
        json.dumps(dict(trainer_state))
    except (TypeError, ValueError) as error:  # before touching the disk
        raise CheckpointError(f"trainer_state: expected JSON-serialisable values ({error})") from error
    run_dir = Path(run_dir)
    final = run_dir / f"{CHECKPOINT_PREFIX}{step}"
    temp = run_dir / f"{TEMP_PREFIX}{step}-{uuid.uuid4().hex[:8]}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(run_dir)
        temp.mkdir()
        _write_files(temp, model, trainer_state, state)
        fsync_tree(temp)
        trash = None
        if final.exists():  # re-saving a step: move the old one aside first (rename onto a full dir fails)
            trash = run_dir / f"{TRASH_PREFIX}{step}-{uuid.uuid4().hex[:8]}"
            os.rename(final, trash)
        os.rename(temp, final)
        fsync_path(run_dir)
        write_text_atomic(run_dir / LATEST_POINTER, final.name + "\n")
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
    except OSError as error:
        shutil.rmtree(temp, ignore_errors=True)
        previous = find_latest_checkpoint(run_dir) if run_dir.is_dir() else None
        raise CheckpointError(
            f"could not save checkpoint {final}: {describe_os_error(error)}. "
            f"Earlier checkpoints are untouched (latest: {previous if previous else 'none'})."
        ) from error
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    if save_total_limit is not None:
        rotate_checkpoints(run_dir, save_total_limit)
    return final


# ---------------------------------------------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------------------------------------------


def load_model_weights(model: torch.nn.Module, checkpoint: Path) -> None:
    """Load the adapter (peft model) or the whole model's safetensors of a checkpoint into `model`."""
    from peft import PeftModel, set_peft_model_state_dict
    from peft.utils import load_peft_weights
    from safetensors.torch import load_file

    try:
        if isinstance(model, PeftModel):
            adapter_name = model.active_adapter if isinstance(model.active_adapter, str) else "default"
            result = set_peft_model_state_dict(model, load_peft_weights(str(checkpoint), device="cpu"),
                                               adapter_name=adapter_name)
            unexpected = getattr(result, "unexpected_keys", [])
            if unexpected:
                raise CheckpointError(
                    f"{checkpoint}: the adapter weights do not fit the model (unexpected {unexpected[:3]})")
            return
        files = sorted(checkpoint.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{checkpoint}: no *.safetensors model weights found")
        state: dict[str, torch.Tensor] = {}
        for file in files:
            state.update(load_file(file))
        model.load_state_dict(state, strict=False)
    except CheckpointError:
        raise
    except OSError as error:
        raise CheckpointError(f"could not read checkpoint {checkpoint}: {describe_os_error(error)}") from error
    except Exception as error:  # size mismatch (another model), a corrupted safetensors header, ...
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{checkpoint}: the model weights cannot be loaded into this model: {first_line}") \
            from error


def _read_state_file(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as error:
        raise CheckpointError(f"could not read {path}: {describe_os_error(error)}") from error
    except Exception as error:  # a truncated or overwritten file
        raise CheckpointError(f"{path} is corrupted ({type(error).__name__}); resume from an earlier checkpoint "
                              f"or start afresh") from error


def load_checkpoint(
    checkpoint: str | os.PathLike[str], *, model: torch.nn.Module | None = None
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(trainer_state, state) of a checkpoint directory (or a run directory: its latest checkpoint); loads the
    saved weights into `model` when given. state is None when the checkpoint has none."""
    path = resolve_checkpoint(checkpoint)
    try:
        trainer_state = json.loads((path / TRAINER_STATE_FILE).read_text(encoding="utf-8"))
    except OSError as error:
        raise CheckpointError(f"could not read checkpoint {path}: {describe_os_error(error)}") from error
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path / TRAINER_STATE_FILE} is corrupted (not JSON: {error})") from error
    state = _read_state_file(path / STATE_FILE) if (path / STATE_FILE).is_file() else None
    if model is not None:
        load_model_weights(model, path)
    return trainer_state, state


# ---------------------------------------------------------------------------------------------------------------
# GRPOTrainer: save its state_dict, restore it, and a callback doing both
# ---------------------------------------------------------------------------------------------------------------


def save_trainer_checkpoint(trainer: Any, run_dir: str | os.PathLike[str], save_total_limit: int | None = None) -> Path:
    """Checkpoint a GRPOTrainer at its current global_step: its model weights and its state_dict()."""
    state = trainer.state_dict()
    json_part = {"progress": state.pop("progress"), "model": state.pop("model")}
    return save_checkpoint(run_dir, trainer.state.global_step, model=trainer.model, trainer_state=json_part,
                           state=state, save_total_limit=save_total_limit)


def restore_trainer_checkpoint(trainer: Any, checkpoint: str | os.PathLike[str]) -> Path:
    """Load a checkpoint (or a run directory's latest) into a GRPOTrainer built with the same model and config.

    The trainer checks the checkpoint's model signature before anything changes. Returns the checkpoint used.
    """
    path = resolve_checkpoint(checkpoint)
    json_part, state = load_checkpoint(path)
    if state is None or "progress" not in json_part:
        raise CheckpointError(f"{path} is not a GRPOTrainer checkpoint (no {STATE_FILE} or no progress)")
    try:
        trainer.load_state_dict({**state, **json_part})
    except (KeyError, ValueError) as error:
        raise CheckpointError(f"{path}: {error}") from error
    load_model_weights(trainer.model, path)
    return path


class CheckpointCallback:
    """GRPOTrainer callback: restore `resume_from` at train begin, save every `save_steps` (0: never in between)
    and at the end."""

    def __init__(self, run_dir: str | os.PathLike[str], save_steps: int, save_total_limit: int | None = None,
                 resume_from: str | os.PathLike[str] | None = None) -> None:
        if isinstance(save_steps, bool) or not isinstance(save_steps, int) or save_steps < 0:
            raise CheckpointError(f"save_steps: expected an int >= 0 (0: only at the end), got {save_steps!r}")
        self.run_dir = Path(run_dir)
        self.save_steps = save_steps
        self.save_total_limit = save_total_limit
        self.resume_from = resume_from
        self.resumed_from: Path | None = None
        self.last_saved_step: int | None = None

    def on_train_begin(self, trainer: Any) -> None:
        if self.resume_from is not None:
            self.resumed_from = restore_trainer_checkpoint(trainer, self.resume_from)
            self.last_saved_step = trainer.state.global_step

    def on_step_end(self, trainer: Any) -> None:
        if self.save_steps and trainer.state.global_step % self.save_steps == 0:
            self._save(trainer)

    def on_train_end(self, trainer: Any) -> None:
        if self.last_saved_step != trainer.state.global_step:
            self._save(trainer)

    def _save(self, trainer: Any) -> None:
        save_trainer_checkpoint(trainer, self.run_dir, self.save_total_limit)
        self.last_saved_step = trainer.state.global_step
