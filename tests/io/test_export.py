"""GGUF export: tiny standard models written with export_gguf and read back give the same logits.

The models have num_heads * head_dim != hidden_size (48 wide, 4 heads of 16), the shape a uniform
slice produces. Two independent readers check the file: transformers' own GGUF loader (llama,
which undoes llama.cpp's q/k permutation itself) and a plain gguf.GGUFReader mapping written here.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SAMPLE_TEXT, randomise_norms, tiny_tokenizer

gguf = pytest.importorskip("gguf")

from slicegpt.cli.export import add_arguments, run  # noqa: E402
from slicegpt.io.format import FORMAT_VERSION, SlicedFolderError, file_record  # noqa: E402
from slicegpt.io.gguf import ExportError, export_gguf, exportable_model_types, unpermute_qk  # noqa: E402

TOL = {"f32": 1e-5, "f16": 5e-3}
COMMON = dict(
    hidden_size=48,
    head_dim=16,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=96,
    num_hidden_layers=2,
    vocab_size=320,
    max_position_embeddings=128,
    bos_token_id=0,
    eos_token_id=1,
)


def _build(folder: Path, model_type: str, tied: bool, **extra) -> torch.nn.Module:
    import transformers

    cls = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config", "mistral": "MistralConfig"}[
        model_type
    ]
    config = getattr(transformers, cls)(**{**COMMON, **extra}, tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    randomise_norms(model)
    with torch.no_grad():  # biases are zero at init; make them count
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return model


def _ids() -> torch.Tensor:
    return tiny_tokenizer()(SAMPLE_TEXT[:300], return_tensors="pt")["input_ids"][:, :64]


# HF module suffix per gguf tensor kind, the inverse of the exporter's table.
_TO_HF = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def read_gguf(path: Path) -> tuple[dict[str, object], dict[str, torch.Tensor]]:
    """(metadata, HF state dict) from a GGUF file, undoing the q/k permutation of the llama arch."""
    reader = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    arch = meta["general.architecture"]
    n_head, n_kv = meta[f"{arch}.attention.head_count"], meta[f"{arch}.attention.head_count_kv"]
    state: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        # GGUF lists dims innermost first; the data is already row-major in torch order.
        values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)  # quantized blocks to floats
        data = torch.from_numpy(np.array(values, dtype=np.float32)).reshape([int(d) for d in reversed(t.shape)])
        if m := re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", t.name):
            kind = m[2]
            if arch in ("llama", "deci") and kind in ("attn_q", "attn_k"):  # the archs whose RoPE pairs are interleaved
                data = unpermute_qk(data, n_head if kind == "attn_q" else n_kv)
            state[f"model.layers.{m[1]}.{_TO_HF[kind]}.{m[3]}"] = data
        else:
            state[
                {
                    "token_embd.weight": "model.embed_tokens.weight",
                    "output_norm.weight": "model.norm.weight",
                    "output.weight": "lm_head.weight",
                }[t.name]
            ] = data
    return meta, state


def _logits_from_state(folder: Path, state: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    if config.tie_word_embeddings:
        assert "lm_head.weight" not in state  # llama.cpp reuses token_embd when output is absent
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("dtype", ["f32", "f16"])
@pytest.mark.parametrize(
    "model_type,tied,extra",
    [
        ("llama", True, {}),
        ("llama", False, {}),
        ("qwen2", True, {}),  # head_dim * heads != hidden: written as llama with permuted biases
        ("qwen2", False, dict(hidden_size=64)),  # standard shape: written as qwen2
        ("qwen3", False, {}),
        ("mistral", False, dict(sliding_window=None)),
    ],
)
def test_export_roundtrip(tmp_path: Path, model_type: str, tied: bool, extra: dict, dtype: str) -> None:
    folder = tmp_path / "hf"
    model = _build(folder, model_type, tied, **extra)
    out = export_gguf(folder, tmp_path / "m.gguf", dtype=dtype)
    assert out == tmp_path / "m.gguf" and out.is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left

    meta, state = read_gguf(out)
    arch = meta["general.architecture"]
    hidden = extra.get("hidden_size", 48)
    expected_arch = {"qwen3": "qwen3", "qwen2": "qwen2" if hidden == 64 else "llama"}.get(model_type, "llama")
    assert arch == expected_arch
    assert meta[f"{arch}.embedding_length"] == hidden
    assert meta[f"{arch}.attention.key_length"] == meta[f"{arch}.attention.value_length"] == 16
    assert meta[f"{arch}.attention.head_count"] == 4 and meta[f"{arch}.attention.head_count_kv"] == 2
    assert meta[f"{arch}.block_count"] == 2 and meta[f"{arch}.feed_forward_length"] == 96
    assert meta[f"{arch}.context_length"] == 128
    assert meta[f"{arch}.rope.freq_base"] == pytest.approx(model.config.rope_parameters["rope_theta"])
    assert meta[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(model.config.rms_norm_eps)
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.ggml.bos_token_id"] == 0 and meta["tokenizer.ggml.eos_token_id"] == 1
    assert meta["tokenizer.ggml.add_bos_token"] is False  # the tiny tokenizer adds nothing
    assert ("lm_head.weight" in state) == (not tied)

    reader = gguf.GGUFReader(out)
    for t in reader.tensors:  # norms and biases f32, matrices in the asked type
        want = "F32" if len(t.shape) == 1 or dtype == "f32" else "F16"
        assert t.tensor_type.name == want, t.name

    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
    got = _logits_from_state(folder, state, ids)
    err = (got - ref).abs().max().item()
    assert err < TOL[dtype] * max(1.0, ref.abs().max().item()), err


# Largest relative logit error per type the gguf package writes (block quantisation of a random tiny model).
QTOL = {"bf16": 2e-2, "q8_0": 3e-2, "q5_1": 0.15, "q5_0": 0.15, "q4_1": 0.3, "q4_0": 0.3}


@pytest.mark.parametrize("outtype", list(QTOL))
def test_quantized_export_reads_back_close(tmp_path: Path, outtype: str) -> None:
    """The gguf package's types: matrices quantised in blocks (rows that split into blocks), norms
    f32, the file labelled with its type; read back and dequantised, the logits stay close."""
    from slicegpt.io.gguf import DIRECT_TYPES

    assert outtype in DIRECT_TYPES
    folder = tmp_path / "hf"
    model = _build(folder, "llama", True)
    out = export_gguf(folder, tmp_path / "m.gguf", outtype=outtype)
    reader = gguf.GGUFReader(out)
    assert gguf.LlamaFileType(reader.fields["general.file_type"].contents()).name == f"MOSTLY_{outtype.upper()}"
    block = gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, outtype.upper())][0]
    for t in reader.tensors:  # GGUF shapes list the row length first; rows that do not split into blocks stay f16
        want = "F32" if len(t.shape) == 1 else outtype.upper() if int(t.shape[0]) % block == 0 else "F16"
        assert t.tensor_type.name == want, t.name
    assert any(t.tensor_type.name == outtype.upper() for t in reader.tensors)
    f16 = export_gguf(folder, tmp_path / "f16.gguf", outtype="f16")
    if outtype.startswith("q"):
        assert out.stat().st_size < f16.stat().st_size
    _, state = read_gguf(out)
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
    err = (_logits_from_state(folder, state, ids) - ref).abs().max().item() / ref.abs().max().item()
    assert err < QTOL[outtype], err


def test_k_quants_need_llama_cpp_and_say_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    folder = tmp_path / "hf"
    _build(folder, "llama", True)
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # not installed
    with pytest.raises(ExportError, match=r"llama.cpp's own quantizer: pip install 'slicegpt\[gguf-quant\]'"):
        export_gguf(folder, tmp_path / "k.gguf", outtype="q4_k_m")
    with pytest.raises(ExportError, match="unknown --outtype 'q9'"):
        export_gguf(folder, tmp_path / "k.gguf", outtype="q9")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*"))


@pytest.mark.parametrize("tied", [True, False])
def test_transformers_gguf_loader_agrees(tmp_path: Path, tied: bool) -> None:
    """transformers' GGUF loader (an independent reader of llama.cpp's layout) gives the same logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path / "hf"
    model = _build(folder, "llama", tied)
    export_gguf(folder, tmp_path / "m.gguf", dtype="f32")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    assert loaded.config.hidden_size == 48 and loaded.config.head_dim == 16
    assert loaded.config.tie_word_embeddings == tied
    ids = _ids()
    with torch.no_grad():
        err = (loaded(ids).logits - model(ids).logits).abs().max().item()
    assert err < 1e-5, err
    # The vocabulary and merges survive: the tokenizer rebuilt from the GGUF splits text the same way.
    tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    text = SAMPLE_TEXT[:500]
    assert (
        tok(text, add_special_tokens=False)["input_ids"]
        == tiny_tokenizer()(text, add_special_tokens=False)["input_ids"]
    )


