"""``slicegpt plan --measure``: the rates of the machine the plan runs on, timed in seconds.

The plan's default rates (:data:`slicegpt.evaluation.plan.DEFAULT_TFLOPS`) were fitted on one
kind of CPU; another CPU of the same name runs the same work 0.7-2x as fast (a 2-core AMD EPYC
with bfloat16 units against one without: forwards 0.30 against 0.12 TFLOP/s). The probe times,
on the device and in the dtype the run will use, three product rates (the eigendecompositions
and the host's terms stay shares of them or constants):

- the forwards: one decoder layer of the model's own shape (its config, one layer, a 256-token
  vocabulary, random weights) on one calibration batch, [batch, seqlen], called as the run calls
  its layers: alone, on the inputs the model hands it (:func:`slicegpt.core.capture.capture_layer_inputs`),
  its masks and rotary tables made once, not per call; FLOPs counted as the plan counts them
  (:func:`forward_flops_per_token`);
- the moments: :class:`slicegpt.core.refit.Moments` of a batch of MLP activations, [tokens, MLP
  width], against the stream, [tokens, hidden] (float32 products summed in float64);
- float64: :class:`slicegpt.core.pca.Covariance` of a batch of the stream, [tokens, hidden];

and, for the terms whose rate is not the rate of a product alone, the package's own functions at
the model's widths:

- the refits' solves (:func:`slicegpt.core.refit.ridge`, in the dtype the refits solve in): the
  final solve on the writer's output rows (the all-rows sum made from the fit and held-out sums,
  as the run makes it), and a ridge strength tried (a solve and its held-out error), each at
  :data:`SOLVE_WIDTHS` kept inputs. LAPACK's rate grows with the width up to a few thousand, so
  one rate does not serve both a 0.5B model's writers (about 900 to 2,400 inputs) and a 70B
  model's (about 20,000): :class:`WidthRate` reads between the widths;
- the greedy neuron selection (:func:`slicegpt.core.neurons.greedy_order`), taking
  :data:`SELECTION_PICKS` neurons of at most :data:`SELECTION_WIDTH` against the model's hidden
  width and against a narrow target: the rate of its products (memory-bound passes over the
  residual and the factor) and its cost per neuron taken (small steps one pick at a time), which
  another machine scales differently;
- the rotations (:func:`slicegpt.core.ops.rotate_inputs`): :data:`ROTATE_ROWS` rows of a weight
  of the model's dtype turned into a basis of three quarters of the hidden width, the float64
  conversions included.

Each is run once to warm up, then timed (repeated while under a quarter second, at most 3
times, the fastest kept). Nothing is read from the model's files: the weights are random.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..arch import spec_for_config
from ..config import SliceConfig, parse_dtype
from ..core.capture import capture_layer_inputs
from ..core.neurons import greedy_order, selection_flops
from ..core.ops import rotate_inputs
from ..core.precision import asks_fast_float32, fast_float32
from ..core.pca import Covariance
from ..core.refit import Moments, error, gram_flops, ridge, strength_row_count
from ..core.surgery import get_layers
from ..data import Rows
from .shapes import model_shape

#: The probe's vocabulary: the embeddings and head cost nothing beside the layer.
PROBE_VOCAB = 256
#: Tokens of the statistics' probes (a calibration batch, at most this many) and the widest moments
#: probed: [8192, 8192] float64 is 0.5 GB; the rate is flat from a few thousand columns on.
PROBE_TOKENS = 8192
PROBE_WIDTH = 8192
#: A timed call is repeated while the calls so far took under this many seconds (at most 3 calls).
PROBE_SECONDS = 0.25
#: The kept widths the refits' solves are timed at. Measured on a 2-core Xeon (AVX-512), a float64
#: solve with 8192 right-hand sides ran at 0.057 TFLOP/s with 1024 inputs, 0.103 with 4096 and
#: 0.104 with 12,000; a float32 strength tried on 256 rows at 0.10, 0.14 and 0.19: flat or rising
#: past the widest, so reading it flat there plans a 70B model's solves a little slow, not fast.
SOLVE_WIDTHS = (1024, 4096)
#: The final solve is timed on at most this many output rows (its rate is that of the triangular
#: solves, flat from about a thousand right-hand sides on): a 70B model's 8192 would take seconds.
SOLVE_PROBE_ROWS = 2048
#: The selection probe takes this many neurons of at most this many (a random [n, n] moment).
SELECTION_WIDTH = 4096
SELECTION_PICKS = 1024
#: ... against the model's hidden width, then against a target this narrow (the picks' cost alone).
SELECTION_NARROW = 16
#: Rows of the weight the rotation probe turns (the package turns weights 8192 rows at a time).
ROTATE_ROWS = 1024


@dataclass(frozen=True)
class WidthRate:
    """TFLOP/s measured at a few widths: read on the log-log line between two of them, along the
    first segment's slope below the narrowest (clamped to between 0 and 1), flat above the widest."""

    widths: tuple[int, ...]
    tflops: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.widths) != len(self.tflops) or not self.widths:
            raise ValueError("a WidthRate needs one rate per width")
        if list(self.widths) != sorted(set(self.widths)) or min(self.tflops) <= 0:
            raise ValueError("a WidthRate's widths must rise and its rates be positive")

    def at(self, n: float) -> float:
        """The rate at width ``n`` (TFLOP/s)."""
        w, r = self.widths, self.tflops
        if n >= w[-1] or len(w) == 1:
            return r[-1] if n >= w[-1] else r[0]
        j = max(1, next(i for i, width in enumerate(w) if width > n))
        slope = math.log(r[j] / r[j - 1]) / math.log(w[j] / w[j - 1])
        if n < w[0]:  # below the narrowest: a rate that neither rises there nor falls faster than the width
            return r[0] * (n / w[0]) ** min(max(slope, 0.0), 1.0)
        return r[j] * (n / w[j]) ** slope

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "WidthRate | None":
        return None if data is None else cls(tuple(data["widths"]), tuple(data["tflops"]))


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
    # measured since 2026-12-07 (None in older records: the plan then uses shares of the rates above)
    final_solve: WidthRate | None = None  # the refits' final solve, by kept width
    trial_solve: WidthRate | None = None  # a ridge strength tried (solve and held-out error), by kept width
    rotate_tflops: float | None = None  # turning weights into the sliced basis (float64)
    selection_tflops: float | None = None  # the greedy selection's products
    pick_seconds: float | None = None  # the greedy selection's cost per neuron taken, beside its products

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ProbedRates":
        """The rates :meth:`to_dict` wrote (read back from JSON: the batch a list)."""
        return cls(
            **{
                **data,
                "batch": tuple(data["batch"]),
                "final_solve": WidthRate.from_dict(data.get("final_solve")),
                "trial_solve": WidthRate.from_dict(data.get("trial_solve")),
            }
        )


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


