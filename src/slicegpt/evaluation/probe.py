"""``slicegpt plan --measure``: the rates of the machine the plan runs on, timed in seconds.

The plan's default rates (:data:`slicegpt.evaluation.plan.DEFAULT_TFLOPS`) were fitted on one
kind of CPU; another CPU of the same name runs the same work 0.7-2x as fast (a 2-core AMD EPYC
with bfloat16 units against one without: forwards 0.30 against 0.12 TFLOP/s). The probe times,
on the device and in the dtype the run will use, the three rates every other term of the plan is
a share of:

- the forwards: one decoder layer of the model's own shape (its config, one layer, a 256-token
  vocabulary, random weights), run by transformers on one calibration batch, [batch, seqlen];
  FLOPs counted as the plan counts them (:func:`forward_flops_per_token`);
- the moments: :class:`slicegpt.core.refit.Moments` of a batch of MLP activations, [tokens, MLP
  width], against the stream, [tokens, hidden] (float32 products summed in float64);
- float64: :class:`slicegpt.core.pca.Covariance` of a batch of the stream, [tokens, hidden].

Each is run once to warm up, then timed (repeated while under a quarter second, at most 3
times, the fastest kept). Nothing is read from the model's files: the weights are random.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from ..config import SliceConfig, parse_dtype
from ..core.precision import asks_fast_float32, fast_float32
from ..core.pca import Covariance
from ..core.refit import Moments, gram_flops
from .shapes import model_shape

#: The probe's vocabulary: the embeddings and head cost nothing beside the layer.
PROBE_VOCAB = 256
#: Tokens of the statistics' probes (a calibration batch, at most this many) and the widest moments
#: probed: [8192, 8192] float64 is 0.5 GB; the rate is flat from a few thousand columns on.
PROBE_TOKENS = 8192
PROBE_WIDTH = 8192
#: A timed call is repeated while the calls so far took under this many seconds (at most 3 calls).
PROBE_SECONDS = 0.25


@dataclass(frozen=True)
class ProbedRates:
    """Sustained TFLOP/s measured on this machine (see the module's docstring)."""

    device: str
    dtype: str
    fast_float32: bool  # the CPU's float32 products ran through its bfloat16 units
    batch: tuple[int, int]  # the forward's [rows, seqlen]
    forward_tflops: float
    moments_tflops: float
    fp64_tflops: float
    seconds: float  # the probe's own time, building the layer included

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ProbedRates":
        """The rates :meth:`to_dict` wrote (read back from JSON: the batch a list)."""
        return cls(**{**data, "batch": tuple(data["batch"])})


def forward_flops_per_token(layer_params: int, seqlen: int, attention_width: int, layers: int = 1) -> float:
    """A forward's FLOPs per token, as the plan counts them: 2 per layer parameter, and the
    attention's scores and values, 2 x 2 x seqlen x attention width per layer (SDPA computes the
    masked half too)."""
    return 2.0 * layer_params + 4.0 * seqlen * attention_width * layers


def one_layer_config(config: Any) -> Any:
    """A copy of a transformers config with one decoder layer and a :data:`PROBE_VOCAB` vocabulary;
    per-layer lists (``layer_types`` and the like) keep their first entry."""
    one = copy.deepcopy(config)
    layers = int(one.num_hidden_layers)
    for key, value in list(vars(one).items()):
        if isinstance(value, (list, tuple)) and len(value) == layers and layers > 1:
            setattr(one, key, type(value)(value[:1]))
    one.num_hidden_layers = 1
    one.vocab_size = PROBE_VOCAB
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(one, key, None)
        ids = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(i, int) and i >= PROBE_VOCAB for i in ids):
            setattr(one, key, None)
    return one


def _best_seconds(fn: Callable[[], Any], sync: Callable[[], None]) -> float:
    """``fn`` run once to warm up, then timed: the fastest of up to 3 calls, repeated while the
    calls so far took under :data:`PROBE_SECONDS` (a warm-up over 10 s counts as the one timing)."""
    start = time.perf_counter()
    fn()
    sync()
    warm = time.perf_counter() - start
    if warm > 10.0:  # a layer this slow to run is timed well enough by the one call
        return warm
    best, spent = float("inf"), 0.0
    for _ in range(3):
        start = time.perf_counter()
        fn()
        sync()
        took = time.perf_counter() - start
        best, spent = min(best, took), spent + took
        if spent >= PROBE_SECONDS:
            break
    return best


def probe_rates(
    config: Any,
    *,
    device: str | torch.device,
    dtype: torch.dtype,
    batch_size: int,
    seqlen: int,
    fast: bool = False,
    seed: int = 0,
) -> ProbedRates:
    """Time the forward, moments and float64 rates of slicing a model of ``config`` (a transformers
    config) on ``device`` in ``dtype``, batches of ``batch_size`` rows of ``seqlen`` tokens;
    ``fast``: the CPU's fast float32 products, as the run would use them."""
    from transformers import AutoModelForCausalLM

    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--measure times the run's device here, and this machine has no {device}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--measure times the run's device here, and this machine has no mps device")

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    began = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(one_layer_config(config), dtype=dtype).eval()
    shape = model_shape(model)
    ids = torch.randint(0, PROBE_VOCAB, (batch_size, seqlen), generator=generator).to(device)
    mask = torch.ones_like(ids)

    layer = [model]  # emptied after the forward's timing: the layer's memory goes before the moments'
    del model

    def forward() -> None:
        layer[0](input_ids=ids, attention_mask=mask, use_cache=False)

    with torch.no_grad(), fast_float32(fast) as used:
        seconds = _best_seconds(forward, sync)
        forward_rate = forward_flops_per_token(shape.layer_params, seqlen, shape.attention_width) * ids.numel()
        forward_rate /= seconds
        layer.clear()

        tokens = min(batch_size * seqlen, PROBE_TOKENS)
        d, width = shape.hidden, min(shape.intermediate, PROBE_WIDTH)
        activations = torch.randn(tokens, width, generator=generator).to(device)  # [tokens, MLP width]
        stream = torch.randn(tokens, d, generator=generator).to(device)  # [tokens, hidden]
        moments = (
            (gram_flops(width) + 2.0 * width * d)
            * tokens
            / _best_seconds(lambda: Moments().add(activations, stream), sync)
        )
        covariance = Covariance(d, device=device)
        fp64 = gram_flops(d) * tokens / _best_seconds(lambda: covariance.add(stream, None), sync)
    return ProbedRates(
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        fast_float32=used,
        batch=(batch_size, seqlen),
        forward_tflops=forward_rate / 1e12,
        moments_tflops=moments / 1e12,
        fp64_tflops=fp64 / 1e12,
        seconds=time.perf_counter() - began,
    )


def probe_run(
    model_config: Any, run: SliceConfig, *, device: str | None = None, seqlen: int | None = None
) -> ProbedRates:
    """:func:`probe_rates` for a slicing run's settings: its dtype, one calibration batch
    (``batch_size`` rows, at most ``nsamples``), the fast float32 products where it asks for them;
    ``device`` and ``seqlen`` where the run's differ from the settings' (a device map's first
    device, a context shorter than ``seqlen``)."""
    return probe_rates(
        model_config,
        device=device or run.device,
        dtype=parse_dtype(run.dtype),
        batch_size=min(run.batch_size, run.nsamples),
        seqlen=seqlen or run.seqlen,
        fast=asks_fast_float32(run),
    )