def test_refusals(tmp_path: Path) -> None:
    folder = tmp_path / "hf"
    _build(folder, "llama", True)
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep")
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_gguf(folder, out)
    assert out.read_bytes() == b"keep"
    export_gguf(folder, out, overwrite=True, dtype="f32")
    assert out.read_bytes()[:4] == b"GGUF"

    config = json.loads((folder / "config.json").read_text())
    # Per-layer folders keep their metadata in config.json (older ones without a mode); refused.
    for meta in ({"format_version": 1}, {"format_version": 1, "mode": "per-layer"}):
        (folder / "config.json").write_text(json.dumps({**config, "slicegpt": meta}))
        with pytest.raises(ExportError, match="per-layer sliced.*shortcut"):
            export_gguf(folder, tmp_path / "x.gguf")
    # Uniform folders are standard checkpoints with the metadata beside them in slicegpt.json.
    (folder / "config.json").write_text(json.dumps(config))
    uniform = {
        "format_version": FORMAT_VERSION,
        "mode": "uniform",
        "source_model": "tiny",
        "widths": {"hidden": 64},
        "settings": {"sparsity": 0.25},
        "files": {"model.safetensors": file_record(folder / "model.safetensors")},
    }
    (folder / "slicegpt.json").write_text(json.dumps(uniform))
    export_gguf(folder, tmp_path / "x.gguf", dtype="f32")
    fields = gguf.GGUFReader(tmp_path / "x.gguf").fields
    assert fields["general.description"].contents() == (
        "tiny compressed by slicegpt (uniform, SliceGPT sparsity 0.25): hidden size 64 -> 48, MLP width 96"
    )
    # the compressed model's own name (its folder's), its source, and where it came from
    assert fields["general.name"].contents() == "hf" and fields["general.basename"].contents() == "tiny"
    assert json.loads(fields["slicegpt.settings"].contents()) == {"sparsity": 0.25}
    # The metadata is read by slicegpt's one reader: a newer format is refused, and a slicegpt.json
    # that is not a uniform folder's (per-layer folders keep theirs in config.json) is not taken as one.
    (folder / "slicegpt.json").write_text(json.dumps({**uniform, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(SlicedFolderError, match="upgrade slicegpt"):
        export_gguf(folder, tmp_path / "z.gguf")
    (folder / "slicegpt.json").write_text(json.dumps({"format_version": FORMAT_VERSION, "mode": "per-layer"}))
    with pytest.raises(SlicedFolderError, match="no slicegpt metadata"):
        export_gguf(folder, tmp_path / "z.gguf")
    assert not (tmp_path / "z.gguf").exists()
    (folder / "slicegpt.json").unlink()
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "phi3"}))
    with pytest.raises(ExportError, match="model_type 'phi3' to GGUF; supported: llama, mistral, qwen2, qwen3"):
        export_gguf(folder, tmp_path / "y.gguf")
    assert not (tmp_path / "y.gguf").exists()


