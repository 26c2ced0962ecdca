"""Inference-speed measurement for dense and sliced models.

SliceGPT's promise is that a sliced model is *faster* because every matmul is
narrower.  This module measures that promise honestly:

* :func:`benchmark` times prefill (one forward over ``batch x prompt_len``) and
  KV-cached greedy decoding for one model.
* :func:`compare` times two models *alternately* in one process so that machine
  noise (turbo, thermal throttling, neighbours) hits both equally, and reports
  measured and FLOP-predicted throughput ratios side by side; the FLOPs come from
  :mod:`slicegpt.evaluation.flops` (the actual module shapes, shortcut matrices included).

Timing works on any ``*ForCausalLM``, sliced or not; the FLOP prediction needs a family
slicegpt supports (:func:`slicegpt.supported_architectures`).
"""

from __future__ import annotations

import os
import platform
import re
import statistics
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..chat import cache_kwarg, forward_params, output_cache
from ..config import dtype_name, parse_dtype
from ..core.layout import LAYOUTS, apply_layout
from ..memory import peak_rss_bytes
from .flops import flops_breakdown, flops_per_token

__all__ = [
    "CACHES",
    "DECODE_METHODS",
    "BenchConfig",
    "benchmark",
    "compare",
    "format_table",
]

#: ``manual``: our own greedy loop feeding the KV cache back into ``forward``
#: (times decode directly, no ``generate`` bookkeeping in the numbers).
#: ``generate``: ``model.generate`` with ``min_new_tokens == max_new_tokens``;
#: decode time is the total generate time minus a separately timed prefill.
DECODE_METHODS: tuple[str, ...] = ("manual", "generate")

#: ``dynamic``: transformers' default cache, which grows by concatenation. ``static``: a
#: ``StaticCache`` allocated once for prompt + generation, as serving engines preallocate theirs.
CACHES: tuple[str, ...] = ("dynamic", "static")

_MB = 1024.0 * 1024.0


# --------------------------------------------------------------------------- config


@dataclass
class BenchConfig:
    """What to measure.  ``gen_len`` counts *all* generated tokens: the first
    one comes out of the prefill forward, the remaining ``gen_len - 1`` are
    decode steps, which is why ``gen_len >= 2`` is required."""

    device: str = "cpu"
    dtype: str = "float32"
    batch_sizes: tuple[int, ...] = (1, 8)
    prompt_len: int = 512
    gen_len: int = 128
    warmup: int = 1
    repeats: int = 3
    seed: int = 0
    decode_method: str = "manual"
    # "matvec": store weights with at least as many outputs as inputs input-major before
    # timing (slicegpt.core.layout), on every model measured, so a comparison stays like for like.
    layout: str = "stock"
    cache: str = "dynamic"
    progress: bool = True

    def __post_init__(self) -> None:
        # Accept lists (e.g. from JSON) but store a tuple so the config stays hashable/immutable-ish.
        self.batch_sizes = tuple(int(b) for b in self.batch_sizes)
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise ValueError(f"batch_sizes must be non-empty positive ints, got {self.batch_sizes}")
        if self.prompt_len < 1:
            raise ValueError(f"prompt_len must be >= 1, got {self.prompt_len}")
        if self.gen_len < 2:
            raise ValueError(f"gen_len must be >= 2 (the first token comes from prefill), got {self.gen_len}")
        if self.repeats < 1 or self.warmup < 0:
            raise ValueError(f"need repeats >= 1 and warmup >= 0, got {self.repeats=}, {self.warmup=}")
        if self.decode_method not in DECODE_METHODS:
            raise ValueError(f"decode_method must be one of {DECODE_METHODS}, got {self.decode_method!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.cache not in CACHES:
            raise ValueError(f"cache must be one of {CACHES}, got {self.cache!r}")
        parse_dtype(self.dtype)  # fail early on typos

    @property
    def torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.dtype)

    @property
    def decode_context_len(self) -> int:
        """Average KV length seen by a decode step (the cache grows from
        ``prompt_len`` to ``prompt_len + gen_len - 1``); used for FLOP predictions."""
        return int(round(self.prompt_len + (self.gen_len - 1) / 2))


