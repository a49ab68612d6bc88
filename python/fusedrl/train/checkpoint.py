"""Training checkpoints: save, find and restore `checkpoint-<step>/` directories under a run directory.

A checkpoint holds everything needed to continue a run bit for bit:
  adapter_model.safetensors + adapter_config.json   the LoRA adapter in PEFT format (model.save_pretrained);
                                                     a model without LoRA is saved whole the same way
  optimizer.pt, scheduler.pt, scaler.pt              state dicts of the objects given (each optional)
  rng_state.pt                                       python, numpy (if installed), torch CPU, CUDA, named generators
  extra_state.pt                                     optional tensors/containers (e.g. a half-used generation round)
  trainer_state.json                                 global_step, data position, history, ... (JSON); written last

Writes are atomic: everything goes into a hidden temporary sibling directory, every file and the directory are
fsynced, then the directory is renamed into place and the `latest` pointer file is replaced atomically. A crash or
an OSError (disk full, permission denied) at any point leaves every earlier checkpoint and the pointer intact; the
error raised (CheckpointError) names the path and the cause. Rotation (save_total_limit) only runs after the new
checkpoint and the pointer are durable, and never deletes the checkpoint the pointer names. One process writes a
run directory at a time: a save removes the temporary directories that crashed saves left behind.

GRPOTrainer integration (CheckpointCallback, save/restore_trainer_checkpoint) uses the trainer's callback events:
restore in on_train_begin (after the trainer seeded its RNGs), save in on_step_end every save_steps and at the end.
It reads the trainer's sampling/shuffle generators and the generation buffer's stored round directly, since the
trainer has no public state_dict for them yet; a resumed run's later losses equal an uninterrupted run's.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_PREFIX = "checkpoint-"
LATEST_POINTER = "latest"
TRAINER_STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
SCALER_FILE = "scaler.pt"
RNG_FILE = "rng_state.pt"
EXTRA_STATE_FILE = "extra_state.pt"
_TEMP_PREFIX = ".tmp-checkpoint-"
_TRASH_PREFIX = ".trash-checkpoint-"
_CHECKPOINT_RE = re.compile(rf"^{re.escape(CHECKPOINT_PREFIX)}(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the path and the cause."""


# ---------------------------------------------------------------------------------------------------------------
# durable file system helpers
# ---------------------------------------------------------------------------------------------------------------


def _fsync_path(path: Path) -> None:
    """fsync a file or a directory (directories make renames inside them durable)."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


def _write_text_atomic(path: Path, text: str) -> None:
    """Replace `path` by a file holding `text`; readers see the old or the new content, never a mix."""
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    finally:
        if temp.exists():
            temp.unlink()
    _fsync_path(path.parent)


def _describe_os_error(error: OSError) -> str:
    if error.errno == errno.ENOSPC:
        cause = "no space left on device (disk full)"
    elif error.errno in (errno.EACCES, errno.EPERM):
        cause = "permission denied"
    elif error.errno == errno.EROFS:
        cause = "read-only file system"
    else:
        cause = error.strerror or str(error)
    where = f" at {error.filename}" if error.filename else ""
    return f"{cause}{where}"


# ---------------------------------------------------------------------------------------------------------------
# RNG states
# ---------------------------------------------------------------------------------------------------------------


def capture_rng_state(
    generators: Mapping[str, torch.Generator] | None = None,
) -> dict[str, Any]:
    """All global RNG states (python, numpy if installed, torch CPU, every CUDA device) plus named generators."""
    python_state = random.getstate()
    state: dict[str, Any] = {
        "python": [python_state[0], list(python_state[1]), python_state[2]],
        "torch_cpu": torch.get_rng_state(),
    }
    try:
        import numpy as np
    except ImportError:
        np = None  # type: ignore[assignment]
    if np is not None:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [
            kind,
            torch.from_numpy(keys.astype(np.int64)),
            int(pos),
            int(has_gauss),
            float(cached),
        ]
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    state["generators"] = {name: gen.get_state() for name, gen in (generators or {}).items()}
    return state


def restore_rng_state(state: Mapping[str, Any], generators: Mapping[str, torch.Generator] | None = None) -> None:
    """Inverse of capture_rng_state. CUDA states are restored only when CUDA is available now."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch_cpu"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    saved_generators = state.get("generators", {})
    for name, gen in (generators or {}).items():
        if name not in saved_generators:
            raise CheckpointError(
                f"generators: the checkpoint has no state for generator {name!r}; it has {sorted(saved_generators)}"
            )
        gen.set_state(saved_generators[name])


