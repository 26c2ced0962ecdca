"""Recovery training on tiny models of two families: each loss x trained-weights combination
lowers its loss, LoRA merges exactly, results reload bitwise in a fresh process, a resumed run
equals an uninterrupted one, and bad settings fail in one line."""

from __future__ import annotations

import json
from dataclasses import replace
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import slicegpt
from slicegpt.cli import main
from slicegpt.data import Rows, load_text, shared_documents
from slicegpt.sources import training_rows
from slicegpt.training.recover import TrainingError, batch_loss, check_teacher, head_at, kd_loss, lm_loss, predicting

from conftest import VOCAB, calib_rows, have, make_tiny, tiny_tokenizer

needs_peft = pytest.mark.skipif(not have("peft"), reason="LoRA needs peft")
FAMILIES = ["llama", "opt"]


def _sharp(model: torch.nn.Module) -> torch.nn.Module:
    """A random tiny model predicts nearly uniformly, so a student is trivially close to it:
    scale the head (tied or not) so that the distributions are peaked and distilling them is a task."""
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    return model


def _pair(family: str, uniform: bool = False) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(dense teacher, student sliced 25% from a copy of it), float32."""
    teacher, student = (_sharp(make_tiny(family, dtype=torch.float32)) for _ in range(2))
    cfg = slicegpt.SliceConfig(sparsity=0.25, batch_size=4, uniform=uniform)
    slicegpt.slice_model(student, None, calib_rows(16, 32), cfg, progress=False)
    return teacher, student


def _rows(n: int = 6, seqlen: int = 32) -> tuple[Rows, Rows]:
    ids = calib_rows(n + 2, seqlen, seed=7)
    return Rows(ids[2:]), Rows(ids[:2])


def _objective(student, teacher, ids: torch.Tensor, kind: str) -> float:
    with torch.no_grad():
        logits = student(input_ids=ids, use_cache=False).logits
        return float(
            kd_loss(logits, teacher(input_ids=ids, use_cache=False).logits) if kind == "kd" else lm_loss(logits, ids)
        )


def _config(**kw) -> slicegpt.RecoverConfig:
    base = dict(
        max_steps=8, lr=5e-3, warmup=0, seqlen=32, batch_size=2, eval_every=4, val_rows=2, checkpoint_every=0, seed=3
    )
    return slicegpt.RecoverConfig(**{**base, **kw})


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("loss", ["kd", "lm"])
@pytest.mark.parametrize("train", ["all", pytest.param("lora", marks=needs_peft)])
def test_a_few_steps_lower_the_training_loss(family: str, loss: str, train: str) -> None:
    teacher, student = _pair(family)
    rows = _rows()
    before = _objective(student, teacher, rows[0].input_ids, loss)
    extra = dict(lr=5e-3, lora_dropout=0.0, lora_rank=4) if train == "lora" else dict(lr=1e-3)
    model, report = slicegpt.recover(
        student,
        None,
        _config(loss=loss, train=train, **extra),
        teacher=teacher if loss == "kd" else None,
        teacher_name="dense",
        rows=rows,
        progress=False,
    )
    after = _objective(model, teacher, rows[0].input_ids, loss)
    assert after < 0.95 * before, (before, after)
    assert report.loss == loss and report.train == train and report.steps == 8
    assert report.tokens == 8 * 2 * 32
    assert [p["step"] for p in report.curve] == [0, 4, 8]
    assert not any(p.requires_grad for p in model.parameters())
    # LoRA trains the adapters and the shortcut matrices only; "all" trains every weight.
    total = sum(p.numel() for p in student.parameters())
    assert (report.trainable_parameters < total / 2) if train == "lora" else (report.trainable_parameters == total)


@needs_peft
@pytest.mark.parametrize("family", FAMILIES)
def test_merged_lora_equals_the_unmerged_peft_model(family: str) -> None:
    from slicegpt.arch import spec_for_config
    from slicegpt.training import lora

    _, student = _pair(family)
    wrapped = lora.wrap(student, spec_for_config(student.config), _config(train="lora", lora_rank=4))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: make the adapters do something
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    wrapped.eval()
    x = calib_rows(2, 16, seed=9)
    with torch.no_grad():
        unmerged = wrapped(input_ids=x, use_cache=False).logits
        base = student(input_ids=x, use_cache=False).logits  # peft injects into the student itself
        model = lora.merge(wrapped)
        merged = model(input_ids=x, use_cache=False).logits
    assert torch.allclose(base, unmerged)
    assert torch.allclose(merged, unmerged, atol=1e-5, rtol=1e-5)
    assert not any("lora" in n for n, _ in model.named_parameters()) and model is student


_CHILD = textwrap.dedent(
    """
    import json, sys, torch, slicegpt
    model = slicegpt.load(sys.argv[1])
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor(json.loads(sys.argv[2])), use_cache=False).logits
    torch.save({"logits": logits, "meta": model.slicegpt_metadata}, sys.argv[3])
    """
)


@pytest.mark.parametrize(
    "family,uniform,train",
    [
        ("llama", False, "all"),
        ("llama", True, "all"),
        pytest.param("opt", False, "lora", marks=needs_peft),
        pytest.param("llama", True, "lora", marks=needs_peft),
    ],
)
def test_the_saved_result_reloads_bitwise_in_a_fresh_process(
    family: str, uniform: bool, train: str, tmp_path: Path
) -> None:
    teacher, student = _pair(family, uniform)
    # As `slicegpt recover` does: the student comes from its folder (a uniform one is a standard checkpoint).
    student = slicegpt.load(slicegpt.save(student, tmp_path / "sliced"))
    model, report = slicegpt.recover(
        student,
        None,
        _config(train=train, max_steps=3),
        teacher=teacher,
        teacher_name="dense",
        rows=_rows(),
        progress=False,
    )
    out = slicegpt.save(model, tmp_path / "rec")
    x = [[5, 17, 42, 99, 3, 250, 11, 8]]
    with torch.inference_mode():
        ours = model(input_ids=torch.tensor(x), use_cache=False).logits
    subprocess.run([sys.executable, "-c", _CHILD, str(out), json.dumps(x), str(tmp_path / "r.pt")], check=True)
    theirs = torch.load(tmp_path / "r.pt", weights_only=False)
    assert torch.equal(ours, theirs["logits"])
    rec = theirs["meta"]["recovery"]
    assert rec["steps"] == 3 and rec["tokens"] == report.tokens and rec["loss"] == "kd" and rec["train"] == train
    assert rec["curve"] == report.curve and rec["settings"]["lr"] == 5e-3
    if uniform:  # still a standard checkpoint, with tying kept
        from transformers import AutoModelForCausalLM

        plain = AutoModelForCausalLM.from_pretrained(out)
        assert plain.get_output_embeddings().weight is plain.get_input_embeddings().weight
        with torch.inference_mode():
            assert torch.equal(plain(input_ids=torch.tensor(x)).logits, ours)


@pytest.mark.parametrize("train", ["all", pytest.param("lora", marks=needs_peft)])
def test_resume_after_a_stop_equals_an_uninterrupted_run(train: str, tmp_path: Path) -> None:
    cfg = _config(train=train, max_steps=6, checkpoint_every=2, eval_every=3, early_stop_patience=5)
    teacher, student = _pair("llama")
    whole, whole_report = slicegpt.recover(
        student, None, cfg, teacher=teacher, teacher_name="t", rows=_rows(), progress=False
    )

    state = tmp_path / "state"
    teacher, student = _pair("llama")
    slicegpt.recover(
        student,
        None,
        cfg,
        teacher=teacher,
        teacher_name="t",
        rows=_rows(),
        state_dir=state,
        stop_after=4,
        progress=False,
    )
    teacher, student = _pair("llama")  # a new process would start from the input folder again
    resumed, report = slicegpt.recover(
        student,
        None,
        cfg,
        teacher=teacher,
        teacher_name="t",
        rows=_rows(),
        state_dir=state,
        resume=True,
        progress=False,
    )
    assert report.resumed_at_step == 4 and report.steps == 6 and report.tokens == whole_report.tokens
    assert report.curve == whole_report.curve
    a, b = whole.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_another_run_and_starts_over_with_nothing(tmp_path: Path, capsys) -> None:
    from slicegpt.training.state import ResumeError

    state = tmp_path / "state"
    teacher, student = _pair("llama")
    slicegpt.recover(
        student,
        None,
        _config(checkpoint_every=2),
        teacher=teacher,
        teacher_name="t",
        rows=_rows(),
        state_dir=state,
        stop_after=2,
        progress=False,
    )
    teacher, student = _pair("llama")
    with pytest.raises(ResumeError, match=r"lr \(0.005 then, 0.001 now\)"):
        slicegpt.recover(
            student,
            None,
            _config(checkpoint_every=2, lr=1e-3),
            teacher=teacher,
            teacher_name="t",
            rows=_rows(),
            state_dir=state,
            resume=True,
            progress=False,
        )
    with pytest.raises(ResumeError, match="the training data"):
        slicegpt.recover(
            student,
            None,
            _config(checkpoint_every=2),
            teacher=teacher,
            teacher_name="t",
            rows=_rows(n=4),
            state_dir=state,
            resume=True,
            progress=False,
        )
    _, report = slicegpt.recover(
        student,
        None,
        _config(max_steps=1),
        teacher=teacher,
        teacher_name="t",
        rows=_rows(),
        state_dir=tmp_path / "empty",
        resume=True,
        progress=True,
    )
    assert report.resumed_at_step is None and report.steps == 1
    captured = capsys.readouterr()
    assert "nothing to resume" in captured.out + captured.err


def test_a_nan_loss_stops_naming_the_step() -> None:
    teacher, student = _pair("llama")
    with torch.no_grad():
        student.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(TrainingError, match="at step 1; last good checkpoint: none"):
        slicegpt.recover(student, None, _config(), teacher=teacher, teacher_name="t", rows=_rows(), progress=False)


def test_a_run_that_ends_worse_than_its_start_says_so(caplog: pytest.LogCaptureFixture) -> None:
    """Too high a learning rate (SmolLM2's 2e-4 took Qwen2.5-0.5B's validation perplexity from 56 to
    105 in 10 steps): the run says its result validates worse than the model given; with a time
    budget or early stopping the best validated state, the start included, is what comes back."""
    cfg = _config(lr=3.0, max_steps=4, eval_every=2)
    teacher, student = _pair("llama")
    with caplog.at_level("WARNING", logger="slicegpt"):
        _, report = slicegpt.recover(
            student, None, cfg, teacher=teacher, teacher_name="t", rows=_rows(), progress=False
        )
    assert report.worse_than_start and report.kept_val_ppl == report.curve[-1]["val_ppl"] > report.curve[0]["val_ppl"]
    assert report.summary()["worse_than_start"] is True
    assert "validate worse than the model given" in caplog.text and "lower --lr (this run: 3.0)" in caplog.text
    caplog.clear()
    teacher, student = _pair("llama")
    start = {n: p.clone() for n, p in student.state_dict().items()}
    with caplog.at_level("WARNING", logger="slicegpt"):
        kept, report = slicegpt.recover(
            student,
            None,
            replace(cfg, early_stop_patience=5),
            teacher=teacher,
            teacher_name="t",
            rows=_rows(),
            progress=False,
        )
    assert report.best_step == 0 and not report.worse_than_start and "worse" not in caplog.text
    assert all(torch.equal(p, start[n]) for n, p in kept.state_dict().items())  # the start, returned as it was
    # a run that improves says nothing
    teacher, student = _pair("llama")
    _, report = slicegpt.recover(
        student, None, _config(), teacher=teacher, teacher_name="t", rows=_rows(), progress=False
    )
    assert not report.worse_than_start and report.kept_val_ppl < report.curve[0]["val_ppl"]


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="rank must be at least 1"):
        slicegpt.RecoverConfig(lora_rank=0)
    with pytest.raises(ValueError, match="unknown LoRA target group attn_qkv"):
        slicegpt.RecoverConfig(lora_targets="attn_qkv,mlp_in")
    with pytest.raises(ValueError, match="'kd' needs a teacher"):
        slicegpt.recover(_pair("llama")[1], None, _config(loss="kd"), rows=_rows(), progress=False)
    teacher = make_tiny("llama", dtype=torch.float32)
    teacher.resize_token_embeddings(VOCAB + 8)
    with pytest.raises(ValueError, match="must share a tokenizer"):
        check_teacher(_pair("llama")[1], None, teacher, None)


def test_training_rows_hold_out_validation_and_refuse_short_text() -> None:
    from slicegpt.data import cut_rows, tokenize

    from conftest import SAMPLE_TEXT

    tok = tiny_tokenizer()
    train, val = training_rows(None, tok, slicegpt.Text(SAMPLE_TEXT), seqlen=32, val_rows=3, seed=0)
    every = cut_rows(tokenize(tok, SAMPLE_TEXT + "\n"), 32)
    assert len(val) == 3 and len(train) + len(val) == len(every) and train.input_ids.shape[1] == 32
    # Each row of the text is in exactly one of the two parts.
    both = torch.cat([val.input_ids, train.input_ids])
    assert sorted(map(tuple, both.tolist())) == sorted(map(tuple, every.tolist()))
    with pytest.raises(slicegpt.DataError, match="at least 4 are needed"):
        training_rows(None, tok, slicegpt.Text("too short"), seqlen=32, val_rows=3, seed=0)
    assert shared_documents("a" * 100 + "\n\n" + "shared " * 20, "shared " * 20 + "\n\n" + "other " * 20) == 1


def test_hf_sources_read_saved_datasets_and_instruction_records(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"instruction": ["Name a colour."], "input": [""], "output": ["Blue."]})
    ds.save_to_disk(str(tmp_path / "alpaca"))
    text = load_text(f"hf:{tmp_path / 'alpaca'}", "calibration")
    assert text == "### Instruction:\nName a colour.\n\n### Response:\nBlue.\n"
    with pytest.raises(slicegpt.DataError, match="cannot load data set"):
        load_text(f"hf:{tmp_path / 'missing'}:train", "calibration")


def test_cli_recover_end_to_end_and_its_errors(tiny_model_dir: Path, tmp_path: Path, capsys) -> None:
    model, corpus = str(tiny_model_dir / "model"), str(tiny_model_dir / "corpus.txt")
    sliced = tmp_path / "sliced"
    assert (
        main(
            [
                "slice",
                model,
                "--sparsity",
                "0.25",
                "--calib",
                corpus,
                "--nsamples",
                "4",
                "--seqlen",
                "32",
                "--out",
                str(sliced),
            ]
        )
        == 0
    )
    common = [
        "--data",
        corpus,
        "--max-steps",
        "2",
        "--seqlen",
        "32",
        "--batch-size",
        "2",
        "--val-rows",
        "2",
        "--eval-every",
        "1",
    ]
    out = tmp_path / "rec"
    assert (
        main(
            ["recover", str(sliced), "--teacher", model, "--out", str(out), "--json", str(tmp_path / "r.json"), *common]
        )
        == 0
    )
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["loss"] == "kd" and result["steps"] == 2 and len(result["curve"]) == 3
    assert slicegpt.read_metadata(out)["recovery"]["teacher"] == model
    assert not (tmp_path / ".rec.recover-state").exists()  # finished: nothing left to resume
    capsys.readouterr()
    # a budget spent by the first step (and the first validation): one step, said so, the recipe records it
    budget = tmp_path / "rec-budget"
    assert (
        main(["recover", str(sliced), "--teacher", model, "--out", str(budget), *common, "--time-budget", "0.000001s"])
        == 0
    )
    assert "the time budget ran out at step 1" in capsys.readouterr().out
    assert slicegpt.read_metadata(budget)["recovery"]["steps"] == 1
    assert "time_budget: 1.0e-06" in (budget / "recipe.yaml").read_text()

    def error(*argv: str) -> str:
        assert main(["recover", *argv]) == 2
        return capsys.readouterr().err.strip()

    assert "exists; pass --overwrite" in error(str(sliced), "--out", str(out), *common)
    assert "would replace the input" in error(str(sliced), "--out", str(sliced), "--overwrite", *common)
    assert "recover takes a folder written by `slicegpt slice`" in error(model, "--out", str(tmp_path / "x"), *common)
    assert "also in the training text" in error(
        str(sliced), "--out", str(tmp_path / "x"), "--eval-data", corpus, *common
    )
    assert "--keep-adapter needs --train lora" in error(
        str(sliced), "--out", str(tmp_path / "x"), "--keep-adapter", *common
    )
    assert "rank must be at least 1" in error(
        str(sliced), "--out", str(tmp_path / "x"), "--train", "lora", "--lora-rank", "0", *common
    )
    for line in (error(str(sliced), "--out", str(tmp_path / "x"), "--data", str(tmp_path / "nope.txt")),):
        assert line.startswith("slicegpt: error:") and "\n" not in line


def test_a_killed_recover_resumes_to_the_same_files(tiny_model_dir: Path, tmp_path: Path) -> None:
    """SIGKILL a real `slicegpt recover` at a random moment after its first checkpoint; the same
    command with --resume writes the weights an uninterrupted run writes, bit for bit."""
    import hashlib
    import os
    import random
    import signal
    import time

    model, corpus = str(tiny_model_dir / "model"), str(tiny_model_dir / "corpus.txt")
    sliced = tmp_path / "sliced"
    assert (
        main(
            [
                "slice",
                model,
                "--sparsity",
                "0.25",
                "--calib",
                corpus,
                "--nsamples",
                "4",
                "--seqlen",
                "32",
                "--out",
                str(sliced),
            ]
        )
        == 0
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def command(out: Path) -> list[str]:
        return [
            sys.executable,
            "-m",
            "slicegpt",
            "recover",
            str(sliced),
            "--teacher",
            model,
            "--data",
            corpus,
            "--out",
            str(out),
            "--max-steps",
            "60",
            "--seqlen",
            "32",
            "--batch-size",
            "2",
            "--val-rows",
            "2",
            "--eval-every",
            "20",
            "--checkpoint-every",
            "3",
            "--train",
            "lora" if have("peft") else "all",
            "--lora-rank",
            "4",
        ]

    subprocess.run(command(tmp_path / "whole"), check=True, env=env, capture_output=True)
    out = tmp_path / "killed"
    proc = subprocess.Popen(command(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / ".killed.recover-state" / "state.safetensors"
    deadline = time.time() + 120
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(random.uniform(0.0, 0.5))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "the run finished before it could be killed: make it longer"
    done = subprocess.run(command(out) + ["--resume"], check=True, env=env, capture_output=True, text=True)
    assert "resuming at step" in done.stdout + done.stderr
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert digest(out / "model.safetensors") == digest(tmp_path / "whole" / "model.safetensors")
    a, b = (slicegpt.read_metadata(p)["recovery"] for p in (out, tmp_path / "whole"))
    assert a["curve"] == b["curve"] and a["tokens"] == b["tokens"] and a["resumed_at_step"] > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing_trains_the_same_weights(family: str) -> None:
    results = []
    for checkpointing in (False, True):
        teacher, student = _pair(family)
        model, _ = slicegpt.recover(
            student,
            None,
            _config(max_steps=3, lr=1e-3, gradient_checkpointing=checkpointing),
            teacher=teacher,
            teacher_name="t",
            rows=_rows(),
            progress=False,
        )
        results.append(model.state_dict())
        assert "forward" not in vars(
            slicegpt.core.surgery.get_layers(model, slicegpt.arch.spec_for_config(model.config))[0]
        )
    assert all(torch.allclose(results[0][k], results[1][k], atol=1e-6) for k in results[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_the_distillation_loss_and_its_gradient_are_autograds(dtype: torch.dtype, temperature: float) -> None:
    """kd_loss's one-pass KL and gradient against autograd through log_softmax and kl_div."""
    gen = torch.Generator().manual_seed(0)
    s0, t = ((torch.randn(3, 50, 700, generator=gen) * 4).to(dtype) for _ in range(2))
    mask = torch.rand(3, 50, generator=gen) < 0.6
    for m in (None, mask):
        got_s, want_s = (s0.clone().requires_grad_(True) for _ in range(2))
        got = kd_loss(got_s, t, temperature, m)
        ls = torch.log_softmax(want_s.float() / temperature, -1)
        per = torch.nn.functional.kl_div(
            ls, torch.log_softmax(t.float() / temperature, -1), log_target=True, reduction="none"
        ).sum(-1)
        counted = (
            torch.ones(3, 50, dtype=torch.bool)
            if m is None
            else torch.cat([m[:, 1:], torch.zeros(3, 1, dtype=torch.bool)], 1)
        )
        want = per[counted].mean() * temperature**2
        got.backward()
        want.backward()
        assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
        tol = 1e-6 if dtype == torch.float32 else 1e-2  # bfloat16: the gradient rounds to it either way
        assert (got_s.grad.float() - want_s.grad.float()).abs().max() <= tol * want_s.grad.float().abs().max()
    # nothing counted: no loss, a zero gradient
    s = s0.clone().float().requires_grad_(True)
    kd_loss(s, t, 1.0, torch.zeros(3, 50, dtype=torch.bool)).backward()
    assert float(s.grad.abs().max()) == 0.0


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["kd", "lm"])
def test_the_head_runs_at_the_counted_positions_alone(family: str, kind: str) -> None:
    """A batch's loss with a mask: both heads read the M counted positions only, and the loss and
    every gradient are those of whole logits masked afterwards."""
    teacher, student = _pair(family)
    student.requires_grad_(True)
    ids = calib_rows(3, 32, seed=5)
    counted = torch.rand(3, 32, generator=torch.Generator().manual_seed(1)) < 0.5
    rows_seen: list[int] = []
    hook = student.get_output_embeddings().register_forward_hook(
        lambda m, a, o: rows_seen.append(a[0].reshape(-1, a[0].shape[-1]).shape[0])
    )
    student.zero_grad()
    got = batch_loss(student, ids, counted, teacher if kind == "kd" else None)
    got.backward()
    hook.remove()
    assert rows_seen == [int(counted[:, 1:].sum())]  # not 3 x 32
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad()
    logits = student(input_ids=ids).logits
    with torch.no_grad():
        target = teacher(input_ids=ids).logits
    want = kd_loss(logits, target, 1.0, counted) if kind == "kd" else lm_loss(logits, ids, counted)
    want.backward()
    assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    for n, p in student.named_parameters():
        if p.grad is not None:
            assert torch.allclose(grads[n], p.grad, rtol=1e-4, atol=1e-6 * float(p.grad.abs().max())), n
    # a head that reads something else (no [B, T] input) is left alone, and the loss falls back
    at = predicting(counted)
    with head_at(student, at[:, :-1]):
        assert student(input_ids=ids).logits.shape[:2] == (3, 32)


