"""A staging folder beside a slicing run's output: what a stopped ``slicegpt slice`` needs to go on bit for bit.

The on-disk :class:`~slicegpt.core.streams.Checkpoint`. ``.OUT.slice-state/`` (hidden, beside
the output folder ``OUT``) holds::

    fingerprint.json          what identifies the run (written first, compared on resume)
    pooled.safetensors        uniform mode's (eigenvalues, Q), once its statistics-only walk finished
    embeddings.safetensors    the sliced embedding tables (written with the first layer)
    layer-00003.safetensors   the tensors of each finished layer
    state.safetensors         the loop state after the last finished layer: next layer, basis,
                              spectra, refits, widths as built, and the activations it reads

Every file is written to a temporary name and renamed into place, so a kill during a write
leaves the previous checkpoint whole; ``state.safetensors`` is written last after each layer (the commit
point), so it never names a layer whose file is not there yet. A layer file written after the
last commit is simply written again.
"""

from __future__ import annotations

import logging
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch

from ..core.streams import NUMERICS, LoopState, Restart
from ..core.widths import LayerWidths
from .treefile import TreeFileError, fresh, load_tree, save_tree, write_atomically

log = logging.getLogger(__name__)

STATE = "state.safetensors"
FINGERPRINT = "fingerprint.json"
POOLED = "pooled.safetensors"
EMBEDDINGS = "embeddings.safetensors"

# Identity entries too large to show: only that they differ is said.
_HASHED = ("model config", "calibration data", "widths", "source weights")


class ResumeError(ValueError):
    """Staged state (a slicing staging folder, a training checkpoint) does not belong to the run
    asked for, or cannot be read."""


def staging_dir(out: str | os.PathLike, kind: str = "slice") -> Path:
    """Where a run that writes ``out`` keeps its staged state (hidden, beside it):
    ``.OUT.slice-state`` for slicing, ``.OUT.recover-state`` for recovery training."""
    out = Path(out)
    return out.parent / f".{out.name}.{kind}-state"


def _stderr(message: str) -> None:
    log.info(message)