# ---------------------------------------------------------------------------------------------------------------
# finding checkpoints
# ---------------------------------------------------------------------------------------------------------------


def checkpoint_step(path: str | os.PathLike[str]) -> int | None:
    """The step of a `checkpoint-<step>` directory name, or None for any other name."""
    match = _CHECKPOINT_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


def _is_complete(path: Path) -> bool:
    return path.is_dir() and (path / TRAINER_STATE_FILE).is_file()


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoints under run_dir, oldest step first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(step, p) for p in run_dir.iterdir() if (step := checkpoint_step(p)) is not None and _is_complete(p)]
    return [p for _, p in sorted(found)]


def find_latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The checkpoint the `latest` pointer names; if the pointer is missing or stale, the highest complete step."""
    run_dir = Path(run_dir)
    pointer = run_dir / LATEST_POINTER
    if pointer.is_file():
        named = run_dir / pointer.read_text(encoding="utf-8").strip()
        if checkpoint_step(named) is not None and _is_complete(named):
            return named
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


# ---------------------------------------------------------------------------------------------------------------
# save
# ---------------------------------------------------------------------------------------------------------------


def _remove_stale_temporaries(run_dir: Path) -> None:
    """Leftovers of saves that crashed before their rename; never a complete checkpoint."""
    for entry in run_dir.iterdir():
        if entry.name.startswith((_TEMP_PREFIX, _TRASH_PREFIX)) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)


def _write_checkpoint_files(
    target: Path,
    *,
    model: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any | None,
    scaler: Any | None,
    trainer_state: Mapping[str, Any],
    generators: Mapping[str, torch.Generator] | None,
    extra_state: Mapping[str, Any] | None,
) -> None:
    if model is not None:
        if not hasattr(model, "save_pretrained"):
            raise CheckpointError(
                f"model: expected a peft.PeftModel or transformers PreTrainedModel with "
                f"save_pretrained, got {type(model).__name__}"
            )
        model.save_pretrained(target)
    if optimizer is not None:
        torch.save(optimizer.state_dict(), target / OPTIMIZER_FILE)
    if scheduler is not None:
        torch.save(scheduler.state_dict(), target / SCHEDULER_FILE)
    if scaler is not None:
        torch.save(scaler.state_dict(), target / SCALER_FILE)
    torch.save(capture_rng_state(generators), target / RNG_FILE)
    if extra_state is not None:
        torch.save(dict(extra_state), target / EXTRA_STATE_FILE)
    # trainer_state.json marks the checkpoint complete, so it goes last
    (target / TRAINER_STATE_FILE).write_text(
        json.dumps(dict(trainer_state), indent=2, allow_nan=True), encoding="utf-8"
    )


def save_checkpoint(
    run_dir: str | os.PathLike[str],
    step: int,
    *,
    model: torch.nn.Module | None,
    trainer_state: Mapping[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    scaler: Any | None = None,
    generators: Mapping[str, torch.Generator] | None = None,
    extra_state: Mapping[str, Any] | None = None,
    save_total_limit: int | None = None,
) -> Path:
    """Atomically write `run_dir/checkpoint-<step>/`, point `run_dir/latest` at it, rotate old ones.

    trainer_state must be JSON-serialisable (global_step, data position, history, ...); extra_state may hold tensors,
    lists, dicts and plain numbers (read back with load_extra_state). Returns the checkpoint path.
    Raises CheckpointError naming the path on any OSError; earlier checkpoints and the pointer are then unchanged.
    """
    if not isinstance(step, int) or step < 0:
        raise CheckpointError(f"step: expected a non-negative int, got {step!r}")
    if save_total_limit is not None and save_total_limit < 1:
        raise CheckpointError(f"save_total_limit: expected None or an int >= 1, got {save_total_limit!r}")
    run_dir = Path(run_dir)
    final = run_dir / f"{CHECKPOINT_PREFIX}{step}"
    temp = run_dir / f"{_TEMP_PREFIX}{step}-{uuid.uuid4().hex[:8]}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(run_dir)
        json.dumps(dict(trainer_state), allow_nan=True)  # fail before touching the disk if not serialisable
        temp.mkdir()
        _write_checkpoint_files(
            temp,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
            trainer_state=trainer_state,
            generators=generators,
            extra_state=extra_state,
        )
        _fsync_tree(temp)
        trash = None
        if final.exists():  # re-saving a step: move the old one aside first (rename onto a full dir fails)
            trash = run_dir / f"{_TRASH_PREFIX}{step}-{uuid.uuid4().hex[:8]}"
            os.rename(final, trash)
        os.rename(temp, final)
        _fsync_path(run_dir)
        _write_text_atomic(run_dir / LATEST_POINTER, final.name + "\n")
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
    except OSError as error:
        shutil.rmtree(temp, ignore_errors=True)
        previous = find_latest_checkpoint(run_dir) if run_dir.is_dir() else None
        raise CheckpointError(
            f"could not save checkpoint {final}: {_describe_os_error(error)}. "
            f"Earlier checkpoints are untouched (latest: {previous if previous else 'none'})."
        ) from error
    except TypeError as error:
        shutil.rmtree(temp, ignore_errors=True)
        raise CheckpointError(f"trainer_state: expected JSON-serialisable values ({error})") from error
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    if save_total_limit is not None:
        rotate_checkpoints(run_dir, save_total_limit)
    return final


def rotate_checkpoints(run_dir: str | os.PathLike[str], save_total_limit: int) -> list[Path]:
    """Delete the oldest checkpoints so at most save_total_limit remain; keeps the one `latest` names."""
    run_dir = Path(run_dir)
    keep = find_latest_checkpoint(run_dir)
    checkpoints = list_checkpoints(run_dir)
    excess = len(checkpoints) - save_total_limit
    removed = []
    for path in checkpoints:
        if excess <= 0:
            break
        if path == keep:
            continue
        shutil.rmtree(path)
        removed.append(path)
        excess -= 1
    return removed


# ---------------------------------------------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------------------------------------------


def _load_model_weights(model: torch.nn.Module, checkpoint: Path) -> None:
    from peft import PeftModel, set_peft_model_state_dict
    from peft.utils import load_peft_weights

    if isinstance(model, PeftModel):
        adapter_name = model.active_adapter if isinstance(model.active_adapter, str) else "default"
        weights = load_peft_weights(str(checkpoint), device="cpu")
        result = set_peft_model_state_dict(model, weights, adapter_name=adapter_name)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise CheckpointError(f"{checkpoint}: adapter weights do not fit the model (unexpected {unexpected[:5]})")
        return
    from safetensors.torch import load_file

    files = sorted(checkpoint.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{checkpoint}: no *.safetensors model weights found")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(file))
    model.load_state_dict(state, strict=False)


def _torch_load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def load_checkpoint(
    checkpoint: str | os.PathLike[str],
    *,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    scaler: Any | None = None,
    generators: Mapping[str, torch.Generator] | None = None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Restore the given objects in place from a checkpoint directory (or a run directory: its latest checkpoint).

    Returns the trainer state dict saved with it.
    """
    path = Path(checkpoint)
    if checkpoint_step(path) is None and path.is_dir():
        latest = find_latest_checkpoint(path)
        if latest is None:
            raise CheckpointError(
                f"checkpoint: {path} is neither a checkpoint-<step> directory nor a run directory holding one"
            )
        path = latest
    if not _is_complete(path):
        raise CheckpointError(f"checkpoint: {path} is not a complete checkpoint (no {TRAINER_STATE_FILE})")
    try:
        trainer_state = json.loads((path / TRAINER_STATE_FILE).read_text(encoding="utf-8"))
        if model is not None:
            _load_model_weights(model, path)
        for obj, name in (
            (optimizer, OPTIMIZER_FILE),
            (scheduler, SCHEDULER_FILE),
            (scaler, SCALER_FILE),
        ):
            if obj is None:
                continue
            if not (path / name).is_file():
                raise CheckpointError(f"{path}: {name} is missing but a {type(obj).__name__} was given to restore")
            obj.load_state_dict(_torch_load(path / name))
        if restore_rng:
            restore_rng_state(_torch_load(path / RNG_FILE), generators)
    except OSError as error:
        raise CheckpointError(f"could not read checkpoint {path}: {_describe_os_error(error)}") from error
    return trainer_state