def test_exportable_families_come_from_the_arch_specs() -> None:
    assert exportable_model_types() == ["llama", "mistral", "qwen2", "qwen3"]


def test_cli_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "hf"
    _build(folder, "llama", True)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([str(folder), "--gguf", str(tmp_path / "c.gguf"), "--dtype", "f32"])
    assert run(args) == 0
    assert "c.gguf" in capsys.readouterr().out
    with pytest.raises(FileExistsError):
        run(args)
    args.overwrite = True
    assert run(args) == 0


def test_sentencepiece_style_vocab(tmp_path: Path) -> None:
    """A byte-fallback BPE with a Metaspace pre-tokenizer (Llama 2, Mistral) becomes llama.cpp's 'llama'
    vocabulary, scored so that merging by score replays the BPE merge order."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(
        [SAMPLE_TEXT], trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False)
    )
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    folder = tmp_path / "hf"
    LlamaForCausalLM(
        LlamaConfig(**{**COMMON, "vocab_size": 600, "bos_token_id": 1, "eos_token_id": 2})
    ).save_pretrained(folder)
    hf_tok.save_pretrained(folder)
    export_gguf(folder, tmp_path / "m.gguf", dtype="f32")

    meta, _ = read_gguf(tmp_path / "m.gguf")
    assert meta["tokenizer.ggml.model"] == "llama" and meta["tokenizer.ggml.add_space_prefix"] is True
    types = meta["tokenizer.ggml.token_type"]
    assert types[1] == gguf.TokenType.CONTROL and types[3 + 0x41] == gguf.TokenType.BYTE
    # transformers rebuilds a tokenizer from the GGUF's tokens and scores; it must split like the original,
    # byte fallback for unseen characters included.
    text = SAMPLE_TEXT[:400] + " 123 ünïcödé 東京"
    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert back(text, add_special_tokens=False)["input_ids"] == hf_tok(text, add_special_tokens=False)["input_ids"]


def _per_layer_budget(folder: Path, model_type: str = "llama") -> torch.nn.Module:
    """A per-layer budget on MLP neurons alone (the basis kept, a different width per layer), saved."""
    import slicegpt
    from conftest import calib_rows, make_tiny

    model = make_tiny(model_type, dtype=torch.float32)
    slicegpt.slice_model(
        model,
        None,
        calib_rows(8),
        slicegpt.SliceConfig(uniform=False, target_params=0.8, axes="mlp", batch_size=4),
        progress=False,
        source_model="tiny",
    )
    slicegpt.save(model, folder, tokenizer=tiny_tokenizer())
    return model


def test_per_layer_widths_export_to_llama_cpps_deci_architecture(tmp_path: Path) -> None:
    import slicegpt

    folder = tmp_path / "pl"
    model = _per_layer_budget(folder)
    widths = [w["mlp"] for w in slicegpt.read_metadata(folder)["widths"]["layers"]]
    assert len(set(widths)) > 1  # the layers really keep different widths
    out = export_gguf(folder, tmp_path / "pl.gguf", outtype="f32")
    meta, state = read_gguf(out)
    assert meta["general.architecture"] == "deci" and list(meta["deci.feed_forward_length"]) == widths
    assert meta["deci.attention.head_count"] == 4 and meta["deci.attention.head_count_kv"] == 2
    sd = model.state_dict()
    for name, tensor in state.items():
        if name.endswith(("input_layernorm.weight", "post_attention_layernorm.weight")):
            assert torch.equal(tensor, torch.ones(64)), name  # folded into the matrices that read them
        else:
            assert torch.equal(tensor, sd[name].float()), name  # q/k un-permuted back: the same weights
    assert "lm_head.weight" not in state  # the head stays tied to the embeddings


def test_per_layer_folders_llama_cpp_cannot_express_are_refused_naming_what_works(tmp_path: Path) -> None:
    import slicegpt
    from conftest import calib_rows, make_tiny

    _per_layer_budget(tmp_path / "qwen", "qwen2")
    with pytest.raises(ExportError, match="deci architecture.*for llama, mistral only.*--uniform"):
        export_gguf(tmp_path / "qwen", tmp_path / "q.gguf")
    shortcuts = make_tiny("llama", dtype=torch.float32)
    slicegpt.slice_model(
        shortcuts, None, calib_rows(8), slicegpt.SliceConfig(sparsity=0.25, batch_size=4), progress=False
    )
    slicegpt.save(shortcuts, tmp_path / "sc", tokenizer=tiny_tokenizer())
    with pytest.raises(ExportError, match="shortcut matrices.*--uniform, or a per-layer budget on MLP neurons alone"):
        export_gguf(tmp_path / "sc", tmp_path / "s.gguf")
    assert not list(tmp_path.glob("*.gguf"))


def _llama_cpp_logits(path: Path, ids: list[int]) -> np.ndarray:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), logits_all=True, n_ctx=256, n_batch=256, n_threads=1, verbose=False)
    llm.reset()
    llm.eval(ids)
    out = np.array(llm.scores[: len(ids)], dtype=np.float32)
    llm.close()
    return out


def test_llama_cpp_runs_per_layer_widths_and_k_quants_like_transformers(tmp_path: Path) -> None:
    """Where llama-cpp-python is installed (the gguf-quant extra; not in CI, a long source build):
    llama.cpp's deci graph computes what slicegpt computes for a per-layer folder, and its own
    quantizer writes a k-quant file of the f16 export."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (pip install 'slicegpt[gguf-quant]') is not installed")
    import slicegpt

    folder = tmp_path / "pl"
    _per_layer_budget(folder)
    out = export_gguf(folder, tmp_path / "pl.gguf", outtype="f32")
    ids = _ids()[0].tolist()
    with torch.no_grad():
        ref = slicegpt.load(folder)(torch.tensor([ids])).logits[0].numpy()
    got = _llama_cpp_logits(out, ids)
    assert (ref.argmax(-1) == got.argmax(-1)).mean() == 1.0
    assert np.abs(ref - got).max() < 1e-2 * np.abs(ref).max()  # llama.cpp keeps its KV cache in f16
    k = export_gguf(folder, tmp_path / "pl-q4_k_m.gguf", outtype="q4_k_m")
    assert gguf.GGUFReader(k).fields["general.architecture"].contents() == "deci"
    assert k.stat().st_size < (tmp_path / "pl.gguf").stat().st_size