# --------------------------------------------------------------------------- environment


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as handle:
                for line in handle:
                    if line.lower().startswith("model name"):
                        return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return platform.processor() or platform.machine() or "cpu"
    return str(device)


def _environment(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    import transformers

    return {
        "device": str(device),
        "device_name": _device_name(device),
        "torch_threads": torch.get_num_threads(),
        "dtype": dtype_name(dtype),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "python_version": platform.python_version(),
        "memory_method": _PeakMemory.method_for(device),
    }


def _sync(device: torch.device) -> None:
    # CUDA kernels are asynchronous: without a sync the timer measures launch time only.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- memory


def _proc_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="utf-8") as handle:
            match = re.search(rf"^{field}:\s+(\d+)\s+kB", handle.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


# This measures something slicegpt.memory does not: the peak of one *window* (a timed run) above
# the level at its start. slicegpt.memory.peak_rss_bytes is the process's lifetime high-water
# mark, which cannot show the second model of a comparison; so on Linux the kernel's counter is
# reset at the start of each window, and the lifetime mark is only the fallback.


def _reset_host_peak() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) for this process (Linux >= 4.0).

    Writing ``5`` to ``/proc/self/clear_refs`` resets VmHWM to the current RSS.
    """
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
    except OSError:
        return False
    return _proc_status_kb("VmHWM") is not None


class _PeakMemory:
    """Context manager measuring the peak memory *above* the level at entry, in bytes."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.method = self.method_for(device)
        self.delta_bytes: int | None = None
        self._base = 0

    @staticmethod
    def method_for(device: torch.device) -> str:
        if device.type == "cuda":
            return "cuda_max_memory_allocated"
        if device.type == "cpu":
            if os.path.exists("/proc/self/clear_refs") and os.path.exists("/proc/self/status"):
                return "host_rss_hwm"
            return "host_ru_maxrss"
        return "unavailable"

    def __enter__(self) -> _PeakMemory:
        if self.method == "cuda_max_memory_allocated":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif self.method == "host_rss_hwm":
            if _reset_host_peak():
                self._base = (_proc_status_kb("VmRSS") or 0) * 1024
            else:  # clear_refs not writable (e.g. sandbox): fall back to the lifetime counter
                self.method = "host_ru_maxrss"
        if self.method == "host_ru_maxrss":
            self._base = peak_rss_bytes()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.method == "cuda_max_memory_allocated":
            torch.cuda.synchronize(self.device)
            self.delta_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        elif self.method == "host_rss_hwm":
            self.delta_bytes = (_proc_status_kb("VmHWM") or 0) * 1024 - self._base
        elif self.method == "host_ru_maxrss":
            self.delta_bytes = peak_rss_bytes() - self._base
        if self.delta_bytes is not None:
            self.delta_bytes = max(self.delta_bytes, 0)


def _weights_bytes(model: nn.Module) -> int:
    # named_parameters/buffers de-duplicate tied tensors (embeddings == lm_head).
    tensors = [t for _, t in model.named_parameters()] + [t for _, t in model.named_buffers() if t is not None]
    return sum(t.numel() * t.element_size() for t in tensors)


# --------------------------------------------------------------------------- one timed run


@dataclass
class _RunTimes:
    prefill_s: float  # forward over batch x prompt_len, no cache, full logits
    ttft_s: float  # prefill with cache + first token
    decode_s: float  # the (gen_len - 1) cached decode steps
    decode_steps: int
    peak_delta_bytes: int | None


