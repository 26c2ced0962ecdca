"""Streaming: a model sliced layer by layer from its safetensors files writes the same files,
byte for byte, as the same slice in memory; sharded output loads as before."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import slicegpt
from slicegpt.cli import main
from slicegpt.io.shards import INDEX, ShardReader, ShardWriter, parse_size, read_state
from slicegpt.io.streaming import StreamingError, open_streamed

from conftest import SAMPLE_TEXT, TINY_CONFIGS, VOCAB, make_tiny, tiny_tokenizer

# Families whose checkpoints name the layers' tensors as their models do (GPT-NeoX's head is
# saved as embed_out: transformers reads the tensors outside the layers). transformers 5 fuses
# the MoE families' experts while loading: they are sliced in memory (see the fallback test).
CONVERTED = ("mixtral", "qwen2_moe", "qwen3_moe")
STREAMABLE = [f for f in TINY_CONFIGS if f not in CONVERTED]


def _save_model(root: Path, family: str, dtype: torch.dtype = torch.float32) -> Path:
    folder = root / family
    make_tiny(family, dtype=dtype).save_pretrained(folder)
    tiny_tokenizer(VOCAB - 16).save_pretrained(folder)  # (below every family's table size)
    return folder


def _weights(folder: Path) -> dict[str, bytes]:
    """Every weights file (and the index) by name, as bytes."""
    return {
        p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name.endswith((".safetensors", ".index.json"))
    }


def _slice(capsys, model: Path, out: Path, corpus: Path, *extra: str) -> str:
    code = main(
        [
            "slice",
            str(model),
            "--calib",
            str(corpus),
            "--nsamples",
            "4",
            "--seqlen",
            "32",
            "--batch-size",
            "2",
            "--out",
            str(out),
            *extra,
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.err


@pytest.mark.parametrize("family", STREAMABLE)
def test_streamed_slice_writes_the_same_files_as_in_memory(family: str, tmp_path: Path, capsys) -> None:
    model = _save_model(tmp_path, family)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SAMPLE_TEXT)
    _slice(capsys, model, tmp_path / "mem", corpus, "--sparsity", "0.25", "--stream", "off")
    _slice(capsys, model, tmp_path / "str", corpus, "--sparsity", "0.25", "--stream", "on")
    assert _weights(tmp_path / "str") == _weights(tmp_path / "mem")
    assert not list(tmp_path.glob(".str.*"))  # no staging left beside the output


@pytest.mark.parametrize(
    "mode",
    [
        ["--uniform", "--target-params", "0.8"],
        ["--per-layer", "--target-params", "0.8"],
        ["--uniform", "--sparsity", "0.25"],
    ],
)
def test_streamed_budget_and_uniform_slices_match_in_memory_and_load(mode: list[str], tmp_path: Path, capsys) -> None:
    model = _save_model(tmp_path, "llama")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SAMPLE_TEXT)
    # A small shard limit: the output is sharded, with an index, in both modes alike.
    _slice(capsys, model, tmp_path / "mem", corpus, *mode, "--stream", "off", "--max-shard-size", "40KB")
    _slice(capsys, model, tmp_path / "str", corpus, *mode, "--stream", "on", "--max-shard-size", "40KB")
    files = _weights(tmp_path / "str")
    assert files == _weights(tmp_path / "mem")
    assert INDEX in files and len(files) > 2
    ids = torch.randint(0, 200, (1, 16), generator=torch.Generator().manual_seed(0))
    logits = [slicegpt.load(tmp_path / name)(input_ids=ids).logits for name in ("mem", "str")]
    assert torch.equal(logits[0], logits[1])
    if "--uniform" in mode:  # a standard checkpoint: plain transformers reads the shards
        from transformers import AutoModelForCausalLM

        plain = AutoModelForCausalLM.from_pretrained(tmp_path / "str")
        assert torch.allclose(plain(input_ids=ids).logits, logits[0], atol=1e-4)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_converted_checkpoints_fall_back_to_memory(family: str, tmp_path: Path, capsys) -> None:
    model = _save_model(tmp_path, family)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SAMPLE_TEXT)
    _slice(capsys, model, tmp_path / "auto", corpus, "--sparsity", "0.25")
    assert (tmp_path / "auto" / "model.safetensors").is_file()
    with pytest.raises(StreamingError, match="--stream off"):
        open_streamed(str(model), require=True)


def test_stream_on_refuses_settings_that_need_the_whole_model(tmp_path: Path, capsys) -> None:
    model = _save_model(tmp_path, "llama")
    capsys.readouterr()  # (save_pretrained's progress bar)
    code = main(
        ["slice", str(model), "--sparsity", "0.25", "--stream", "on", "--ppl", "wiki", "--out", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err
    assert code != 0 and "--stream on cannot be combined with --ppl" in err and len(err.strip().splitlines()) == 1
    code = main(["slice", str(model), "--sparsity", "0.25", "--max-shard-size", "lots", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code != 0 and "--max-shard-size 'lots'" in err
    assert not (tmp_path / "o").exists()


def test_streaming_reads_one_layer_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The skeleton holds no layer weights; each layer is read once (twice for layer 0 with the
    check) and emptied when written."""
    folder = _save_model(tmp_path, "llama")
    model, tokenizer, _, source = open_streamed(str(folder))
    assert all(p.is_meta for n, p in model.named_parameters() if ".layers." in n)
    assert not any(p.is_meta for n, p in model.named_parameters() if ".layers." not in n)
    reads: list[int] = []
    original = source.original

    def counting(model_, spec, index):
        reads.append(index)
        live = sum(not p.is_meta for n, p in model_.named_parameters() if ".layers." in n)
        assert live == 0  # every other layer is empty when one is read
        return original(model_, spec, index)

    monkeypatch.setattr(source, "original", counting)
    (tmp_path / "c.txt").write_text(SAMPLE_TEXT)
    slicegpt.io.streaming.slice_streamed(
        str(folder),
        tmp_path / "out",
        slicegpt.SliceConfig(sparsity=0.25, calib=str(tmp_path / "c.txt"), nsamples=4, seqlen=32, batch_size=2),
        opened=(model, tokenizer, "tiny", source),
        progress=False,
    )
    assert reads == [0, 0, 1, 2]
    assert all(p.is_meta for n, p in model.named_parameters() if ".layers." in n)


