"""Property-based tests: random settings and random tiny configs (depth, width, MLP width) of
every family thrown at validation,
slicing, saving and loading. Every outcome is a model that reloads with the logits it had, or a
clear one-line error; no traceback escapes the command line."""

from __future__ import annotations

import io
import tempfile
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis", reason="property tests need hypothesis (the test extra)")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import slicegpt  # noqa: E402
from slicegpt.cli import main  # noqa: E402

from conftest import TINY_CONFIGS, VOCAB, make_tiny  # noqa: E402

# What a user may be told: a bad value, an unsupported model or option, a budget that cannot be met.
CLEAR = (ValueError, TypeError, FileExistsError)
PROFILE = settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


def _one_line(exc: BaseException) -> bool:
    text = str(exc).strip()
    return bool(text) and "\n" not in text and "Traceback" not in text


_LAYER_KEYS = ("num_hidden_layers", "n_layer")
_WIDTH_KEYS = ("hidden_size", "n_embd")
_MLP_KEYS = ("intermediate_size", "ffn_dim", "n_inner", "moe_intermediate_size")


def _random_tiny(family: str, layers: int, hidden: int, mlp: int, seed: int) -> torch.nn.Module:
    """A tiny model of ``family`` with its config's depth, width and MLP width changed."""
    import transformers

    from conftest import randomise_biases, randomise_norms

    cls_name, kwargs = TINY_CONFIGS[family]
    kwargs = dict(kwargs)
    for key in _LAYER_KEYS:
        if key in kwargs:
            kwargs[key] = layers
    for key in _WIDTH_KEYS:
        if key in kwargs:
            kwargs[key] = hidden
    if "word_embed_proj_dim" in kwargs:
        kwargs["word_embed_proj_dim"] = hidden
    for key in _MLP_KEYS:
        if key in kwargs:
            kwargs[key] = mlp
    if "layer_types" in kwargs:  # Gemma 3 names every layer's kind
        kwargs["layer_types"] = (kwargs["layer_types"] * layers)[:layers]
    if "mlp_only_layers" in kwargs:
        kwargs["mlp_only_layers"] = [i for i in kwargs["mlp_only_layers"] if i < layers]
    config = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    randomise_norms(model, seed)
    randomise_biases(model, seed)
    return model.float().eval()


@PROFILE
@given(
    family=st.sampled_from(sorted(TINY_CONFIGS)),
    layers=st.integers(1, 3),
    hidden=st.sampled_from([32, 64]),
    mlp=st.sampled_from([16, 48, 96]),
    uniform=st.booleans(),
    budget=st.one_of(st.none(), st.floats(0.3, 1.0)),
    sparsity=st.floats(0.0, 0.9),
    round_to=st.sampled_from([1, 2, 8, 16]),
    nsamples=st.integers(1, 4),
    seqlen=st.integers(2, 24),
    axes=st.sampled_from(["mlp,residual", "residual", "mlp"]),
    correct=st.sampled_from([None, True, False]),
    slice_head=st.booleans(),
)
# Found by CI: the budget counted a layer at zero MLP neurons and the empty weight crashed a rotation.
@example(
    family="gemma",
    layers=1,
    hidden=32,
    mlp=48,
    uniform=False,
    budget=0.875,
    sparsity=0.0,
    round_to=16,
    nsamples=1,
    seqlen=2,
    axes="mlp,residual",
    correct=None,
    slice_head=False,
)
def test_random_settings_slice_save_and_reload_or_fail_clearly(
    family: str,
    layers: int,
    hidden: int,
    mlp: int,
    uniform: bool,
    budget: float | None,
    sparsity: float,
    round_to: int,
    nsamples: int,
    seqlen: int,
    axes: str,
    correct: bool | None,
    slice_head: bool,
) -> None:
    model = _random_tiny(family, layers, hidden, mlp, seed=layers * 7 + hidden + mlp)
    rows = torch.randint(0, VOCAB, (nsamples, seqlen), generator=torch.Generator().manual_seed(nsamples * 100 + seqlen))
    try:
        config = slicegpt.SliceConfig(
            sparsity=sparsity,
            round_to=round_to,
            nsamples=nsamples,
            seqlen=seqlen,
            batch_size=2,
            uniform=uniform,
            target_params=budget,
            axes=axes,
            correct=correct,
            slice_head=slice_head,
        )
        slicegpt.slice_model(model, None, rows, config, progress=False)
    except CLEAR as exc:
        assert _one_line(exc), repr(exc)
        return
    x = rows[:1]
    with torch.inference_mode():
        before = model(input_ids=x, use_cache=False).logits
    assert torch.isfinite(before).all()
    with tempfile.TemporaryDirectory() as tmp:
        loaded = slicegpt.load(slicegpt.save(model, Path(tmp) / "m"))
        with torch.inference_mode():
            after = loaded(input_ids=x, use_cache=False).logits
    # Per-layer folders hold the very tensors; a uniform one is rewritten as a standard checkpoint
    # (explicit norm weights): equal up to float rounding.
    assert torch.equal(before, after) if not uniform else torch.allclose(before, after, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from conftest import SAMPLE_TEXT, tiny_tokenizer

    root = tmp_path_factory.mktemp("prop")
    make_tiny("llama", dtype=torch.float32).save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    (root / "c.txt").write_text(SAMPLE_TEXT)
    return root


_VALUES = st.sampled_from(["0", "1", "-1", "0.5", "2", "1e9", "nan", "inf", "abc", "", "0.75", "100M", "-0.1"])
_FLAGS = [
    "--sparsity",
    "--nsamples",
    "--seqlen",
    "--batch-size",
    "--round-to",
    "--target-params",
    "--residual-share",
    "--seed",
    "--eval-seqlen",
    "--eval-max-rows",
]


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(
    st.lists(st.tuples(st.sampled_from(_FLAGS), _VALUES), min_size=1, max_size=4),
    st.sampled_from(
        [[], ["--uniform"], ["--axes", "residual"], ["--axes", "bogus"], ["--device", "tpu"], ["--dtype", "float64"]]
    ),
)
def test_random_command_lines_never_escape_as_tracebacks(
    model_dir: Path, flags: list[tuple[str, str]], extra: list[str]
) -> None:
    argv = [
        "slice",
        str(model_dir / "model"),
        "--sparsity",
        "0.25",
        "--calib",
        str(model_dir / "c.txt"),
        "--nsamples",
        "2",
        "--seqlen",
        "16",
    ]
    for flag, value in flags:
        argv += [flag, value]
    with tempfile.TemporaryDirectory() as tmp:
        argv += [*extra, "--out", str(Path(tmp) / "o")]
        err = io.StringIO()
        try:
            with redirect_stdout(io.StringIO()), redirect_stderr(err):
                code = main(argv)
        except SystemExit as exc:  # argparse refuses a malformed value: usage and exit 2
            code = exc.code
        assert code in (0, 2), (argv, err.getvalue())
        if code == 2:
            last = [line for line in err.getvalue().strip().splitlines() if line.strip()][-1]
            assert last.startswith(("slicegpt: error:", "usage:")) or "error:" in last, (argv, err.getvalue())
        else:
            assert (Path(tmp) / "o" / "config.json").is_file()