@needs_peft
def test_keep_adapter_saves_the_adapter_alone(tiny_model_dir: Path, tmp_path: Path) -> None:
    model, corpus = str(tiny_model_dir / "model"), str(tiny_model_dir / "corpus.txt")
    sliced = tmp_path / "sliced"
    assert (
        main(
            [
                "slice",
                model,
                "--sparsity",
                "0.25",
                "--calib",
                corpus,
                "--nsamples",
                "4",
                "--seqlen",
                "32",
                "--uniform",
                "--out",
                str(sliced),
            ]
        )
        == 0
    )
    out = tmp_path / "rec"
    assert (
        main(
            [
                "recover",
                str(sliced),
                "--teacher",
                model,
                "--data",
                corpus,
                "--out",
                str(out),
                "--max-steps",
                "2",
                "--seqlen",
                "32",
                "--batch-size",
                "2",
                "--val-rows",
                "2",
                "--train",
                "lora",
                "--lora-rank",
                "4",
                "--lora-targets",
                "attn_in,mlp_out",
                "--keep-adapter",
            ]
        )
        == 0
    )
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and any(t.endswith("mlp.down_proj") for t in adapter["target_modules"])
    assert not any(t.endswith("o_proj") for t in adapter["target_modules"])
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    slicegpt.load(out)  # the folder itself still loads (and checks) as before


