"""Resumable training checkpoints: everything a stopped run needs to continue bit for bit.

A checkpoint is one file, ``state.safetensors`` (tensors, and the structure in its header: never a
pickle), in a staging folder beside the output. It holds the trainable tensors, the optimiser and
schedule state, the RNG state, the step, the tokens seen, the curve so far, and a fingerprint of
what the run trains (student, teacher, settings, data). It is written to a temporary name and
renamed, so a kill during the write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from ..io.staging import ResumeError
from ..io.staging import check_fingerprint as staged_check
from ..io.treefile import TreeFileError, load_tree, save_tree

STATE_FILE = "state.safetensors"

# Settings that do not change what is trained (where it is measured or saved).
NEUTRAL_SETTINGS = ("checkpoint_every", "eval_data", "eval_max_rows")
# Fingerprint entries that are digests: only that they differ is said.
HASHED = ("the student model", "the training data")


def digest(data: Any) -> str:
    """sha256 (16 hex digits) of a tensor's bytes or of a JSON-able value."""
    if isinstance(data, torch.Tensor):
        raw = data.detach().cpu().contiguous().numpy().tobytes()
    else:
        raw = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha256(raw).hexdigest()[:16]


def fingerprint(
    student_meta: Any, teacher: str | None, settings: dict[str, Any], train_ids: torch.Tensor
) -> dict[str, Any]:
    """What must match for a checkpoint to continue this run."""
    return {
        "the student model": digest(student_meta),
        "the teacher": teacher,
        "the training data": digest(train_ids),
        "settings": {k: v for k, v in settings.items() if k not in NEUTRAL_SETTINGS},
    }


def check_fingerprint(saved: dict[str, Any], current: dict[str, Any], where: Path) -> None:
    """Refuse a checkpoint of another run, naming what differs."""
    staged_check(saved, current, where, hashed=HASHED, what="the checkpoint in")


def save_state(folder: Path, state: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_tree(folder / STATE_FILE, state)
    return folder / STATE_FILE


def load_state(folder: Path) -> dict[str, Any] | None:
    path = folder / STATE_FILE
    if not path.is_file():
        return None
    try:
        return load_tree(path)
    except TreeFileError as exc:  # a foreign or damaged file: say which
        raise ResumeError(f"cannot read the training checkpoint: {exc}") from exc