def symmetric_positive(n: int, device: torch.device, generator: torch.Generator) -> torch.Tensor:
    """A random [n, n] float64 matrix, symmetric and diagonally dominant (so positive definite),
    made in O(n^2): what a solve's speed depends on is its size, not its values."""
    a = torch.rand(n, n, generator=generator, dtype=torch.float64)
    return ((a + a.t()) / n + 2.0 * torch.eye(n, dtype=torch.float64)).to(device)


def solve_rates(
    d: int,
    widest: int,
    trial_dtype: torch.dtype,
    device: torch.device,
    sync: Callable[[], None],
    generator: torch.Generator,
) -> tuple[WidthRate, WidthRate]:
    """(the final solve's rate, a strength tried's rate), both solved in ``trial_dtype`` as the
    refits solve (:func:`slicegpt.core.refit.refit`), each a :class:`WidthRate` over
    :data:`SOLVE_WIDTHS` kept inputs (none wider than ``widest``, the model's widest writer), for
    a writer with ``d`` output rows: FLOPs as the plan counts them (the final solve 1/3 n^3 +
    2 n^2 rows, a strength tried 1/3 n^3 + 4 n^2 rows on the rows :func:`strength_row_count` tries)."""
    final_rows, tried_rows = min(d, SOLVE_PROBE_ROWS), strength_row_count(d)
    widths = tuple(sorted({min(w, widest) for w in SOLVE_WIDTHS}))
    finals, trials = [], []
    for n in widths:
        cov = symmetric_positive(n, device, generator)
        cross = torch.randn(n, final_rows, generator=generator, dtype=torch.float64).to(device)  # [n, rows]
        w0 = torch.randn(final_rows, n, generator=generator, dtype=torch.float64).to(device)  # [rows, n]
        held, some = cov.to(trial_dtype), cross[:, :tried_rows].to(trial_dtype)

        def trial() -> float:
            return error(ridge(cov, cross[:, :tried_rows], w0[:tried_rows], 0.1, trial_dtype), held, some)

        seconds = _best_seconds(lambda: ridge(cov, cross, w0, 0.1, trial_dtype, extra=held), sync)
        finals.append((n**3 / 3 + 2.0 * n * n * final_rows) / seconds / 1e12)
        trials.append((n**3 / 3 + 4.0 * n * n * tried_rows) / _best_seconds(trial, sync) / 1e12)
    return WidthRate(widths, tuple(finals)), WidthRate(widths, tuple(trials))