class _Clock:
    """A stand-in for ``time`` in the training loop: every reading is one second after the last,
    so a step and a validation each take exactly one second (``slow`` seconds for the first
    ``slow_readings`` readings: a slow start)."""

    def __init__(self, slow: float = 1.0, slow_readings: int = 0) -> None:
        self.now, self.slow, self.left = 0.0, slow, slow_readings

    def perf_counter(self) -> float:
        self.now += self.slow if self.left > 0 else 1.0
        self.left -= 1
        return self.now


def test_steps_within_a_time_budget() -> None:
    from slicegpt.training.recover import steps_within

    # 90 s left, a step 2 s, a validation 10 s at every 5th step and at the last: 20 more steps and
    # 4 validations (80 s) fit; 21 (92 s) do not
    assert steps_within(100.0, 10.0, 5, 2.0, 10.0, 5, 1000) == 25
    assert steps_within(100.0, 10.0, 5, 2.0, 10.0, 5, 24) == 24
    assert steps_within(100.0, 10.0, 5, 2.0, 10.0, 5, 20) == 20  # at most the cap
    assert steps_within(100.0, 120.0, 5, 2.0, 10.0, 5, 1000) == 5  # spent: no more steps


def test_a_time_budget_plans_the_schedule_and_stops_when_spent(monkeypatch) -> None:
    import slicegpt.training.recover as rec

    # Planned after 5 timed steps: 7 s are gone (5 steps, the validations at 0 and 4); each further
    # step costs 1 s and a quarter of a validation, so 10 more fit in the 13 s left: 15 steps, the
    # last validated, 20 s in all.
    monkeypatch.setattr(rec, "time", _Clock())
    asked, schedule = [], rec.schedule
    monkeypatch.setattr(rec, "schedule", lambda s, w, t: asked.append((s, t)) or schedule(s, w, t))
    teacher, student = _pair("llama")
    cfg = _config(max_steps=100, eval_every=4, time_budget=20.0)
    _, report = slicegpt.recover(student, None, cfg, teacher=teacher, teacher_name="t", rows=_rows(), progress=False)
    assert report.planned_steps == 15 and report.steps == 15 and not report.stopped_on_time
    assert [p["step"] for p in report.curve] == [0, 4, 8, 12, 15]
    assert report.seconds + len(report.curve) == 20.0
    # the learning rate of steps 1-5 from the 100 steps asked, of every later one from the 15 planned
    assert asked == [(s, 100) for s in range(5)] + [(s, 15) for s in range(5, 16)]

    # Spent before a plan is made: stops after the step that spends it, validated there, the best state kept.
    monkeypatch.setattr(rec, "time", _Clock())
    teacher, student = _pair("llama")
    cfg = _config(max_steps=100, eval_every=4, time_budget=3.0)
    trained, report = slicegpt.recover(
        student, None, cfg, teacher=teacher, teacher_name="t", rows=_rows(), progress=False
    )
    assert report.stopped_on_time and report.steps == 2 and report.planned_steps is None
    assert [p["step"] for p in report.curve] == [0, 2]
    assert report.best_step == min(report.curve, key=lambda p: p["val_ppl"])["step"]


