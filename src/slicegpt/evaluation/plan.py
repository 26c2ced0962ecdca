"""``slicegpt plan``: what slicing a model will cost, before anything is loaded.

From config.json and the safetensors headers (or the shard index) only: the model's parameters
and size on disk, the sliced model's exact parameter count (the budget counter's meta skeleton,
the width policies slicing uses), and estimates of the peak host and device memory of in-memory
and streaming slicing and of the time.

The estimates are pure functions of a few numbers (:class:`ModelShape`, :class:`Workload`,
:class:`Throughput`), so they can be tested alone and set beside measured runs. They are models,
not measurements: every term is named in :class:`MemoryEstimate` and :class:`TimeEstimate` with
what it stands for. "GB" is 1e9 bytes throughout.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from ..arch import spec_for_config
from ..config import SliceConfig, parse_device_map, parse_dtype
from ..core import uniform
from ..core.allocate import SHARES
from ..core.neurons import selection_flops
from ..core.sizing import plan_widths
from ..core.precision import asks_fast_float32, bfloat16_units, fast_float32_available
from ..core.refit import gram_flops, strength_row_count
from ..core.spread import SPREAD_ROWS
from ..core.surgery import count_parameters
from ..core.widths import Widths
from ..data import clip_seqlen
from .probe import ProbedRates, WidthRate, forward_flops_per_token, probe_run
from .shapes import ModelShape, model_shape
from ..io.headers import ModelFiles, read_model_files
from ..sources import AUTO, chat_calibration

GB = 1e9

#: Python, torch, transformers and slicegpt imported: 0.45 GB RSS measured here (CPU torch 2.13),
#: plus what a first forward adds (kernels, thread pools).
RUNTIME_BASELINE_BYTES = 0.6 * GB

#: Sustained TFLOP/s assumed when --tflops / --fp64-tflops are not given: conservative figures
#: per device kind, for matrix products in the model's dtype and for the float64 statistics,
#: eigendecompositions and solves. A GPU without fast float64 (consumer cards) is far slower in
#: float64 than assumed here: pass --fp64-tflops.
DEFAULT_TFLOPS: dict[str, dict[str, float]] = {
    # cpu: float32 measured on a 2-core AMD EPYC, SmolLM2's calibration forwards at 0.16 (benchmarks/
    # cost_phases.py); half types assumed no faster (torch runs them no faster on most CPUs)
    "cpu": {"bfloat16": 0.16, "float16": 0.16, "float32": 0.16, "float64": 0.1},
    "cuda": {"bfloat16": 100.0, "float16": 100.0, "float32": 20.0, "float64": 10.0},
    "mps": {"bfloat16": 5.0, "float16": 5.0, "float32": 5.0, "float64": 0.5},
}
#: The CPU's float32 rates with ``fast_matmul`` on a CPU with bfloat16 units (slicegpt.core.precision):
#: forwards and the moments' products, fitted on benchmarks/cost_phases.py's six runs of SmolLM2
#: and Qwen2.5-Coder-0.5B with them (a 2-core AMD EPYC; forwards 0.30-0.35, moments 0.37-0.42;
#: the same machine ran IEEE float32 forwards at 0.19).
FAST_CPU_FLOAT32_TFLOPS = 0.32
FAST_CPU_MOMENTS_TFLOPS = 0.39
#: A CPU without those units (oneDNN's bfloat16 path) runs a half model's products through
#: torch's generic kernels: measured on a 2-core AMD EPYC with AVX2 alone, torch 2.13, one
#: thread, (1024 x 896) @ (896 x 4864): bfloat16 4.2 and float16 5.1 GFLOP/s against float32's 33.
HALF_WITHOUT_UNITS_SLOWDOWN = 8.0
DEFAULT_DISK_GBPS = 1.0

# Closed-form corrections try about this many ridge strengths per writer (each a solve and a
# held-out error; the walk of refit.choose_strength, measured by benchmarks/ridge_search.py:
# 4.2 on SmolLM2's writers), then solve once more on all rows.
RIDGE_TRIED = 4.5
#: The refits' float64 solves run at this share of the float64 rate (--fp64-tflops), measured here:
#: 77-92 GFLOP/s on SmolLM2's and Qwen2.5-Coder-0.5B's writers (benchmarks/cost_phases.py, the
#: runs with fast float32 products, when every strength tried was a float64 solve too), against
#: the covariances' 100-110. An earlier machine of the same kind ran them at 61-74 (and 59 on a
#: 7B-shaped layer's, cost_width.py): 0.8 is within 25% of both.
SOLVE_EFFICIENCY = 0.8
#: A float32 or half model's refits are float32 solves (core.refit.refit: the strengths tried,
#: each a solve and a held-out error, and the final solve): this share of the float32 products'
#: rate (the moments'). Fitted on the strengths tried alone, when the final solves were float64,
#: with fast float32 products (benchmarks/cost_phases.py, cost_width.py): 0.50 on
#: Qwen2.5-Coder-0.5B's writers (refits 20 s, the final float64 solves at the rate above), 0.40
#: on a 7B-shaped layer's (42 s).
SOLVE_FLOAT32_EFFICIENCY = 0.45
#: The greedy selection runs in float32 (core.neurons.selection_dtype), the kept neurons' and the
#: spreading walk's curves (a selection to every width) alike. Its products are thin (a round of
#: 16 neurons against the rows not yet taken: a pass over their residual and one over their
#: factor per round), so bound by memory: this share of the float32 products' rate (the moments'
#: rate), and beside it a cost per neuron taken for the round's small steps one pick at a time (a
#: shortlist's norms, an argmax, a rank-one update: host-bound, not scaled by the rates). Both
#: fitted on the live-row rounds (benchmarks/cost_phases.py, 32 rows, a 2-core AMD EPYC without
#: bfloat16 units; the moments' rate probed in each run, 0.17 TFLOP/s): SmolLM2's uniform and
#: per-layer selections (7 and 20 s; 26k and 72k picks) and Qwen2.5-Coder-0.5B's (40 and 112 s;
#: 58k and 175k picks), all four within 4%. The pick cost dominates a narrow model's selection
#: (SmolLM2, 1536 neurons); the products a wide one's. (The 33 us per pick fitted before was
#: SmolLM2's share seen through a 1.6x faster machine and the former rounds: it planned SmolLM2's
#: selections at 0.35-0.4 of their time here.)
SELECTION_EFFICIENCY = 0.19
GREEDY_PICK_SECONDS = 2.1e-4
#: LAPACK's symmetric eigendecomposition (10 x hidden^3 flops counted) runs at this share of the
#: float64 rate: measured on one-layer models here (benchmarks/cost_width.py, SliceGPT alone):
#: 1.31 s at hidden 2048, 9.1 and 10.1 s at 4096, against 0.86 and 6.9 s at the full rate.
EIGH_EFFICIENCY = 0.7
#: Rotating the weights into the sliced basis (core.ops: every matrix that reads or writes the
#: stream times Q[:, :d], 2 x d flops per element, in float64) runs at this share of the float64
#: rate. Measured here (benchmarks/cost_width.py, cost_phases.py, "rotate and slice"): 0.11
#: TFLOP/s on a 7B-shaped layer's 1.2 TFLOP (11 s), about 0.1 on SmolLM2's and Qwen's, i.e. the
#: covariances' rate. It grows with width x parameters: 2% of SliceGPT alone on Qwen2.5-0.5B, a
#: third of it on a 7B-shaped layer.
ROTATE_EFFICIENCY = 1.0
#: What a run spends outside its arithmetic (fusing the norms, copies, the data, bookkeeping): a
#: fixed part and a part per stored parameter, and with corrections per element of the streams
#: each layer moves (the reference stream, the dense layer's outputs, what the writers read).
#: Fitted here without the rotations (above; they were counted here until a 7B-shaped layer showed
#: them growing with the width): SmolLM2 4.4-6.8 s (SliceGPT at 8 to 128 rows, fast products),
#: Qwen2.5-Coder-0.5B 11-13 s; the budget's grows 4 s from 8 to 32 rows on SmolLM2.
OTHER_SECONDS = 2.5
OTHER_SECONDS_PER_PARAM = 1.6e-8
OTHER_SECONDS_PER_STREAM_ELEMENT = 9e-9


@dataclass(frozen=True)
class Workload:
    """The run: calibration rows x seqlen tokens, batch rows per forward, the model dtype's bytes,
    which passes run, across ``nproc`` processes (each with ``rows / nproc`` rows and one device).

    ``uniform``: one rotation: a statistics-only pooling walk first (none when the stream keeps
    its width), then a walk that runs calibration only to prune neurons or refit; per-layer mode
    runs one walk that gathers a covariance at every point. ``kept_neurons``: per layer after
    pruning (None: none pruned). ``residual_width``: the sliced stream's width. ``compressions``:
    whole compressions run (1; with --search one per candidate, then the chosen one).
    """

    rows: int
    seqlen: int
    batch_size: int
    dtype_bytes: int
    corrections: bool
    kept_neurons: int | None
    residual_width: int
    hidden: int
    uniform: bool = False
    nproc: int = 1
    device_is_host: bool = True
    compressions: int = 1
    spread_rows: int = 0  # rows of the per-layer budget's spreading walk (0: none)

    @property
    def rows_per_process(self) -> int:
        return -(-self.rows // self.nproc)

    @property
    def tokens(self) -> int:
        return self.rows * self.seqlen

    @property
    def prunes(self) -> bool:
        return self.kept_neurons is not None

    @property
    def pooling_walk(self) -> bool:
        """Uniform mode's statistics-only walk (skipped when only MLP neurons go)."""
        return self.uniform and self.residual_width < self.hidden

    @property
    def compressing_walk(self) -> bool:
        """Does the walk that slices run calibration forwards?"""
        return not self.uniform or self.prunes or self.corrections

    @property
    def keeps_basis(self) -> bool:
        """A budget on MLP neurons alone (the residual width whole): nothing is rotated, no
        covariance gathered."""
        return self.prunes and self.residual_width >= self.hidden

    @property
    def covariance_walks(self) -> int:
        if self.keeps_basis:
            return 0
        return 1 if (self.pooling_walk or not self.uniform) else 0

    def eigh_points(self, points_per_layer: int, layers: int) -> int:
        """Eigendecompositions: every point and the embedding's per-layer; the pooled one in uniform mode."""
        if self.keeps_basis:
            return 0
        if self.uniform:
            return 1 if self.pooling_walk else 0
        return 1 + points_per_layer * layers