def load_extra_state(checkpoint: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The extra_state saved with a checkpoint, or None if it had none."""
    path = Path(checkpoint) / EXTRA_STATE_FILE
    if not path.is_file():
        return None
    try:
        return _torch_load(path)
    except OSError as error:
        raise CheckpointError(f"could not read {path}: {_describe_os_error(error)}") from error


# ---------------------------------------------------------------------------------------------------------------
# GRPOTrainer integration: a callback that saves every save_steps and restores a run at train begin
# ---------------------------------------------------------------------------------------------------------------


def save_trainer_checkpoint(trainer: Any, run_dir: str | os.PathLike[str], save_total_limit: int | None = None) -> Path:
    """Checkpoint a fusedrl GRPOTrainer at its current global_step (model, optimizer, scheduler, loss scaler,
    RNGs, the trainer's sampling/shuffle generators, its state, and the generation round still being trained on)."""
    import dataclasses

    buffer = trainer.buffer
    stored = buffer.stored_round
    mid_round = stored is not None and buffer.micro_step % buffer.generate_every != 0
    extra = {"generation_round": [dataclasses.asdict(batch) for batch in stored]} if mid_round else None
    state = dataclasses.asdict(trainer.state)
    state["data_position"] = {
        "rounds_generated": buffer.rounds_generated,
        "micro_step": buffer.micro_step,
    }
    return save_checkpoint(
        run_dir,
        trainer.state.global_step,
        model=trainer.model,
        trainer_state=state,
        optimizer=trainer.optimizer,
        scheduler=trainer.scheduler,
        scaler=trainer.precision.scaler,
        generators=trainer.rng_generators(),
        extra_state=extra,
        save_total_limit=save_total_limit,
    )


def restore_trainer_checkpoint(trainer: Any, checkpoint: str | os.PathLike[str]) -> Path:
    """Load a checkpoint (or a run directory's latest) into a GRPOTrainer built with the same config.

    Must run after the trainer seeded its RNGs (GRPOTrainer.train does that first, then calls on_train_begin).
    Returns the checkpoint directory used.
    """
    from fusedrl.train.batching import TrainingBatch

    path = Path(checkpoint)
    if checkpoint_step(path) is None:
        latest = find_latest_checkpoint(path)
        if latest is None:
            raise CheckpointError(f"resume: {path} holds no complete checkpoint-<step> directory")
        path = latest
    state = load_checkpoint(
        path,
        model=trainer.model,
        optimizer=trainer.optimizer,
        scheduler=trainer.scheduler,
        scaler=trainer.precision.scaler,
        generators=trainer.rng_generators(),
    )
    position = state.pop("data_position")
    state.pop("max_steps", None)  # the new run's max_steps (e.g. --max-steps) wins
    for key, value in state.items():
        setattr(trainer.state, key, value)
    extra = load_extra_state(path)
    trainer.buffer.restore(
        micro_step=position["micro_step"],
        rounds_generated=position["rounds_generated"],
        stored_round=[TrainingBatch(**batch) for batch in extra["generation_round"]] if extra else None,
    )
    return path


class CheckpointCallback:
    """GRPOTrainer callback: restore `resume_from` at train begin, save every `save_steps` (0: never in between)
    and at the end."""

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        save_steps: int,
        save_total_limit: int | None = None,
        resume_from: str | os.PathLike[str] | None = None,
    ) -> None:
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
