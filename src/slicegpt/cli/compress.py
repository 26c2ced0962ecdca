"""``slicegpt compress``: the whole pipeline in one command, or one recipe file: slice, recover, export."""

from __future__ import annotations

import argparse
import math
import shutil
from pathlib import Path
from typing import Any

from ..config import RecoverConfig, SliceConfig
from ..io.card import write_card
from ..io.format import read_metadata
from ..io.gguf import OUTTYPES, QUANT_BLOCK, export_gguf
from ..evaluation.bench import BenchConfig, compare
from ..evaluation.perplexity import perplexity
from ..io.folders import load
from ..io.models import load_model, resolve_model, shipped_gguf, source_identity
from ..sources import check_source
from ..io.recipe import RECIPE, Recipe, RecipeError, absolute_sources, read_recipe
from . import recover as recover_cmd
from . import slice as slice_cmd
from .common import SAVE_DTYPES, parse_count

HELP = "compress a model in one command (or one recipe file): slice to a size, recover, export a GGUF"
DESCRIPTION = (
    "Slice MODEL to --size of its parameters as shipped with the budget method (MLP neurons and the residual width, "
    "closed-form corrections), as a standard checkpoint unless --per-layer; optionally distil the source back into it "
    "(--recover TOKENS) and write a GGUF (--gguf TYPE). The output folder holds the model, its model card and "
    f"{RECIPE}, which remakes it: slicegpt compress --recipe {RECIPE} --out DIR."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    d, r = SliceConfig(), RecoverConfig()
    p.add_argument(
        "model",
        nargs="?",
        default=None,
        help="hub id, local folder, .gguf; default: the embedded SmolLM2-135M-Instruct",
    )
    p.add_argument(
        "--recipe",
        default=None,
        metavar="FILE",
        help=f"run the recipe in FILE (a {RECIPE}, or a folder holding one) "
        "instead of the flags below; --out, --overwrite, --device and --no-samples still apply",
    )
    p.add_argument(
        "--size",
        type=parse_count,
        default=0.75,
        metavar="N",
        help="parameters kept: a fraction of the model as shipped "
        "(0.75) or a count (100.9M), tied weights counted once",
    )
    p.add_argument(
        "--per-layer",
        action="store_true",
        help="per-layer widths (the best quality measured; loads through slicegpt "
        "or transformers with trust_remote_code) instead of a standard checkpoint",
    )
    p.add_argument("--calib", default=d.calib, help="calibration data (as for slice)")
    p.add_argument("--nsamples", type=int, default=d.nsamples, help="calibration rows")
    p.add_argument("--seqlen", type=int, default=d.seqlen, help="tokens per calibration row")
    p.add_argument(
        "--recover",
        type=parse_count,
        default=None,
        metavar="TOKENS",
        help="distil the source model back into the compressed one for this many tokens (2M); none by default",
    )
    p.add_argument("--recover-data", default=r.data, metavar="DATA", help="recovery data (as for recover --data)")
    p.add_argument(
        "--gguf",
        default=None,
        choices=list(OUTTYPES),
        metavar="TYPE",
        help="also write DIR/DIR-TYPE.gguf of this type "
        f"(llama.cpp's names: {', '.join(OUTTYPES)}); needs a standard checkpoint",
    )
    p.add_argument(
        "--save-dtype",
        default="auto",
        choices=SAVE_DTYPES,
        help="dtype of the saved weights (auto: bf16 when the source was quantized or bf16)",
    )
    p.add_argument("--device", default=d.device, help="where each layer is processed and training runs: cpu, cuda, ...")
    p.add_argument("--out", required=True, help="the output folder")
    p.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")
    p.add_argument(
        "--no-samples", action="store_true", help="do not end by showing two held-out prompts answered side by side"
    )
    p.add_argument(
        "--evaluate",
        type=int,
        default=0,
        metavar="ROWS",
        help="end with a before/after table: perplexity on ROWS rows "
        "of 1024 tokens of 'wiki' (the built-in evaluation part) and of 'lambada' (novels), and decoding speed at "
        "batch 1, for the source and the result side by side (added to the model card); 0: parameters and file sizes "
        "only",
    )


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    if args.recipe:
        return read_recipe(args.recipe)
    d = SliceConfig()
    quantized = args.gguf is not None and args.gguf not in ("f32", "f16", "bf16")
    config = SliceConfig(
        target_params=args.size,
        uniform=not args.per_layer,
        calib=args.calib,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        device=args.device,
        # a quantized GGUF splits every row into blocks of 32 values: an MLP width that is not a
        # multiple stays f16 in the file (SmolLM2 at 880 neurons: q4_k_m 102 MB against 105 dense)
        round_to=math.lcm(d.round_to, QUANT_BLOCK) if quantized else d.round_to,
    )
    recover = None
    if args.recover is not None:
        if args.recover != int(args.recover):
            raise ValueError(f"--recover is a whole number of tokens (2M, 500000), got {args.recover}")
        recover = RecoverConfig(tokens=int(args.recover), data=args.recover_data, device=args.device).to_dict()
        recover["data"] = absolute_sources(recover["data"])
    source, fingerprint = source_identity(args.model)
    return Recipe(
        model=source,
        source_fingerprint=fingerprint,
        slice={**config.to_dict(), "calib": absolute_sources(config.calib)},
        save_dtype=args.save_dtype,
        recover=recover,
        export=None if args.gguf is None else {"outtype": args.gguf},
    )


def _namespace(module: Any, argv: list[str], values: dict[str, Any]) -> argparse.Namespace:
    """A sub-command's arguments: its parser's defaults for ``argv``, then the recipe's settings
    (named as the config dataclasses name them, as the commands' namespaces do)."""
    parser = argparse.ArgumentParser(prog=f"slicegpt {module.__name__.rsplit('.', 1)[-1]}")
    module.add_arguments(parser)
    ns = parser.parse_args(argv)
    for key, value in values.items():
        setattr(ns, key, value)
    return ns


def run(args: argparse.Namespace) -> int:
    recipe = recipe_from_args(args)
    if args.recipe:
        recipe.slice["device"] = args.device
        if recipe.recover is not None:
            recipe.recover["device"] = args.device
        current = source_identity(recipe.model)[1]
        if recipe.source_fingerprint and current is not None and current != recipe.source_fingerprint:
            raise RecipeError(
                f"{recipe.model} is not the model the recipe was made from (its weights differ from the "
                "fingerprint recorded)"
            )
    # the data is checked before any work: a missing recovery file must not cost a compression first
    check_source(recipe.slice.get("calib"), "calibration")
    if recipe.recover is not None:
        check_source(recipe.recover.get("data"), "recovery")
    export = (recipe.export or {}).get("outtype")
    if export is not None and not recipe.slice.get("uniform", False):
        raise ValueError(
            "--gguf needs a standard checkpoint: drop --per-layer (a per-layer folder of MLP neurons alone, "
            "`slicegpt slice --per-layer --axes mlp`, exports with `slicegpt export`)"
        )
    out = Path(args.out)
    sliced = out if recipe.recover is None else out.parent / f".{out.name}.compress-sliced"
    common = (
        ["--out", str(sliced), "--overwrite"]
        if recipe.recover is not None
        else (["--out", str(out)] + (["--overwrite"] if args.overwrite else []))
    )
    if recipe.recover is not None and out.exists() and not args.overwrite:
        raise FileExistsError(f"output folder {out} exists; pass --overwrite to replace it")
    slice_args = _namespace(
        slice_cmd,
        ([] if recipe.model is None else [recipe.model]) + common,
        {
            **recipe.slice,
            "save_dtype": recipe.save_dtype,
            "no_samples": args.no_samples or recipe.recover is not None,
            "command": "slice",
        },
    )
    try:
        code = slice_cmd.run(slice_args)
        if code:
            return code
        if recipe.recover is not None:
            rec_args = _namespace(
                recover_cmd,
                [str(sliced), "--out", str(out)] + (["--overwrite"] if args.overwrite else []),
                {
                    **recipe.recover,
                    "save_dtype": recipe.save_dtype,
                    "no_samples": args.no_samples,
                    "command": "recover",
                },
            )
            code = recover_cmd.run(rec_args)
            if code:
                return code
    finally:
        if sliced != out:
            shutil.rmtree(sliced, ignore_errors=True)
    if export is not None:
        gguf_file = export_gguf(out, out / f"{out.resolve().name}-{export}.gguf", outtype=export, overwrite=True)
        print(f"wrote {gguf_file} ({gguf_file.stat().st_size / 1e6:.1f} MB, {export})")
    recipe.write(out)  # the whole run, export included
    measured = before_after(recipe.model, out, args.evaluate, device=args.device)
    write_card(
        out, read_metadata(out), results={k: v for k, v in measured.items() if k not in ("parameters", "files on disk")}
    )
    print(format_before_after(measured, recipe.model, out))
    print(f"{out}: remake it with `slicegpt compress --recipe {out / RECIPE} --out DIR`")
    return 0


def _bytes_on_disk(path: Path) -> int:
    """A model's weights on disk: the GGUF file, or a folder's safetensors (GGUFs beside them apart)."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def before_after(source: str | None, out: Path, rows: int, device: str = "cpu") -> dict[str, dict[str, Any]]:
    """{measure: {"model": result's, "source": source's}}: parameters and weights on disk, and with
    ``rows`` perplexity on wiki and lambada and decoding speed at batch 1."""
    meta = read_metadata(out)
    gguf_files = sorted(out.glob("*.gguf"))
    src_path = Path(resolve_model(source)[0])
    shipped = shipped_gguf(source)
    table: dict[str, dict[str, Any]] = {
        "parameters": {"model": meta["params_after"], "source": meta["params_before"]},
        "files on disk": {
            "model": _bytes_on_disk(out) if not gguf_files else _bytes_on_disk(gguf_files[0]),
            "source": _bytes_on_disk(shipped) if shipped is not None else _bytes_on_disk(src_path),
        },
    }
    if rows <= 0:
        return table
    model = load(out)
    dense, tokenizer, _ = load_model(source)
    for data in ("wiki", "lambada"):
        ours = perplexity(model, tokenizer, data, seqlen=1024, max_rows=rows, device=device, progress=False)
        theirs = perplexity(dense, tokenizer, data, seqlen=1024, max_rows=rows, device=device, progress=False)
        table[f"perplexity, {data} ({ours.rows} rows x {ours.seqlen})"] = {
            "model": ours.perplexity,
            "source": theirs.perplexity,
        }
    speed = compare(
        dense,
        model,
        tokenizer,
        BenchConfig(device=device, batch_sizes=(1,), prompt_len=128, gen_len=33, repeats=2, progress=False),
    )
    metrics = speed["results"][0]["metrics"]
    table["decoding, tokens/s at batch 1"] = {
        "model": metrics["sliced"]["decode_tokens_per_s"],
        "source": metrics["dense"]["decode_tokens_per_s"],
    }
    return table


def format_before_after(table: dict[str, dict[str, Any]], source: str | None, out: Path) -> str:
    def fmt(name: str, v: Any) -> str:
        if v is None:
            return ""
        if name == "parameters":
            return f"{v / 1e6:.1f}M"
        if name == "files on disk":
            return f"{v / 1e6:.0f} MB"
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    lines = [
        f"| | source ({Path(str(source)).name if source else 'the default model'}) | {out.name} | ratio |",
        "|---|---:|---:|---:|",
    ]
    for name, row in table.items():
        a, b = row.get("source"), row.get("model")
        ratio = f"{b / a:.2f}x" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a else ""
        lines.append(f"| {name} | {fmt(name, a)} | {fmt(name, b)} | {ratio} |")
    return "\n".join(lines)