def test_a_slow_start_is_planned_again_at_each_validation(monkeypatch) -> None:
    import slicegpt.training.recover as rec

    # Steps of 3 s until step 6, then 1 s: the first plan (from 3 s steps) is too short, and the
    # plans at the validations after it lengthen the run toward the budget.
    monkeypatch.setattr(rec, "time", _Clock(slow=3.0, slow_readings=16))
    asked, schedule = [], rec.schedule
    monkeypatch.setattr(rec, "schedule", lambda s, w, t: asked.append(t) or schedule(s, w, t))
    teacher, student = _pair("llama")
    cfg = _config(max_steps=100, eval_every=4, time_budget=40.0)
    _, report = slicegpt.recover(student, None, cfg, teacher=teacher, teacher_name="t", rows=_rows(), progress=False)
    plans = list(dict.fromkeys(asked))[1:]  # the totals planned, in order (the first is the 100 asked)
    assert len(plans) >= 2 and plans[-1] > plans[0] and report.planned_steps == plans[-1] == report.steps


def test_time_budget_settings() -> None:
    from argparse import ArgumentTypeError

    from slicegpt.cli.common import parse_duration

    assert [parse_duration(t) for t in ("2h", "90m", "45s", "3600", "1.5h")] == [7200, 5400, 45, 3600, 5400]
    for bad in ("0", "-5m", "soon", "nan", ""):
        with pytest.raises(ArgumentTypeError, match="expected a positive duration"):
            parse_duration(bad)
    with pytest.raises(ValueError, match="time_budget must be a positive number of seconds"):
        slicegpt.RecoverConfig(time_budget=0.0)


def test_a_resumed_time_budget_run_keeps_its_plan(monkeypatch, tmp_path: Path) -> None:
    import slicegpt.training.recover as rec

    cfg = _config(max_steps=100, eval_every=4, time_budget=20.0, checkpoint_every=2)
    monkeypatch.setattr(rec, "time", _Clock())
    teacher, student = _pair("llama")
    whole, whole_report = slicegpt.recover(
        student, None, cfg, teacher=teacher, teacher_name="t", rows=_rows(), progress=False
    )
    monkeypatch.setattr(rec, "time", _Clock())
    teacher, student = _pair("llama")
    kw = dict(teacher=teacher, teacher_name="t", rows=_rows(), state_dir=tmp_path / "state", progress=False)
    slicegpt.recover(student, None, cfg, stop_after=8, **kw)
    monkeypatch.setattr(rec, "time", _Clock())  # a new process: its clock, its steps untimed
    teacher, student = _pair("llama")
    kw.update(teacher=teacher)
    resumed, report = slicegpt.recover(student, None, cfg, resume=True, **kw)
    assert report.resumed_at_step == 8 and report.planned_steps == whole_report.planned_steps == 15
    assert report.curve == whole_report.curve and report.steps == 15
    a, b = whole.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