def test_damaged_or_foreign_shards_are_one_line_errors(tmp_path: Path) -> None:
    folder = _save_model(tmp_path, "llama")
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    weights.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ValueError, match="truncated"):
        ShardReader(folder)
    weights.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="not a safetensors file"):
        ShardReader(folder)
    weights.unlink()
    (folder / INDEX).write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(ValueError, match="is missing"):
        ShardReader(folder)


def test_shard_writer_round_trip_and_sizes(tmp_path: Path) -> None:
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size("500KB") == 500_000
    g = torch.Generator().manual_seed(0)
    groups = [
        {
            f"l{i}.{k}": torch.randn(16, 16, generator=g).to(dt)
            for k, dt in (("w", torch.float32), ("h", torch.bfloat16))
        }
        for i in range(5)
    ]
    writer = ShardWriter(tmp_path / "w", 2000)  # each group is 1536 bytes: one shard per group
    for group in groups:
        writer.add(group)
    names = writer.finish()
    assert names[-1] == INDEX and len(names) == 6
    state = read_state(tmp_path / "w")
    want = {k: v for g_ in groups for k, v in g_.items()}
    assert state.keys() == want.keys() and all(torch.equal(state[k], want[k]) for k in want)
    from safetensors.torch import load_file  # the reference reader agrees

    ref = load_file(str(tmp_path / "w" / names[0]))
    assert all(torch.equal(ref[k], want[k]) for k in ref)
    assert not list((tmp_path / "w").glob(".shard-*"))


def test_stream_modes() -> None:
    from slicegpt.io.streaming import want_stream

    assert want_stream("auto", {}) and want_stream("on", {"--ppl": False}) and not want_stream("off", {})
    assert not want_stream("auto", {"--ppl": True})  # in memory, where the dense model is measured
    with pytest.raises(ValueError, match="--stream on cannot be combined with --search"):
        want_stream("on", {"--search": True})