def selection_rates(
    width: int, d: int, dtype: torch.dtype, device: torch.device, sync: Callable[[], None], generator: torch.Generator
) -> tuple[float, float]:
    """(TFLOP/s of the greedy selection's products, seconds per neuron taken) for an MLP of
    ``width`` neurons writing a ``d``-wide stream, selecting in ``dtype``: :func:`greedy_order`
    timed taking the same neurons against a ``d``-wide target and a :data:`SELECTION_NARROW` one
    (the same picks, a fraction of the products), the two times split between the two costs."""
    n = min(width, SELECTION_WIDTH)
    k = min(SELECTION_PICKS, n)
    cov = symmetric_positive(n, device, generator)  # [n, n]
    none = torch.empty(0, device=device)  # the target's weight: unused where its cross moment is given
    times, flops = [], []
    for cols in (d, SELECTION_NARROW):
        cross = torch.randn(n, cols, generator=generator, dtype=torch.float64).to(device)  # [n, cols]
        times.append(_best_seconds(lambda: greedy_order(cov, none, k, cross=cross, dtype=dtype), sync))
        flops.append(selection_flops(n, k, cols))
    # t = flops x s + k x p for both; the wide run's extra time is its extra products (at least a
    # tenth of its time: two timings this close say little more than that)
    per_flop = max(times[0] - times[1], 0.1 * times[0]) / max(flops[0] - flops[1], 1.0)
    per_pick = max(times[1] - flops[1] * per_flop, 0.0) / k
    return 1.0 / per_flop / 1e12, per_pick


def rotate_rate(
    d: int, dtype: torch.dtype, device: torch.device, sync: Callable[[], None], generator: torch.Generator
) -> float:
    """TFLOP/s of :func:`slicegpt.core.ops.rotate_inputs` turning [ROTATE_ROWS, d] weights of
    ``dtype`` into a basis of 3/4 of ``d`` (2 x kept width FLOPs per element, as the plan counts)."""
    kept = max(1, 3 * d // 4)
    q = torch.randn(d, d, generator=generator, dtype=torch.float64).to(device)  # [D, D]: any basis but the identity
    base = torch.randn(ROTATE_ROWS, d, generator=generator).to(device=device, dtype=dtype)
    layer = nn.Linear(d, ROTATE_ROWS, bias=False, device="meta")

    def turn() -> None:
        layer.weight = nn.Parameter(base.clone(), requires_grad=False)  # turned in place: a fresh copy each time
        rotate_inputs([layer], q, kept)

    return 2.0 * kept * ROTATE_ROWS * d / _best_seconds(turn, sync) / 1e12


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
    ids = torch.randint(0, PROBE_VOCAB, (batch_size, seqlen), generator=generator)
    # The layer is timed as the run calls it: alone, on what the model hands it. Timing the
    # one-layer model instead charged its embeddings, masks, rotary tables and head to the layer,
    # which the run pays once per batch, not per layer: on SmolLM2's shape 0-11% of the call
    # (same process), the forward read 4.5% faster on average (five fresh processes each way).
    spec = spec_for_config(model.config)
    inputs = capture_layer_inputs(model, spec, Rows(ids, torch.ones_like(ids)), batch_size, device)
    args, kwargs = inputs.layer_call(0, 0, device)
    hidden = inputs.hidden[0].to(device)  # [batch, seqlen, hidden]
    layer = [get_layers(model, spec)[0]]  # emptied after the forward's timing: its memory goes before the moments'
    del model, inputs

    def forward() -> None:
        layer[0](hidden, *args, **kwargs)

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
        # the refits solve in the moments' product dtype (core.refit.product_dtype)
        trial_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        final, trial = solve_rates(d, max(d, shape.intermediate), trial_dtype, device, sync, generator)
        selection, pick = selection_rates(shape.intermediate, d, trial_dtype, device, sync, generator)
        rotate = rotate_rate(d, dtype, device, sync, generator)
    return ProbedRates(
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        fast_float32=used,
        batch=(batch_size, seqlen),
        forward_tflops=forward_rate / 1e12,
        moments_tflops=moments / 1e12,
        fp64_tflops=fp64 / 1e12,
        seconds=time.perf_counter() - began,
        final_solve=final,
        trial_solve=trial,
        rotate_tflops=rotate,
        selection_tflops=selection,
        pick_seconds=pick,
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