def _cache_len(cache: Any) -> int | None:
    if cache is None:
        return None
    get_seq_length = getattr(cache, "get_seq_length", None)
    if callable(get_seq_length):
        return int(get_seq_length())
    if isinstance(cache, (tuple, list)) and cache and isinstance(cache[0], (tuple, list)):
        return int(cache[0][0].shape[-2])  # legacy ((k, v), ...) with k: [b, h, seq, d]
    return None


def _check_cache(cache: Any, expected: int, when: str) -> None:
    """Fail loudly if the KV cache is not being filled.

    A decoder layer that silently drops the ``cache`` kwarg still "decodes",
    just attending to one token, which would make a sliced model look
    spectacularly (and wrongly) fast.
    """
    length = _cache_len(cache)
    if length is None:
        raise RuntimeError(f"no KV cache returned {when}; the model (or its decoder layers) ignores use_cache")
    if length != expected:
        raise RuntimeError(
            f"KV cache holds {length} positions {when}, expected {expected}: the decoder layers do not "
            "pass the `cache` kwarg through to attention"
        )


def _logits(output: Any) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output[0]


def _new_cache(model: nn.Module, input_ids: torch.Tensor, config: BenchConfig) -> Any:
    """None lets the model make its default (dynamic) cache; "static" preallocates one."""
    if config.cache == "dynamic":
        return None
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=input_ids.shape[1] + config.gen_len)


def _prefill_with_cache(
    model: nn.Module, input_ids: torch.Tensor, params: set[str], cache: Any = None
) -> tuple[torch.Tensor, Any]:
    kwargs: dict[str, Any] = {"use_cache": True}
    if cache is not None:
        kwargs[cache_kwarg(model)] = cache
    if "logits_to_keep" in params:
        kwargs["logits_to_keep"] = 1  # only the last position is needed to pick the first token (as generate does)
    output = model(input_ids, **kwargs)
    next_tokens = _logits(output)[:, -1:].argmax(dim=-1)
    return next_tokens, output_cache(output)


def _decode_manual(
    model: nn.Module, input_ids: torch.Tensor, config: BenchConfig, device: torch.device
) -> tuple[float, float, int]:
    params = forward_params(model)
    cache_kw = cache_kwarg(model)
    prompt_len = input_ids.shape[1]

    _sync(device)
    start = time.perf_counter()
    next_tokens, cache = _prefill_with_cache(model, input_ids, params, _new_cache(model, input_ids, config))
    _sync(device)
    ttft = time.perf_counter() - start
    _check_cache(cache, prompt_len, "after prefill")

    steps = config.gen_len - 1
    start = time.perf_counter()
    for _ in range(steps):
        output = model(next_tokens, **{cache_kw: cache}, use_cache=True)
        cache = output_cache(output)
        next_tokens = _logits(output)[:, -1:].argmax(dim=-1)  # greedy, like do_sample=False
    _sync(device)
    decode = time.perf_counter() - start
    _check_cache(cache, prompt_len + steps, "after decoding")
    return ttft, decode, steps


def _pad_token_id(model: nn.Module) -> int:
    gen_config = getattr(model, "generation_config", None)
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(gen_config, attr, None)
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if isinstance(value, int):
            return value
    return 0