def test_a_streamed_slice_checks_free_space_before_any_work(
    tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    import slicegpt.io.folders as folders

    model = _save_model(tmp_path, "llama")
    (tmp_path / "c.txt").write_text(SAMPLE_TEXT)
    capsys.readouterr()
    monkeypatch.setattr(folders.shutil, "disk_usage", lambda _p: type("U", (), {"free": 1000})())
    code = main(
        [
            "slice",
            str(model),
            "--sparsity",
            "0.25",
            "--stream",
            "on",
            "--calib",
            str(tmp_path / "c.txt"),
            "--out",
            str(tmp_path / "full"),
        ]
    )
    err = capsys.readouterr().err
    assert code != 0 and "are free on the disk" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "full").exists() and not list(tmp_path.glob(".full.*"))


@pytest.mark.parametrize("stream", ["on", "off"])
def test_activations_offloaded_to_disk_give_the_same_files(stream: str, tmp_path: Path, capsys) -> None:
    """Corrections and MLP neurons on: every activation list (the stream, the dense reference, the
    dense layer's outputs) goes through the disk store."""
    model = _save_model(tmp_path, "llama")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SAMPLE_TEXT)
    _slice(capsys, model, tmp_path / "mem", corpus, "--per-layer", "--target-params", "0.8", "--stream", stream)
    _slice(
        capsys,
        model,
        tmp_path / "disk",
        corpus,
        "--per-layer",
        "--target-params",
        "0.8",
        "--stream",
        stream,
        "--offload-activations",
        str(tmp_path / "acts"),
    )
    assert _weights(tmp_path / "disk") == _weights(tmp_path / "mem")
    assert list((tmp_path / "acts").iterdir()) == []  # every list's files removed with it


def test_disk_tensors_behave_as_a_list(tmp_path: Path) -> None:
    from slicegpt.io.offload import DiskTensors

    items = DiskTensors(tmp_path)
    a, b = torch.randn(2, 3, 4), torch.randn(2, 3, 4).to(torch.bfloat16)
    items.append(a)
    items.append(b)
    assert len(items) == 2 and torch.equal(items[0], a) and torch.equal(items[-1], b)
    items[0] = a[:, :, :2]  # replaced by a narrower batch (after a slice)
    assert items[0].shape == (2, 3, 2) and [t.dtype for t in items] == [torch.float32, torch.bfloat16]
    with pytest.raises(IndexError):
        items[2]
    folder = items.folder
    del items
    assert not folder.exists()


@pytest.mark.parametrize("mode", [["--sparsity", "0.25"], ["--uniform", "--target-params", "0.8"]])
def test_a_stopped_streamed_slice_resumes_to_the_same_files(
    mode: list[str], tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A streamed run stages like an in-memory one; --resume writes the finished layers to the new
    output one at a time and goes on: the files of an uninterrupted streamed run."""
    from slicegpt.io.staging import SliceStaging, staging_dir

    model = _save_model(tmp_path, "llama")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(SAMPLE_TEXT)
    _slice(capsys, model, tmp_path / "whole", corpus, *mode, "--stream", "on")
    real = SliceStaging.after_layer

    class Crash(Exception):
        pass

    def crash(self, state):
        real(self, state)
        if state.next_layer == 2:
            raise Crash

    monkeypatch.setattr(SliceStaging, "after_layer", crash)
    with pytest.raises(Crash):
        main(
            [
                "slice",
                str(model),
                "--calib",
                str(corpus),
                "--nsamples",
                "4",
                "--seqlen",
                "32",
                "--batch-size",
                "2",
                "--out",
                str(tmp_path / "out"),
                *mode,
                "--stream",
                "on",
            ]
        )
    monkeypatch.setattr(SliceStaging, "after_layer", real)
    assert staging_dir(tmp_path / "out").is_dir() and not (tmp_path / "out").exists()
    capsys.readouterr()
    assert "resuming at layer 2" in _slice(capsys, model, tmp_path / "out", corpus, *mode, "--stream", "on", "--resume")
    files = lambda f: {p.name: p.read_bytes() for p in sorted(f.iterdir()) if p.is_file() and p.name != "README.md"}  # noqa: E731 (the card names its folder)
    assert files(tmp_path / "out") == files(tmp_path / "whole")
    assert not staging_dir(tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))