@dataclass(frozen=True)
class Throughput:
    """Sustained rates: matrix products in the model's dtype, float64 work, disk read and write."""

    tflops: float
    fp64_tflops: float
    disk_gbps: float = DEFAULT_DISK_GBPS
    fp32_tflops: float | None = None  # the moments' float32 products (None: ``tflops``)
    # measured by plan --measure (None: shares of the rates above, SOLVE_EFFICIENCY and the like)
    final_solve: WidthRate | None = None  # the refits' final solves, by kept width
    trial_solve: WidthRate | None = None  # the ridge strengths tried, by kept width
    rotate_tflops: float | None = None  # the weights turned into the sliced basis
    selection_tflops: float | None = None  # the greedy selection's products
    pick_seconds: float | None = None  # the greedy selection's cost per neuron taken

    @property
    def moments_tflops(self) -> float:
        return self.fp32_tflops or self.tflops


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak memory of one slicing process, in bytes, by term.

    Host, both modes:
      baseline           python + torch + transformers (RUNTIME_BASELINE_BYTES).
      fp64_workspace     2 x the largest weight x 8: a weight is rotated in float64 (the weight
                         converted, and the product) before it is cast back.
      activations        rows / nproc x seqlen x hidden x dtype bytes, the calibration stream
                         the walk carries between layers; x4 with corrections (the compressed
                         stream, the dense reference stream, and the dense layer's two outputs,
                         after attention and after the MLP, held through the layer), plus what
                         the MLP's writer read in its refit pass (x intermediate / hidden), kept
                         so that the pass after the refit runs the writer alone.
      call_arguments     what each batch hands every layer: a boolean causal mask
                         (batch x seqlen^2) and rotary cos/sin (2 x batch x seqlen x head_dim,
                         float32), shared across layers: rows / nproc x (seqlen^2 + 8 seqlen head_dim).
    In-memory:
      model              every weight in the model's dtype, plus one embedding table when a
                         tied head is untied (slicing writes the head separately), plus every
                         weight once more: transformers 5 maps the checkpoint file, and the
                         mapped pages the folds read count in RSS beside the folded copies (measured: 12.6 GB for a
                         5.9 GB float32 model, benchmarks/stream_large.py).
    Streaming:
      non_layer          embeddings, final norm and head in the model's dtype; a tied head
                         counted twice (cloned when untied).
      layers             3 x the largest decoder layer: the layer as read, its folded copy and
                         the sliced result.
    Device (one per process; on the host itself when --device cpu, added to both host peaks):
      layer              the decoder layer being processed, in the model's dtype.
      fp64_squares       5 x hidden^2 x 8: the covariance sum and its damped copy (eigh), and
                         the bases q_in, q_mid, q_out of the layer.
      batch              one batch in float32: batch x seqlen x max(hidden, intermediate) x 4
                         bytes x 4 (the branch's intermediates), plus its float64 copy for the
                         covariance (batch x seqlen x hidden x 8).
      moments            with corrections or neuron pruning, the MLP writer's moments: the fit
                         rows' float64 sum and the held-out batch's in the products' precision p
                         (4 bytes, 8 for a float64 model), intermediate^2 x (8 + p); with pruning,
                         plus the greedy choice's factor [intermediate, kept] x p (the refit on
                         the kept neurons holds kept^2 x (8 + 2 p), less); with corrections alone,
                         plus the all-rows sum in the refit's precision p, factored in place,
                         intermediate^2 x p; plus
                         intermediate x hidden x (8 + p) (cross moments). Measured on CPU
                         (tests/core/test_budget.py): the sums and at most about half an [n, n]
                         float64 beside them.
      kept               with --device-map over k devices, the sliced layers each keeps: the
                         sliced model / k (the largest share: k does not divide the layers evenly,
                         and the first device also holds the embeddings).
    Not modelled: allocator fragmentation (glibc trims after each layer), attention scores
    (SDPA keeps no seqlen^2 matrix per head), the tokenizer, the search's candidate copies
    (added as one more model in memory with --search).
    """

    baseline: float
    fp64_workspace: float
    activations: float
    call_arguments: float
    model: float
    non_layer: float
    layers: float
    device_layer: float
    device_fp64_squares: float
    device_batch: float
    device_moments: float
    device_is_host: bool
    search_copy: float = 0.0
    device_kept: float = 0.0

    @property
    def device_peak(self) -> float:
        return self.device_layer + self.device_fp64_squares + self.device_batch + self.device_moments + self.device_kept

    def _on_host(self) -> float:
        # On the CPU the "device" is the host: its workspace adds to the host (the layer is already counted there).
        return self.device_peak - self.device_layer if self.device_is_host else 0.0

    @property
    def host_in_memory(self) -> float:
        return (
            self.baseline
            + self.model
            + self.fp64_workspace
            + self.activations
            + self.call_arguments
            + self.search_copy
            + self._on_host()
        )

    @property
    def host_streaming(self) -> float:
        return (
            self.baseline
            + self.non_layer
            + self.layers
            + self.fp64_workspace
            + self.activations
            + self.call_arguments
            + self._on_host()
        )

    def to_dict(self) -> dict[str, float]:
        out = {k: v for k, v in asdict(self).items() if k != "device_is_host"}
        out.update(
            host_in_memory=self.host_in_memory,
            host_streaming=self.host_streaming,
            device_peak=0.0 if self.device_is_host else self.device_peak,
        )
        return out


def memory_model(shape: ModelShape, work: Workload) -> MemoryEstimate:
    """Peak host and device memory of one slicing process (see :class:`MemoryEstimate` for each term)."""
    b = work.dtype_bytes
    rows = work.rows_per_process
    token_bytes = rows * work.seqlen * shape.hidden * b
    # with corrections: 4 streams, and what the MLP's writer read in its refit pass (intermediate wide)
    copies = 4 + shape.intermediate / shape.hidden if work.corrections else 1
    i, d = shape.intermediate, shape.hidden
    p = 8 if b == 8 else 4  # the moments' products, and the held-out sums (core.refit.FitMoments)
    batch_tokens = min(work.batch_size, rows) * work.seqlen
    model_bytes = (shape.params + (shape.table_params if shape.tied else 0)) * b
    return MemoryEstimate(
        baseline=RUNTIME_BASELINE_BYTES,
        fp64_workspace=2 * shape.largest_tensor * 8,
        activations=copies * token_bytes,
        call_arguments=rows * (work.seqlen**2 + 8 * work.seqlen * shape.head_dim),
        model=model_bytes + shape.params * b,  # the prepared weights, and the mapped checkpoint's
        non_layer=(shape.non_layer_params + (shape.table_params if shape.tied else 0)) * b,
        layers=3 * shape.largest_layer_params * b,
        device_layer=shape.largest_layer_params * b,
        device_fp64_squares=5 * d * d * 8,
        device_batch=batch_tokens * max(d, i) * 4 * 4 + batch_tokens * d * 8,
        # with routed experts pruned, every expert's fit and held-out sums are held at once
        device_moments=(
            (
                (
                    max((8 + p) * i + p * work.kept_neurons, (8 + 2 * p) * work.kept_neurons**2 / i)
                    if work.prunes
                    else (8 + 2 * p) * i
                )
                * i
                + (8 + p) * i * d
            )
            + (2 * i * i * 8 * (shape.experts - 1) if work.prunes else 0)
            if (work.corrections or work.prunes)
            else 0.0
        ),
        device_is_host=work.device_is_host,
        search_copy=model_bytes if work.compressions > 1 else 0.0,
    )


@dataclass(frozen=True)
class TimeEstimate:
    """Seconds, by term (all divided by the throughput given; FLOPs are recorded too).

      forward        calibration forwards of the decoder layers in the model's dtype:
                     2 x layer parameters x tokens x passes, passes per compressing walk = 1 (the
                     attention pass and the MLP pass make one forward of the layer), 2 with
                     corrections (the dense layer, then each branch's refit pass; the pass after
                     a refit runs the refit writers alone on what they read: 2 x (hidden +
                     kept neurons) x hidden per token; the refit passes stop at their writers
                     after the first batch: 2 x (hidden + intermediate) x hidden per token fewer
                     there, hidden alone for routed experts);
                     +1 per statistics-only pooling walk
                     (uniform) and per spreading walk (per-layer budget, over its 8 rows);
                     attention's scores and values add 4 x seqlen x heads x head_dim per token
                     and layer to each pass; plus the rotations back to the original basis
                     (6 x hidden^2 per token per layer per compressing pass, none where the basis
                     is kept: a budget on MLP neurons alone). Divided over --nproc.
                     MoE layers are charged for every expert (conservative).
      statistics     accumulation per token and layer (x^T x: 2 n^2, about n^2 + 256 n from
                     n = 257 on, taken in bands of 256 rows from the diagonal rightwards):
                     float64 covariances at n = hidden per PCA point; with corrections/pruning
                     the writers' moments x^T x + 2 n x hidden for n = hidden (attention) and
                     intermediate (MLP), in float32 products (at
                     the dtype's rate: float32 on a GPU is the model's rate / 5 for half
                     models, taken as the float32 rate here); the spreading walk's MLP moments
                     over its rows. Divided over --nproc.
      eigh           10 x hidden^3 float64 per eigendecomposition (one per PCA point, plus the embedding's),
                     at EIGH_EFFICIENCY x the float64 rate.
      rotations      the weights turned into the sliced basis, in float64: 2 x residual width flops
                     per element of every layer matrix and of the embeddings and head (a tied head
                     once in uniform mode, twice where per-layer slicing unties it), at
                     ROTATE_EFFICIENCY x the float64 rate; none where the basis is kept.
      solves         corrections: per writer about 4.5 ridge strengths tried (a solve, Cholesky 1/3 n^3 + 2 n^2
                     r, and a held-out error, 2 n^2 r, each, on r = about 256 of the hidden
                     output rows where hidden is 2,048 or more, all of them below) and the final
                     solve on all; n = the kept neurons for the MLP. All in float32 for a float32
                     or half model (SOLVE_FLOAT32_EFFICIENCY x the moments' float32 rate), in
                     float64 for a float64 one (SOLVE_EFFICIENCY x the float64 rate).
      selection      pruning: the greedy neuron selection of k of n = intermediate neurons, each
                     round over the rows not yet taken (2 (n k^2 / 2 - k^3 / 3) + 2 hidden
                     (n k - k^2 / 2), plus the dead rows carried until they are cut), and
                     with spreading once more to every width (k = n), in float32: at
                     SELECTION_EFFICIENCY x the moments' float32 rate plus GREEDY_PICK_SECONDS per
                     neuron taken.
                     Neither term is divided: every process (or the reducing one) does them.
      other          what is not arithmetic, on the host: OTHER_SECONDS + OTHER_SECONDS_PER_PARAM x
                     parameters, + OTHER_SECONDS_PER_STREAM_ELEMENT x tokens x hidden x layers
                     with corrections. Measured on this project's CPU, not scaled by the rates.
      disk           read the weights (size on disk) and write the sliced model, at --disk-gbps.
    With --search the compute terms are multiplied by the compressions run.
    """

    forward_flops: float
    statistics_flops: float
    eigh_flops: float
    solve_flops: float
    selection_flops: float
    rotation_flops: float
    forward: float
    statistics: float
    eigh: float
    solves: float
    selection: float
    rotations: float
    other: float
    disk: float

    @property
    def total(self) -> float:
        return (
            self.forward
            + self.statistics
            + self.eigh
            + self.solves
            + self.selection
            + self.rotations
            + self.other
            + self.disk
        )

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "total": self.total}


def _ridge_flops(n: int, d: int, tried: float = RIDGE_TRIED) -> tuple[float, float]:
    """One writer's ridge choice and refit (n inputs, d outputs): (the strengths tried, the final
    solve). Every strength tried is a solve (Cholesky 1/3 n^3, then 2 n^2 for the right-hand side
    of each output row it is tried on: about 256 of them from 2,048 on, core.refit.strength_rows)
    and a held-out error (2 n^2 per row tried); the final solve on all d rows has no error."""
    some = strength_row_count(d)
    return tried * (1 / 3 * n**3 + 4 * n * n * some), 1 / 3 * n**3 + 2 * n * n * d


def _solve_rate(work: Workload, rate: Throughput, measured: WidthRate | None, n: int) -> float:
    """FLOP/s of a refit's solves at ``n`` kept inputs (``measured``: the strengths tried's or the
    final solve's rate, plan --measure), else float32 solves (core.refit.refit) at
    SOLVE_FLOAT32_EFFICIENCY x the float32 products' rate, float64 ones for a float64 model."""
    if measured is not None:
        return measured.at(n) * 1e12
    if work.dtype_bytes >= 8:
        return SOLVE_EFFICIENCY * rate.fp64_tflops * 1e12
    return SOLVE_FLOAT32_EFFICIENCY * rate.moments_tflops * 1e12


def time_model(
    shape: ModelShape, work: Workload, rate: Throughput, read_bytes: float, write_bytes: float
) -> TimeEstimate:
    """Time to slice (see :class:`TimeEstimate` for each term)."""
    d, i, n = shape.hidden, shape.intermediate, shape.layers
    tokens = work.tokens
    compress_passes = 0
    if work.compressing_walk:
        compress_passes = 2 if work.corrections else 1
    passes = compress_passes + (1 if work.pooling_walk else 0)
    # scores and values: 2 x 2 x seqlen x attention width per token (SDPA computes the masked half too)
    per_token = forward_flops_per_token(shape.layer_params, work.seqlen, shape.attention_width, n)
    # rotations between the original and the sliced basis (none where the basis is kept)
    rotated = 0 if work.keeps_basis else compress_passes
    forward = per_token * tokens * passes + 6.0 * d * d * tokens * n * rotated
    if work.corrections:  # the refit writers run once more, alone
        forward += 2.0 * (d + (work.kept_neurons or i)) * d * tokens * n
        # the refit passes stop at their writers after the first batch (attention's always, the
        # MLP's where one writer reads every neuron: not routed experts)
        stopped = d + (i if shape.experts == 1 else 0)
        forward -= 2.0 * stopped * d * max(tokens - work.batch_size * work.seqlen, 0) * n
    spread_tokens = work.spread_rows * work.seqlen
    forward += per_token * spread_tokens
    stats = gram_flops(d) * tokens * n * shape.points_per_layer * work.covariance_walks
    moments = (gram_flops(i) + 2.0 * i * d) * spread_tokens * n
    # the ridge strengths tried and the final solves (float32 solves for a float32 or half model)
    trials = solves = solve_seconds = 0.0
    # the strengths are chosen on the last calibration batch; with one batch there is none to choose on
    tried = RIDGE_TRIED if work.rows > work.batch_size else 0.0

    def refits(solved: int, writers: int) -> None:  # ``writers`` refits of ``solved`` kept inputs each
        nonlocal trials, solves, solve_seconds
        t, f = _ridge_flops(solved, d, tried)
        trials, solves = trials + t * writers, solves + f * writers
        trial_rate = _solve_rate(work, rate, rate.trial_solve, solved)
        solve_seconds += writers * (t / trial_rate + f / _solve_rate(work, rate, rate.final_solve, solved))

    if work.corrections:
        for width, solved in ((d, d), (i, work.kept_neurons or i)):  # the MLP's writer is refit on its kept neurons
            moments += (gram_flops(width) + 2.0 * width * d) * tokens * n
            refits(solved, n)
    elif work.prunes:
        moments += gram_flops(i) * tokens * n
    selection = picks = 0.0
    # The greedy rounds end at the moments' rank, at most the tokens summed (core.neurons.greedy_order
    # keeps the rest by their variance at no cost): a 70B model's curves, 8 rows of 2048 tokens, end
    # at 16,384 of its 28,672 neurons.
    if work.spread_rows:  # the curves: a selection to every width
        ranked = min(i, spread_tokens)
        selection += selection_flops(i, ranked, d) * n * shape.experts
        picks += ranked * n * shape.experts
    if work.prunes:
        k = min(work.kept_neurons or 0, tokens)
        selection += selection_flops(i, k, d) * n * shape.experts
        picks += k * n * shape.experts
        if shape.experts > 1:  # every expert's own refit, beside the one counted above
            refits(k, n * (shape.experts - 1))
    eigh = 10.0 * d**3 * work.eigh_points(shape.points_per_layer, n)
    rotation = 0.0
    if not work.keeps_basis:  # every stored matrix is read or written by the stream: [.., D] @ Q[:, :d]
        tables = shape.non_layer_params + (shape.table_params if shape.tied and not work.uniform else 0)
        rotation = 2.0 * work.residual_width * (shape.layer_params + tables)
    other = OTHER_SECONDS + OTHER_SECONDS_PER_PARAM * shape.params
    if work.corrections:
        other += OTHER_SECONDS_PER_STREAM_ELEMENT * tokens * d * n / work.nproc
    c = work.compressions
    return TimeEstimate(
        forward_flops=c * forward,
        statistics_flops=c * (stats + moments),
        eigh_flops=c * eigh,
        solve_flops=c * (trials + solves),
        selection_flops=c * selection,
        rotation_flops=c * rotation,
        forward=c * forward / (rate.tflops * 1e12) / work.nproc,
        statistics=c * (stats / (rate.fp64_tflops * 1e12) + moments / (rate.moments_tflops * 1e12)) / work.nproc,
        eigh=c * eigh / (EIGH_EFFICIENCY * rate.fp64_tflops * 1e12),
        solves=c * solve_seconds,
        selection=c
        * (
            selection / ((rate.selection_tflops or SELECTION_EFFICIENCY * rate.moments_tflops) * 1e12)
            + picks * (GREEDY_PICK_SECONDS if rate.pick_seconds is None else rate.pick_seconds)
        ),
        rotations=c * rotation / ((rate.rotate_tflops or ROTATE_EFFICIENCY * rate.fp64_tflops) * 1e12),
        other=c * other,
        disk=(read_bytes + write_bytes) / (rate.disk_gbps * GB),
    )


def default_throughput(
    device: str,
    dtype: str,
    tflops: float | None = None,
    fp64_tflops: float | None = None,
    disk_gbps: float | None = None,
    fast_float32: bool = False,
) -> Throughput:
    """The rates given, else :data:`DEFAULT_TFLOPS` for the device kind and dtype (with
    ``fast_float32`` on the CPU, float32 at :data:`FAST_CPU_FLOAT32_TFLOPS` and the moments at
    :data:`FAST_CPU_MOMENTS_TFLOPS`)."""
    kind = device.split(":")[0]
    if kind not in DEFAULT_TFLOPS:
        raise ValueError(f"no default throughput for device {device!r}: pass --tflops and --fp64-tflops")
    table = DEFAULT_TFLOPS[kind]
    moments = table["float32"]
    if fast_float32 and kind == "cpu":
        table, moments = {**table, "float32": FAST_CPU_FLOAT32_TFLOPS}, FAST_CPU_MOMENTS_TFLOPS
    for flag, value in (("tflops", tflops), ("fp64_tflops", fp64_tflops), ("disk_gbps", disk_gbps)):
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{flag} must be a positive number, got {value}")
    rate = Throughput(
        tflops or table[dtype],
        fp64_tflops or table["float64"],
        disk_gbps or DEFAULT_DISK_GBPS,
        fp32_tflops=moments if tflops is None else None,
    )
    if not (rate.tflops > 0 and rate.fp64_tflops > 0 and rate.disk_gbps > 0):
        raise ValueError("--tflops, --fp64-tflops and --disk-gbps must be positive")
    return rate


# ---------------------------------------------------------------------------------------------
# From the files to the numbers


def _skeleton(config: Any) -> nn.Module:
    """The model on the meta device: shapes only. (Not accelerate's init_empty_weights, which
    leaves a tied head untied in transformers 5 and would count it twice.)"""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(copy.deepcopy(config))


def sliced_widths(model: nn.Module, config: SliceConfig) -> tuple[Widths, int, bool]:
    """(the widths slicing will build, the sliced model's exact parameter count, whether a
    spreading walk gives the layers their MLP neurons), on a meta model, by the plan
    :func:`slicegpt.core.slicing.slice_model` follows (:func:`slicegpt.core.sizing.plan_widths`)."""
    spec = spec_for_config(model.config)
    if config.uniform:
        uniform.check_supported(model.config, spec)
    plan = plan_widths(model, spec, config, count_parameters(model))
    return plan.widths, plan.params(), plan.spread_total is not None


@dataclass
class Plan:
    """Everything ``slicegpt plan`` prints and writes as JSON."""

    model: str
    model_type: str
    files: str
    settings: dict[str, Any]
    params: int
    stored_params: int | None
    disk_bytes: float
    disk_bytes_source: str
    disk_dtype: str | None
    params_sliced: int
    sliced_bytes: float
    residual_width: int
    mlp_neurons: int | None
    seqlen: int
    calibration_tokens: int
    nproc: int
    stream: bool | None
    shape: ModelShape
    workload: Workload
    throughput: Throughput
    memory: MemoryEstimate
    time: TimeEstimate
    notes: list[str] = field(default_factory=list)
    probed: ProbedRates | None = None  # the rates measured on this machine (plan --measure)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "model_type": self.model_type,
            "files": self.files,
            "settings": self.settings,
            "params": self.params,
            "stored_params": self.stored_params,
            "disk_bytes": self.disk_bytes,
            "disk_bytes_source": self.disk_bytes_source,
            "disk_dtype": self.disk_dtype,
            "params_sliced": self.params_sliced,
            "share_removed": 1 - self.params_sliced / self.params,
            "sliced_bytes": self.sliced_bytes,
            "residual_width": self.residual_width,
            "mlp_neurons": self.mlp_neurons,
            "seqlen": self.seqlen,
            "calibration_tokens": self.calibration_tokens,
            "nproc": self.nproc,
            "stream": self.stream,
            "shape": asdict(self.shape),
            "workload": asdict(self.workload),
            "throughput": asdict(self.throughput),
            "probed": None if self.probed is None else self.probed.to_dict(),
            "memory_bytes": self.memory.to_dict(),
            "memory_per_node_bytes": {
                "host_in_memory": self.memory.host_in_memory * self.nproc,
                "host_streaming": self.memory.host_streaming * self.nproc,
            },
            "time_seconds": self.time.to_dict(),
            "notes": self.notes,
        }