def _decode_generate(
    model: nn.Module, input_ids: torch.Tensor, config: BenchConfig, device: torch.device
) -> tuple[float, float, int]:
    params = forward_params(model)
    prompt_len = input_ids.shape[1]

    # The prefill that generate() performs internally, timed on its own so it can be subtracted.
    _sync(device)
    start = time.perf_counter()
    _, cache = _prefill_with_cache(model, input_ids, params, _new_cache(model, input_ids, config))
    _sync(device)
    ttft = time.perf_counter() - start
    _check_cache(cache, prompt_len, "after prefill")
    del cache

    # Count forward calls rather than assume gen_len of them: generate may
    # (e.g. with deferred stop checks) run an extra step.
    calls = 0

    def count(_module: nn.Module, _args: Any) -> None:
        nonlocal calls
        calls += 1

    handle = model.register_forward_pre_hook(count)
    try:
        _sync(device)
        start = time.perf_counter()
        generated = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=config.gen_len,
            min_new_tokens=config.gen_len,  # suppress EOS so every run does the same work
            do_sample=False,
            use_cache=True,
            pad_token_id=_pad_token_id(model),
            **({"cache_implementation": "static"} if config.cache == "static" else {}),
        )
        _sync(device)
        total = time.perf_counter() - start
    finally:
        handle.remove()
    if generated.shape[1] != prompt_len + config.gen_len:
        raise RuntimeError(f"generate produced {generated.shape[1] - prompt_len} tokens, expected {config.gen_len}")

    steps = calls - 1 if calls > 1 else config.gen_len - 1
    decode = total - ttft
    if decode <= 0:
        # Possible only for toy models where generate's overhead is noise; keep numbers finite.
        warnings.warn(f"generate total {total:.3g}s <= prefill {ttft:.3g}s; decode time clamped", stacklevel=2)
        decode = 1e-9
    return ttft, decode, steps


def _run_once(model: nn.Module, input_ids: torch.Tensor, config: BenchConfig, device: torch.device) -> _RunTimes:
    with _PeakMemory(device) as memory:
        _sync(device)
        start = time.perf_counter()
        output = model(input_ids, use_cache=False)
        _sync(device)
        prefill = time.perf_counter() - start
        del output  # release the full logits before decode so they do not inflate its peak

        decode_fn = _decode_manual if config.decode_method == "manual" else _decode_generate
        ttft, decode, steps = decode_fn(model, input_ids, config, device)
    return _RunTimes(prefill, ttft, decode, steps, memory.delta_bytes)


# --------------------------------------------------------------------------- orchestration


def _vocab_size(tokenizer_or_vocab_size: Any, models: Sequence[nn.Module]) -> int:
    if isinstance(tokenizer_or_vocab_size, int):
        vocab = tokenizer_or_vocab_size
    else:
        try:
            vocab = len(tokenizer_or_vocab_size)
        except TypeError:
            vocab = int(tokenizer_or_vocab_size.vocab_size)
    # Never sample an id the (possibly resized) embedding table cannot look up.
    for model in models:
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        rows = getattr(embeddings, "num_embeddings", None)
        if isinstance(rows, int):
            vocab = min(vocab, rows)
    if vocab < 1:
        raise ValueError(f"vocabulary size must be positive, got {vocab}")
    return vocab


def _prepare(model: nn.Module, device: torch.device, dtype: torch.dtype, layout: str = "stock") -> nn.Module:
    model.eval()
    first = next(model.parameters(), None)
    # Only move when needed: a loader that already placed the model should not pay for a copy.
    if first is not None and (first.device != device or first.dtype != dtype):
        model.to(device=device, dtype=dtype)
    apply_layout(model, layout)  # after the move: .to() may hand back fresh, contiguous storage
    return model


def _model_info(model: nn.Module, config: BenchConfig) -> dict[str, Any]:
    return {
        "class": type(model).__name__,
        "num_params": sum(p.numel() for p in model.parameters()),
        "weights_mb": _weights_bytes(model) / _MB,
        "flops_per_token_prefill": flops_per_token(model, config.prompt_len),
        "flops_per_token_decode": flops_per_token(model, config.decode_context_len),
        "flops_breakdown_prefill": flops_breakdown(model, config.prompt_len),
    }