def check_fingerprint(
    saved: dict[str, Any],
    current: dict[str, Any],
    where: Path,
    *,
    hashed: tuple[str, ...] = _HASHED,
    what: str = "the staging folder",
) -> None:
    """Refuse the staged state of another run, naming what differs (one line).

    Entries are compared in the order the run names them; those in ``hashed`` are digests, so
    only that they differ is said; ``settings`` is compared setting by setting. Used by slicing
    (here) and by recovery training's checkpoints (``training/state.py``).
    """
    differ = []
    keys = list(current) + [k for k in saved if k not in current]  # in the order the run names them
    for key in (k for k in keys if k != "settings"):
        a, b = saved.get(key), current.get(key)
        if a != b:
            differ.append(key if key in hashed else f"{key} ({a!r} then, {b!r} now)")
    a, b = saved.get("settings", {}), current.get("settings", {})
    differ += [f"{k} ({a.get(k)!r} then, {b.get(k)!r} now)" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    if differ:
        raise ResumeError(
            f"{what} {where} is of another run: {', '.join(differ)} differ; "
            "drop --resume to start over, or use another --out"
        )


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    write_atomically(path, lambda tmp: save_file(state, str(tmp)))


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise ResumeError(
            f"the staging folder {path.parent} lacks {path.name}: it was damaged; drop --resume to start over"
        )
    return {k: fresh(v) for k, v in load_file(str(path)).items()}


def _read_tree(path: Path) -> dict[str, Any]:
    try:
        return load_tree(path)
    except TreeFileError as exc:  # a foreign or damaged file: say which
        raise ResumeError(f"{exc}; drop --resume to start over") from exc


def _layer_file(index: int) -> str:
    return f"layer-{index:05d}.safetensors"


class StagedLayers(Sequence):
    """The finished layers' tensors, each read from its file when asked for (a streamed restart
    writes them to the output one at a time: never all in memory)."""

    def __init__(self, folder: Path, count: int) -> None:
        self.folder, self.count = folder, count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:  # type: ignore[override]
        if not 0 <= index < self.count:
            raise IndexError(index)
        return _load_tensors(self.folder / _layer_file(index))


class SliceStaging:
    """The staging folder ``folder`` as a :class:`~slicegpt.core.streams.Checkpoint`.

    ``resume``: continue the run staged there (refused with :class:`ResumeError` when it is of
    another run; started afresh, saying so, when there is nothing to continue). Without it an
    existing staging folder is announced and replaced. :meth:`finish` removes the folder once
    the output is saved. ``say`` prints the one-line notes (stderr by default). ``every``: the
    loop state (with the next layer's activations) is staged after every ``every`` layers (each
    finished layer's tensors always): fewer writes, at most ``every - 1`` layers redone.
    """

    def __init__(
        self, folder: str | os.PathLike, *, resume: bool = False, say: Callable[[str], None] = _stderr, every: int = 1
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"--checkpoint-every must be a whole number of layers >= 1, not {every!r}")
        self.folder, self.resume, self.say, self.every = Path(folder), resume, say, every
        self._embeddings_written = False

    # -- the Checkpoint protocol ------------------------------------------------------------

    def begin(self, identity: dict[str, Any]) -> Restart | None:
        identity = json.loads(json.dumps(identity, default=str))  # as it reads back from disk
        if not self.resume:
            if self.folder.exists():
                self.say(
                    f"note: {self.folder} holds the staging of an earlier run; replacing it (pass --resume to "
                    "continue it instead)"
                )
            self._fresh(identity)
            return None
        saved = self._read_fingerprint()
        if saved is None:
            self.say(f"note: nothing to resume in {self.folder}; starting from the beginning")
            self._fresh(identity)
            return None
        then, now = saved.pop(NUMERICS, None), identity.pop(NUMERICS, None)
        check_fingerprint(saved, identity, self.folder)
        if then != now:
            changed = ", ".join(
                f"{k} {(then or {}).get(k)!r} then, {(now or {}).get(k)!r} now"
                for k in sorted(set(then or {}) | set(now or {}))
                if (then or {}).get(k) != (now or {}).get(k)
            )
            self.say(
                f"note: resuming on other numerics ({changed}): the result is as good, but not bit for bit "
                "that of an uninterrupted run"
            )
        pooled = _read_tree(self.folder / POOLED) if (self.folder / POOLED).is_file() else None
        state = _read_tree(self.folder / STATE) if (self.folder / STATE).is_file() else None
        if pooled is None and state is None:
            self.say(
                f"note: nothing to resume in {self.folder} (the earlier run stopped before its first checkpoint); "
                "starting from the beginning"
            )
            return None
        restart = Restart(pooled=None if pooled is None else (pooled["evals"], pooled["q"]))
        if state is None:
            self.say(f"slicegpt: resuming after uniform mode's pooling walk, from {self.folder}")
            return restart
        k = int(state["next_layer"])
        restart.state = LoopState(
            k,
            state["q_prev"],
            state["spectra"],
            state["refits"],
            [LayerWidths(**w) for w in state["built"]],
            state["hidden"],
            state["reference"],
        )
        restart.layers = StagedLayers(self.folder, k)
        restart.embeddings = _load_tensors(self.folder / EMBEDDINGS)
        self._embeddings_written = True
        self.say(f"slicegpt: resuming at layer {k} ({k} finished), from {self.folder}")
        return restart

    def pooled(self, evals: torch.Tensor, q: torch.Tensor) -> None:
        data = {"evals": evals.detach().cpu(), "q": q.detach().cpu()}
        save_tree(self.folder / POOLED, data)

    def after_layer(self, state: LoopState) -> None:
        if not self._embeddings_written:
            _save_tensors(self.folder / EMBEDDINGS, state.embeddings)
            self._embeddings_written = True
        _save_tensors(self.folder / _layer_file(state.next_layer - 1), state.layer)
        if state.next_layer % self.every:
            # The activations (the costly part: rows x seqlen x width per list) are staged every
            # ``every`` layers only; a restart goes on after the last layer they were staged at,
            # redoing the few since (layer files past it are overwritten as they come again).
            return
        cpu = lambda ts: None if ts is None else [t.detach().cpu() for t in ts]  # noqa: E731
        data = {
            "next_layer": state.next_layer,
            "q_prev": None if state.q_prev is None else state.q_prev.detach().cpu(),
            "spectra": state.spectra,
            "refits": state.refits,
            "built": [asdict(w) for w in state.built],
            "hidden": cpu(state.hidden),
            "reference": cpu(state.reference),
        }
        save_tree(self.folder / STATE, data)  # the commit point

    # -- around the run ---------------------------------------------------------------------

    def finish(self) -> None:
        """The output is saved: nothing is left to resume."""
        shutil.rmtree(self.folder, ignore_errors=True)

    def _fresh(self, identity: dict[str, Any]) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)
        self._embeddings_written = False
        text = json.dumps(identity, indent=2) + "\n"
        write_atomically(self.folder / FINGERPRINT, lambda tmp: tmp.write_text(text))

    def _read_fingerprint(self) -> dict[str, Any] | None:
        path = self.folder / FINGERPRINT
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ResumeError(f"cannot read {path}: {exc}; drop --resume to start over") from exc
