"""The file side of checkpoints: durable writes, finding the latest complete checkpoint, rotation.

A run directory holds `checkpoint-<step>/` directories and a `latest` pointer file naming the newest one. A
checkpoint is complete when its `trainer_state.json` exists (written last). Directories whose name starts with
`.tmp-checkpoint-` or `.trash-checkpoint-` are leftovers of interrupted saves.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import uuid
from pathlib import Path

CHECKPOINT_PREFIX = "checkpoint-"
LATEST_POINTER = "latest"
TRAINER_STATE_FILE = "trainer_state.json"
TEMP_PREFIX = ".tmp-checkpoint-"
TRASH_PREFIX = ".trash-checkpoint-"
_CHECKPOINT_RE = re.compile(rf"^{re.escape(CHECKPOINT_PREFIX)}(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the path and the cause."""


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (directories make renames inside them durable)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fsync_path(Path(dirpath) / name)
        fsync_path(Path(dirpath))


def write_text_atomic(path: Path, text: str) -> None:
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
    fsync_path(path.parent)


def describe_os_error(error: OSError) -> str:
    """"no space left on device (disk full) at /x/y" and the like."""
    if error.errno == errno.ENOSPC:
        cause = "no space left on device (disk full)"
    elif error.errno in (errno.EACCES, errno.EPERM):
        cause = "permission denied"
    elif error.errno == errno.EROFS:
        cause = "read-only file system"
    else:
        cause = error.strerror or str(error)
    return f"{cause}{f' at {error.filename}' if error.filename else ''}"


def checkpoint_step(path: str | os.PathLike[str]) -> int | None:
    """The step of a `checkpoint-<step>` directory name, or None for any other name."""
    match = _CHECKPOINT_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


def is_complete(path: Path) -> bool:
    return path.is_dir() and (path / TRAINER_STATE_FILE).is_file()


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoints under run_dir, oldest step first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(step, p) for p in run_dir.iterdir() if (step := checkpoint_step(p)) is not None and is_complete(p)]
    return [p for _, p in sorted(found)]


def find_latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The checkpoint the `latest` pointer names; if the pointer is missing or stale, the highest complete step."""
    run_dir = Path(run_dir)
    pointer = run_dir / LATEST_POINTER
    if pointer.is_file():
        named = run_dir / pointer.read_text(encoding="utf-8").strip()
        if checkpoint_step(named) is not None and is_complete(named):
            return named
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def resolve_checkpoint(path: str | os.PathLike[str]) -> Path:
    """A complete checkpoint directory, given it or a run directory (then its latest checkpoint)."""
    path = Path(path)
    if checkpoint_step(path) is None and path.is_dir():
        latest = find_latest_checkpoint(path)
        if latest is None:
            raise CheckpointError(
                f"checkpoint: {path} is neither a checkpoint-<step> directory nor a run directory holding one"
            )
        path = latest
    if not is_complete(path):
        raise CheckpointError(f"checkpoint: {path} is not a complete checkpoint (no {TRAINER_STATE_FILE})")
    return path


def remove_stale_temporaries(run_dir: Path) -> None:
    """Leftovers of saves that crashed before their rename; never a complete checkpoint."""
    for entry in run_dir.iterdir():
        if entry.name.startswith((TEMP_PREFIX, TRASH_PREFIX)) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)


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