def _summarise(
    runs: list[_RunTimes], warm_peaks: list[int], batch_size: int, config: BenchConfig, weights_mb: float
) -> dict[str, Any]:
    prefill = statistics.median(r.prefill_s for r in runs)
    ttft = statistics.median(r.ttft_s for r in runs)
    decode = statistics.median(r.decode_s for r in runs)
    steps = runs[0].decode_steps
    deltas = warm_peaks + [r.peak_delta_bytes for r in runs if r.peak_delta_bytes is not None]
    # Max, not median: later runs can reuse memory the allocator kept, under-reporting the peak.
    peak_delta_mb = max(deltas) / _MB if deltas else None
    return {
        "prefill_s": prefill,
        "prefill_tokens_per_s": batch_size * config.prompt_len / prefill,
        "ttft_ms": ttft * 1e3,
        "decode_s": decode,
        "decode_steps": steps,
        "decode_tokens_per_s": batch_size * steps / decode,
        # One step emits one token per sequence, so this is the per-token latency a user sees.
        "decode_ms_per_token": decode / steps * 1e3,
        "peak_mem_delta_mb": peak_delta_mb,
        # Estimated standalone footprint: own weights + own activation/KV peak
        # (the absolute device peak would include the other model's weights).
        "peak_mem_mb": None if peak_delta_mb is None else weights_mb + peak_delta_mb,
        "raw": {
            "prefill_s": [r.prefill_s for r in runs],
            "ttft_s": [r.ttft_s for r in runs],
            "decode_s": [r.decode_s for r in runs],
        },
    }


def _measure(
    models: Mapping[str, nn.Module], tokenizer_or_vocab_size: Any, config: BenchConfig
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, dict[str, Any]]]:
    device = torch.device(config.device)
    dtype = config.torch_dtype
    for model in models.values():
        _prepare(model, device, dtype, config.layout)
    vocab = _vocab_size(tokenizer_or_vocab_size, list(models.values()))
    infos = {name: _model_info(model, config) for name, model in models.items()}

    results: list[dict[str, Any]] = []
    total = len(config.batch_sizes) * (config.warmup + config.repeats) * len(models)
    with torch.inference_mode(), tqdm(total=total, desc="bench", disable=not config.progress) as bar:
        for index, batch_size in enumerate(config.batch_sizes):
            generator = torch.Generator().manual_seed(config.seed + index)
            # Same prompt for every model so the comparison differs only in the model.
            input_ids = torch.randint(0, vocab, (batch_size, config.prompt_len), generator=generator).to(device)
            runs: dict[str, list[_RunTimes]] = {name: [] for name in models}
            # Warmup timings are dropped, but its memory peak is the first-touch (most honest) one.
            warm_peaks: dict[str, list[int]] = {name: [] for name in models}
            for repeat in range(config.warmup + config.repeats):
                # Interleave a, b, a, b ... so drift in machine speed affects all models alike.
                for name, model in models.items():
                    bar.set_postfix_str(f"{name} bs={batch_size}")
                    times = _run_once(model, input_ids, config, device)
                    if repeat >= config.warmup:
                        runs[name].append(times)
                    elif times.peak_delta_bytes is not None:
                        warm_peaks[name].append(times.peak_delta_bytes)
                    bar.update(1)
            metrics = {
                name: _summarise(runs[name], warm_peaks[name], batch_size, config, infos[name]["weights_mb"])
                for name in models
            }
            results.append({"batch_size": batch_size, "metrics": metrics})

    header = {**_environment(device, dtype), "config": asdict(config), "names": list(models)}
    return header, results, infos


def benchmark(model: nn.Module, tokenizer_or_vocab_size: Any, config: BenchConfig) -> dict[str, Any]:
    """Measure one model.  Returns a JSON-serialisable dict with the
    environment (device, device_name, torch_threads, dtype, ...), ``models``
    (FLOPs, weights) and ``results``: one entry per batch size whose
    ``metrics["model"]`` holds prefill/decode throughput, latency and memory."""
    header, results, infos = _measure({"model": model}, tokenizer_or_vocab_size, config)
    return {"kind": "benchmark", **header, "models": infos, "results": results}


_THROUGHPUT_METRICS: tuple[tuple[str, str], ...] = (
    ("prefill_tokens_per_s", "flops_per_token_prefill"),
    ("decode_tokens_per_s", "flops_per_token_decode"),
)