def plan_model(
    files: ModelFiles | str | None,
    config: SliceConfig,
    *,
    nproc: int = 1,
    stream: bool | None = None,
    tflops: float | None = None,
    fp64_tflops: float | None = None,
    disk_gbps: float | None = None,
    bf16_units: bool | None = None,
    fast_float32: bool | None = None,
    measure: bool = False,
    probed: ProbedRates | None = None,
) -> Plan:
    """The plan for slicing ``files`` (a folder, a hub id, a .gguf, None for the embedded default, or
    :class:`ModelFiles`) as ``config`` says. ``bf16_units``: whether the CPU that will run it has
    bfloat16 units (the fast float32 products where the run asks for them, half models at the
    float32 rate); None: this machine's. ``fast_float32``: whether its fast float32 products keep
    float32's accuracy, so that a run asking for them uses them (an AMX Xeon's do not); None: as
    ``bf16_units`` where that is given, else this machine's
    (:func:`~slicegpt.core.precision.fast_float32_available`). ``measure``: time this
    machine's rates for the run (:func:`slicegpt.evaluation.probe.probe_rates`, seconds to a
    minute) instead of the defaults;
    ``probed``: rates measured before (the rates given, ``tflops`` and the others, still win)."""
    from transformers import AutoConfig

    if nproc < 1:
        raise ValueError(f"--nproc must be at least 1, got {nproc}")
    config = config.resolved()
    config.validate()
    files = files if isinstance(files, ModelFiles) else read_model_files(files)
    raw = {k: v for k, v in files.config.items() if k not in ("_name_or_path",)}
    model_type = raw.get("model_type")
    if not model_type:
        raise ValueError(f"{files.name}: config.json has no model_type")
    try:
        hf_config = AutoConfig.for_model(**raw)
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(
            f"{files.name}: transformers cannot read its config.json: {str(exc).strip().splitlines()[0]}"
        ) from None
    spec_for_config(hf_config)  # an unsupported family fails here, in one line
    model = _skeleton(hf_config)
    notes: list[str] = []
    seqlen = clip_seqlen(model, config.seqlen)
    if seqlen < config.seqlen:
        notes.append(f"--seqlen {config.seqlen} is above the model's context; slicing uses {seqlen}")
        config = replace(config, seqlen=seqlen)
    if config.calib == AUTO and files.chat_template and not stream:
        # what slicing it in memory runs (sources.resolve_auto_calibration); streamed, it calibrates on wiki
        config = chat_calibration(config)
        notes.append(
            f"a chat model: --calib auto calibrates in memory on {config.nsamples} rows, its own conversations on "
            "top of the prose rows (generating them is not counted; streamed, on the prose rows alone)"
        )
    shape = model_shape(model)
    widths, params_sliced, spreads = sliced_widths(model, config)
    dtype = str(parse_dtype(config.dtype)).removeprefix("torch.")
    b = torch.finfo(parse_dtype(config.dtype)).bits // 8
    kept = widths.mlp_neurons
    d = widths.embedding
    wanted = parse_device_map(config.device_map)
    # With --device-map the layers are processed on the map's devices (their kind sets the throughput).
    device = str(config.device) if wanted is None else "cuda" if wanted == "auto" else str(wanted[0])
    work = Workload(
        rows=config.nsamples,
        seqlen=seqlen,
        batch_size=config.batch_size,
        dtype_bytes=b,
        corrections=config.corrections,
        kept_neurons=kept,
        residual_width=d,
        hidden=shape.hidden,
        uniform=config.uniform,
        nproc=nproc,
        device_is_host=device.split(":")[0] == "cpu",
        compressions=len(SHARES) + 1 if config.search and config.target_params is not None else 1,
        spread_rows=min(SPREAD_ROWS, config.nsamples) if spreads else 0,
    )
    # the CPU's fast float32 products where the run would use them (on this machine: where its units
    # keep float32's accuracy in that mode, which an AMX Xeon's do not; a half model needs the units only)
    units = bfloat16_units() if bf16_units is None else bf16_units
    if fast_float32 is None:
        fast_float32 = fast_float32_available() if bf16_units is None else bf16_units
    fast = asks_fast_float32(config) and fast_float32
    rate = default_throughput(device, dtype, tflops, fp64_tflops, disk_gbps, fast_float32=fast)
    if measure and probed is None:
        probed = probe_run(hf_config, config, device=device, seqlen=seqlen)
    if probed is not None:
        # measured: the half products' speed on this CPU is in the forward's rate already
        solves_fp64 = bool(fp64_tflops) and work.dtype_bytes >= 8
        rate = Throughput(
            tflops or probed.forward_tflops,
            fp64_tflops or probed.fp64_tflops,
            rate.disk_gbps,
            fp32_tflops=probed.moments_tflops,
            # a float64 rate given (--fp64-tflops) wins over the float64 terms measured (the refits'
            # solves are float64 terms for a float64 model only: core.refit.refit)
            final_solve=None if solves_fp64 else probed.final_solve,
            trial_solve=None if solves_fp64 else probed.trial_solve,
            rotate_tflops=None if fp64_tflops else probed.rotate_tflops,
            selection_tflops=probed.selection_tflops,
            pick_seconds=probed.pick_seconds,
        )
        measured = ""
        if probed.final_solve is not None and probed.trial_solve is not None:
            widths = " and ".join(f"{w:,}" for w in probed.final_solve.widths)
            measured += (
                f"; refit solves at {widths} inputs: final "
                + " / ".join(f"{r:.3g}" for r in probed.final_solve.tflops)
                + ", strengths tried "
                + " / ".join(f"{r:.3g}" for r in probed.trial_solve.tflops)
            )
        if probed.selection_tflops is not None and probed.pick_seconds is not None:
            measured += (
                f"; neuron selection {probed.selection_tflops:.3g} and {probed.pick_seconds * 1e3:.2g} ms per neuron"
            )
        if probed.rotate_tflops is not None:
            measured += f"; rotations {probed.rotate_tflops:.3g}"
        notes.append(
            f"rates measured on this machine in {probed.seconds:.0f} s ({probed.device}, {probed.dtype}"
            + (", fast float32 products" if probed.fast_float32 else "")
            + f"): a forward of one layer of this shape on [{probed.batch[0]}, {probed.batch[1]}] tokens "
            f"{probed.forward_tflops:.3g} TFLOP/s, the moments {probed.moments_tflops:.3g}, float64 "
            f"{probed.fp64_tflops:.3g}{measured}"
        )
    elif device.split(":")[0] == "cpu" and dtype in ("bfloat16", "float16") and not units and tflops is None:
        rate = replace(rate, tflops=rate.tflops / HALF_WITHOUT_UNITS_SLOWDOWN)
        notes.append(
            f"this CPU has no {dtype} units: torch runs {dtype} products about {HALF_WITHOUT_UNITS_SLOWDOWN:g}x "
            "slower than float32 here (the forwards are planned so); --dtype float32 is faster on it"
        )
    if files.disk_bytes is not None:
        disk, disk_source = float(files.disk_bytes), files.source
    else:
        on_disk = str(files.config.get("dtype") or files.config.get("torch_dtype") or "float32")
        disk = float(shape.params * (torch.finfo(parse_dtype(on_disk)).bits // 8))
        disk_source = f"{files.source} ({on_disk} assumed)"
    if files.stored_params is not None and files.stored_params != shape.params:
        notes.append(
            f"the safetensors files store {files.stored_params:,} parameters, the config describes {shape.params:,}"
        )
    if config.search and config.target_params is not None:
        notes.append(
            f"--search compresses {len(SHARES)} candidates, then the chosen split: time x{len(SHARES) + 1}, "
            "a copy of the model in memory; streaming does not apply"
        )
    if nproc > 1:
        notes.append(
            f"--nproc {nproc}: memory is per process ({nproc} on one node multiply the host figures); "
            "the forwards are divided over the processes, the eigendecompositions and solves are not"
        )
    sliced_bytes = float(params_sliced * b)
    memory = memory_model(shape, work)
    if wanted is not None:
        count = (torch.cuda.device_count() if torch.cuda.is_available() else 0) if wanted == "auto" else len(wanted)
        if count == 0:
            raise ValueError(
                "--device-map auto counts this machine's CUDA devices, and it has none: name the devices the run "
                "will use (--device-map cuda:0,cuda:1)"
            )
        share = -(-shape.layers // count) / shape.layers  # the most layers one device takes
        memory = replace(memory, device_kept=sliced_bytes * share, device_is_host=False)
        notes.append(
            f"--device-map over {count} device(s): each keeps its share of the sliced layers (the device row, the "
            f"first device also the embeddings); running the dense model over them (--ppl) takes "
            f"{_gb(float(shape.params * b) * share)} each; in memory (the host holds the model)"
        )
    time_ = time_model(shape, work, rate, read_bytes=disk, write_bytes=sliced_bytes)
    return Plan(
        model=files.name,
        model_type=str(model_type),
        files=files.source,
        settings=config.to_dict(),
        params=shape.params,
        stored_params=files.stored_params,
        disk_bytes=disk,
        disk_bytes_source=disk_source,
        disk_dtype=files.disk_dtype,
        params_sliced=params_sliced,
        sliced_bytes=sliced_bytes,
        residual_width=d,
        mlp_neurons=kept,
        seqlen=seqlen,
        calibration_tokens=config.nsamples * seqlen,
        nproc=nproc,
        stream=stream,
        shape=shape,
        workload=work,
        throughput=rate,
        memory=memory,
        time=time_,
        notes=notes,
        probed=probed,
    )


def _gb(x: float) -> str:
    return f"{x / GB:,.1f} GB" if x >= 0.1 * GB else f"{x / 1e6:,.0f} MB"


def _flop(x: float) -> str:
    return f"{x / 1e15:,.1f} PFLOP" if x >= 1e14 else f"{x / 1e12:,.2f} TFLOP"


def _minutes(seconds: float) -> str:
    return f"{seconds / 3600:,.1f} h" if seconds >= 5400 else f"{seconds / 60:,.1f} min"


def format_plan(plan: Plan) -> str:
    """The plan as a short table: sizes in GB, times in minutes (hours past 90 minutes)."""
    m, t = plan.memory, plan.time
    s = plan.settings
    how = f"target {s['target_params']:g}" if s.get("target_params") is not None else f"sparsity {s['sparsity']:g}"
    how += (", uniform" if s.get("uniform") else "") + (", corrections" if plan.workload.corrections else "")
    lines = [
        f"plan: {plan.model} ({plan.model_type}), {how}, {s['dtype']} on {s.get('device_map') or s['device']}, "
        f"{plan.workload.rows} rows x {plan.seqlen} tokens, batch {plan.workload.batch_size}"
        + (f", {plan.nproc} processes" if plan.nproc > 1 else ""),
        f"read from: {plan.files}",
        "",
        "| | parameters | size |",
        "|---|---:|---:|",
        f"| model | {plan.params / 1e9:,.3f} B | {_gb(plan.disk_bytes)} on disk"
        + (f" ({plan.disk_dtype})" if plan.disk_dtype else "")
        + " |",
        f"| sliced | {plan.params_sliced / 1e9:,.3f} B ({1 - plan.params_sliced / plan.params:.1%} removed) | "
        f"{_gb(plan.sliced_bytes)} in {s['dtype']} |",
        "",
        f"widths: residual {plan.residual_width} of {plan.shape.hidden}"
        + (
            f", MLP neurons {plan.mlp_neurons} of "
            f"{plan.shape.intermediate}{' per expert' if plan.shape.experts > 1 else ''}"
            if plan.mlp_neurons is not None
            else ""
        ),
        "",
        "| peak memory" + (" (per process)" if plan.nproc > 1 else "") + " | in memory | streaming |",
        "|---|---:|---:|",
        f"| host | {_gb(m.host_in_memory)} | {_gb(m.host_streaming)} |",
    ]
    if plan.nproc > 1:
        lines.append(
            f"| host, {plan.nproc} processes | {_gb(m.host_in_memory * plan.nproc)} | "
            f"{_gb(m.host_streaming * plan.nproc)} |"
        )
    device = "on the host" if m.device_is_host else _gb(m.device_peak)
    lines += [
        f"| device ({s['device']}) | {device} | {device} |"
        if not m.device_kept
        else f"| each device ({s['device_map']}) | {device} | (not streamed) |",
        "",
        f"host terms: baseline {_gb(m.baseline)}, model {_gb(m.model)} | non-layer {_gb(m.non_layer)} + 3 layers "
        f"{_gb(m.layers)}, float64 workspace {_gb(m.fp64_workspace)}, activations {_gb(m.activations)}, "
        f"call arguments {_gb(m.call_arguments)}",
        f"device terms: layer {_gb(m.device_layer)}, float64 D x D {_gb(m.device_fp64_squares)}, batch "
        f"{_gb(m.device_batch)}"
        + (f", moments {_gb(m.device_moments)}" if m.device_moments else "")
        + (f", sliced layers kept {_gb(m.device_kept)}" if m.device_kept else ""),
        "",
        "| time | minutes |",
        "|---|---:|",
        f"| calibration forwards ({_flop(t.forward_flops)} at {plan.throughput.tflops:.3g} TFLOP/s"
        + (f" / {plan.nproc}" if plan.nproc > 1 else "")
        + f") | {t.forward / 60:,.1f} |",
        f"| statistics ({_flop(t.statistics_flops)}: covariances in float64 at {plan.throughput.fp64_tflops:.3g} "
        f"TFLOP/s, moments in float32 at {plan.throughput.moments_tflops:.3g}"
        + (f", / {plan.nproc}" if plan.nproc > 1 else "")
        + f") | {t.statistics / 60:,.1f} |",
        f"| eigendecompositions ({plan.workload.eigh_points(plan.shape.points_per_layer, plan.shape.layers)}) | "
        f"{t.eigh / 60:,.1f} |",
    ]
    if t.solve_flops:
        lines.append(f"| refit solves ({_flop(t.solve_flops)}) | {t.solves / 60:,.1f} |")
    if t.selection_flops:
        lines.append(f"| neuron selection ({_flop(t.selection_flops)}) | {t.selection / 60:,.1f} |")
    if t.rotation_flops:
        lines.append(f"| rotating the weights ({_flop(t.rotation_flops)} in float64) | {t.rotations / 60:,.1f} |")
    lines.append(f"| other (norm fusing, copies, data) | {t.other / 60:,.1f} |")
    lines += [
        f"| disk ({plan.throughput.disk_gbps:g} GB/s) | {t.disk / 60:,.1f} |",
        f"| **total** | **{_minutes(t.total)}** |",
    ]
    if plan.stream is not None:
        chosen = m.host_streaming if plan.stream else m.host_in_memory
        lines.append(
            f"\n{'streaming' if plan.stream else 'in memory'}: peak host {_gb(chosen)}"
            + (f" per process, {_gb(chosen * plan.nproc)} for {plan.nproc}" if plan.nproc > 1 else "")
        )
    lines += [f"note: {n}" for n in plan.notes]
    lines.append("estimates, not measurements: see slicegpt.evaluation.plan for each term")
    return "\n".join(lines)