def compare(
    model_a: nn.Module,
    model_b: nn.Module,
    tokenizer_or_vocab_size: Any,
    config: BenchConfig,
    names: tuple[str, str] = ("dense", "sliced"),
) -> dict[str, Any]:
    """Measure two models alternately and relate the speed-up to FLOPs.

    For each batch size and throughput metric: ``measured_ratio`` = b / a,
    ``predicted_ratio`` = flops_a / flops_b (FLOPs per token at the prompt
    length for prefill, at the mean decode context for decode) and
    ``measured_over_predicted`` (1.0 = the FLOP reduction fully turned into speed).
    """
    name_a, name_b = names
    if name_a == name_b:
        raise ValueError(f"names must differ, got {names}")
    header, results, infos = _measure({name_a: model_a, name_b: model_b}, tokenizer_or_vocab_size, config)
    for entry in results:
        a, b = entry["metrics"][name_a], entry["metrics"][name_b]
        measured = {metric: b[metric] / a[metric] for metric, _ in _THROUGHPUT_METRICS}
        predicted = {metric: infos[name_a][flops] / infos[name_b][flops] for metric, flops in _THROUGHPUT_METRICS}
        entry["measured_ratio"] = measured
        entry["predicted_ratio"] = predicted
        entry["measured_over_predicted"] = {metric: measured[metric] / predicted[metric] for metric in measured}
    return {"kind": "compare", **header, "models": infos, "results": results}


# --------------------------------------------------------------------------- formatting


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _rows(header: Sequence[str], rows: Iterator[Sequence[str]] | list[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def format_table(result: dict[str, Any]) -> str:
    """Markdown rendering of a :func:`benchmark` or :func:`compare` result."""
    cfg = result["config"]
    lines = [
        f"**{result['device_name']}** ({result['device']}, {result['dtype']}, {result['torch_threads']} threads), "
        f"prompt {cfg['prompt_len']}, gen {cfg['gen_len']}, decode via {cfg['decode_method']}, "
        f"{cfg.get('layout', 'stock')} weight layout, {cfg.get('cache', 'dynamic')} KV cache, "
        f"median of {cfg['repeats']} after {cfg['warmup']} warmup",
        "",
    ]
    lines += _rows(
        ["model", "params (M)", "weights MB", "GFLOPs/token (prefill)", "GFLOPs/token (decode)"],
        [
            [
                name,
                _fmt(info["num_params"] / 1e6, 2),
                _fmt(info["weights_mb"]),
                f"{info['flops_per_token_prefill'] / 1e9:.4g}",
                f"{info['flops_per_token_decode'] / 1e9:.4g}",
            ]
            for name, info in result["models"].items()
        ],
    )
    lines.append("")
    lines += _rows(
        ["batch", "model", "prefill tok/s", "TTFT ms", "decode tok/s", "decode ms/token", "peak mem MB"],
        [
            [
                str(entry["batch_size"]),
                name,
                _fmt(m["prefill_tokens_per_s"]),
                _fmt(m["ttft_ms"], 2),
                _fmt(m["decode_tokens_per_s"]),
                _fmt(m["decode_ms_per_token"], 2),
                _fmt(m["peak_mem_mb"]),
            ]
            for entry in result["results"]
            for name, m in entry["metrics"].items()
        ],
    )
    if result.get("kind") == "compare":
        name_a, name_b = result["names"]
        lines.append("")
        lines += _rows(
            ["batch", "metric", f"measured {name_b}/{name_a}", "predicted (FLOPs)", "measured/predicted"],
            [
                [
                    str(entry["batch_size"]),
                    metric,
                    _fmt(entry["measured_ratio"][metric], 3),
                    _fmt(entry["predicted_ratio"][metric], 3),
                    _fmt(entry["measured_over_predicted"][metric], 3),
                ]
                for entry in result["results"]
                for metric in entry["measured_ratio"]
            ],
        )
    return "\n".join(lines)
