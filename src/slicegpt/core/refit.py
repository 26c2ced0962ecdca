"""Closed-form corrections: refit a branch's writers by ridge least squares on calibration moments.

A writer W (D x n, the branch's output projection: ``o_proj``, ``down_proj``) reads x ([N, n],
what the branch computed) and should produce a target t ([N, D]). From the moments
C = E[x^T x] and B = E[x^T t] (float64, streamed), the refit toward the current weights is

    W'^T = (C + lam I)^-1 (B + lam W^T),   lam = rel * mean(diag C)

and its error on other rows, from their moments alone, is  tr(W C_h W^T) - 2 tr(W B_h) + const,
so the ridge strength is chosen on held-out calibration rows without another pass.

Memory: at a 70B model's MLP width (28,672) one [n, n] float64 matrix is 6.6 GB, so the solves
work on the streamed sums as they are (the ridge, relative to the mean diagonal, gives the same
fit from sums as from means) and factor one shifted copy in place (Cholesky: the shifted moment
is positive definite; through its column-major transpose, so that torch copies nothing more):
besides the fit and held-out sums, a refit holds one more [n, n] (the all-rows sum, factored
where it lies), where means, an identity and solvers' copies held five. A float32 or bfloat16
model's held-out sums are float32 (:class:`FitMoments`), and so is its all-rows sum: its solves
are float32, each from the float64 sums (:func:`refit`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

# Relative ridge strengths tried on the held-out rows; the largest leave the weights nearly as they
# were, so a refit that does not generalise is declined.
# Held-out errors this close (relative) count as equal: float64's, and float32's (the strengths
# tried in float32, where the error's products carry float32's rounding, about 1e-7 of each of n
# terms; see :func:`refit`).
TIE = 1e-9
TIE_FLOAT32 = 1e-6
RIDGE_GRID: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0, 1e3)
# Output rows (of a writer's D) the strengths are tried on. A strength's solve is a Cholesky
# (n^3 / 3) and right-hand sides and a held-out error (4 n^2 D); at 7B's widths (n ~ 6,400 kept
# neurons, D = 4,096) the D-wide part is 5x the factoring, so trying on 256 rows makes each strength
# ~4x cheaper. Rows are independent least-squares problems sharing the factor, and the held-out
# error is their sum: a quarter of the sample is the rows of most target energy (a transformer's
# few massive residual dimensions, which can decide a writer's strength alone), the rest every
# s-th of the others, weighted by s (measured: benchmarks/ridge_search.py).
STRENGTH_ROWS = 256
# Sampled only where that makes the D-wide part at least 8x smaller (D >= 2,048: 1B models and up);
# narrower writers try every row, as SmolLM2's (576) and Qwen2.5-0.5B's (896) always have.
SAMPLED_FROM = 8


def tie_for(dtype: torch.dtype) -> float:
    """The tie tolerance of held-out errors computed in ``dtype``."""
    return TIE if dtype == torch.float64 else TIE_FLOAT32


def stream_weights(stream: torch.Tensor) -> torch.Tensor:
    """Per-token weights 1 / mean square of the residual stream ([..., D] -> [..., 1], float64).

    What the next norm sees of an error is its size relative to the token's stream: weighted
    so, a few tokens with massive activations (attention sinks) do not decide for all the others.
    """
    return torch.rsqrt(stream.to(torch.float64).pow(2).mean(-1, keepdim=True) + 1e-12)


def product_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype one batch's moment products are computed in: float64 for float64 activations,
    else float32 (the sums over batches are float64 either way).

    The products are most of a budget compression's arithmetic, and CPUs run float32 at twice
    the float64 rate, GPUs at 32-64x. One batch's sums carry float32's relative rounding (about
    1e-7 times the square root of its tokens); measured on SmolLM2 (benchmarks/fast_statistics.py)
    against float64 products: the same neurons kept but for near-ties, and perplexity within
    run-to-run noise.
    """
    return torch.float64 if x.dtype == torch.float64 else torch.float32


#: Rows of x^T x taken per product in :func:`accumulate_gram`: bands this tall, each from its
#: diagonal rightwards. Measured on a 2-core Xeon (AMX, IEEE float32 products summed into float64)
#: against the 4 column blocks used before 2026-12-07: n = 4864 from 8192 rows 0.73 s against
#: 0.84, n = 8192 from 4096 rows 1.11 against 1.35, n = 28,672 from 1024 rows 5.3 against 10.3
#: (a block of 7168 rows made float32 and float64 temporaries of 0.8 and 1.6 GB per product);
#: float64 products at n = 896 0.065 s against 0.086 for the full product
#: (benchmarks/results/gram_bands_alone.json). Bands of 512 rows were within 8% everywhere.
GRAM_BAND = 256


def accumulate_gram(acc: torch.Tensor, x: torch.Tensor) -> None:
    """acc += x^T x for x [N, n] (products in x's dtype, summed into acc's).

    Wider than :data:`GRAM_BAND`, x^T x is taken a band of rows at a time, each band only from
    its diagonal rightwards, and the band's part left of the diagonal mirrored from the bands
    above: about half the arithmetic of the full product (the one symmetric product torch lacks,
    BLAS syrk), in products and temporaries of a band's size, the same sums to rounding.
    """
    n = x.shape[1]
    if n <= GRAM_BAND:
        acc += (x.t() @ x).to(acc.dtype)
        return
    b = GRAM_BAND
    for i in range(0, n, b):
        block = (x[:, i : i + b].t() @ x[:, i:]).to(acc.dtype)  # [b, n - i]: this band, right of the diagonal
        acc[i : i + b, i:] += block
        acc[i + b :, i : i + b] += block[:, b:].t()


def gram_flops(n: int) -> float:
    """Multiply-adds x2 per row of :func:`accumulate_gram` at width n: 2 n^2 for the full product,
    or the bands' 2 b (n - i) each, about n^2 + b n in all."""
    if n <= GRAM_BAND:
        return 2.0 * n * n
    return 2.0 * sum(min(GRAM_BAND, n - i) * (n - i) for i in range(0, n, GRAM_BAND))


def row_block(n: int) -> int:
    """Rows converted at a time when a [n, ...] matrix is read in another dtype: a 32nd of it."""
    return max(64, n // 32)


def rows_times(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``a @ b`` in ``dtype``; ``a`` of another dtype (a float32 held-out sum, or a float64 sum read
    in float32) is converted a block of rows at a time, never copied whole."""
    if a.dtype == dtype:
        return a @ b
    rows = row_block(a.shape[0])
    return torch.cat([a[i : i + rows].to(dtype) @ b for i in range(0, a.shape[0], rows)])


def add_into(acc: torch.Tensor, other: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """``acc += alpha * other`` in place; ``other`` of another dtype (a float32 held-out sum) is
    converted a block of rows at a time (torch would convert it whole first: one more [n, n])."""
    if other.dtype == acc.dtype:
        return acc.add_(other, alpha=alpha)
    rows = row_block(acc.shape[0])
    for i in range(0, acc.shape[0], rows):
        acc[i : i + rows].add_(other[i : i + rows].to(acc.dtype), alpha=alpha)
    return acc


@dataclass
class Moments:
    """Streaming E[x^T x] ([n, n]) and E[x^T t] ([n, D]) over the rows added: sums in ``dtype``
    (float64; see :class:`FitMoments` for the held-out rows') of :func:`product_dtype` products."""

    xx: torch.Tensor | None = None
    xt: torch.Tensor | None = None
    count: int = 0
    dtype: torch.dtype = torch.float64

    def add(self, x: torch.Tensor, t: torch.Tensor | None) -> None:
        dtype = product_dtype(x)
        x = x.reshape(-1, x.shape[-1]).to(dtype)
        if self.xx is None:
            self.xx = torch.zeros(x.shape[1], x.shape[1], dtype=self.dtype, device=x.device)
        accumulate_gram(self.xx, x)
        if t is not None:
            t = t.reshape(-1, t.shape[-1]).to(dtype)
            if self.xt is None:
                self.xt = torch.zeros(x.shape[1], t.shape[1], dtype=self.dtype, device=x.device)
            self.xt += (x.t() @ t).to(self.dtype)
        self.count += x.shape[0]

    def to_float64(self) -> "Moments":
        """These sums in float64 (the same values: float32 converts exactly)."""
        return Moments(
            None if self.xx is None else self.xx.to(torch.float64),
            None if self.xt is None else self.xt.to(torch.float64),
            self.count,
        )

    def mean(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.xx is None or self.count == 0:
            raise RuntimeError("no calibration tokens reached this writer")
        return self.xx / self.count, None if self.xt is None else self.xt / self.count


@dataclass
class FitMoments:
    """Moments of the rows a refit is fitted on, and of the held-out rows its strength is chosen on.

    :meth:`for_weight` sums the held-out rows in the products' own precision (float32 for a
    float32 or bfloat16 model): they are one calibration batch (``corrections.held_out``), added
    once, so the float32 sums are its products exactly, as float64 sums of them would be, in half
    the room (3.3 GB less at a 70B model's MLP width, where one [n, n] float64 sum is 6.6 GB).
    """

    fit: Moments = field(default_factory=Moments)
    held: Moments = field(default_factory=Moments)

    @classmethod
    def for_weight(cls, weight: torch.Tensor) -> "FitMoments":
        """Moments for the writer ``weight``: held-out sums in its :func:`product_dtype`."""
        return cls(held=Moments(dtype=product_dtype(weight)))

    def add(self, x: torch.Tensor, t: torch.Tensor | None, held_out: bool) -> None:
        (self.held if held_out else self.fit).add(x, t)


class WriterReached(Exception):
    """Raised by an :class:`InputRecorder` told to ``stop``: the forward ends at its module."""


class InputRecorder:
    """A forward pre-hook keeping the last input a module received (what its weight multiplies).

    With ``stop`` set, the hook raises :class:`WriterReached` once it has the input: a pass that
    only needs what the module reads skips the module's product and whatever comes after it.
    """

    def __init__(self, module: nn.Module) -> None:
        self.last: torch.Tensor | None = None
        self.stop = False
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, _module: nn.Module, args: tuple) -> None:
        self.last = args[0].detach()
        if self.stop:
            raise WriterReached

    def remove(self) -> None:
        self.handle.remove()


def summed(cov: torch.Tensor, extra: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``cov + extra`` in ``dtype``: one new [n, n] (``cov`` converted, ``extra`` added a block of
    rows at a time), where a float64 sum and then a conversion would hold two."""
    total = cov.to(dtype, copy=True)
    return total if extra is None else add_into(total, extra)


def ridge(
    cov: torch.Tensor,
    cross: torch.Tensor,
    w0: torch.Tensor,
    rel: float,
    dtype: torch.dtype | None = None,
    *,
    extra: torch.Tensor | None = None,
) -> torch.Tensor:
    """argmin_W E||t - x W^T||^2 + lam ||W - w0||^2, lam = rel * mean(diag cov), from moments
    (means, or sums over the same rows: the fit is the same); (D, n) in ``dtype`` (default: the
    moments' float64). ``extra``: a second sum over other rows (the held-out rows', in any dtype)
    added to ``cov``, so that the all-rows sum is made once, in ``dtype``, and nowhere else.

    One shifted copy of ``cov`` (+ ``extra``), Cholesky-factored in place (half an LU's
    arithmetic) and solved by two triangular solves: the moments are exactly symmetric, so the
    copy's transpose is the same matrix in LAPACK's column-major order, and neither the factoring
    nor the solve copies it again (``torch.linalg.cholesky_ex`` and ``torch.cholesky_solve`` on a
    row-major matrix each hold one more [n, n]).

    A copy that is not numerically positive definite (no ridge on a singular moment) is solved by
    LU as before, which says so if it is singular. In a lower ``dtype`` (a float32 model's refits,
    :func:`refit`) the copy is that dtype's, and one that is not positive definite there is solved
    in float64 instead.
    """
    dtype = dtype or cov.dtype
    diagonal = cov.diagonal() if extra is None else cov.diagonal() + extra.diagonal().to(cov.dtype)
    lam = rel * diagonal.mean()
    rhs = (cross + lam * w0.t()).to(dtype)
    shifted = summed(cov, extra, dtype)
    shifted.diagonal().add_(lam.to(dtype))
    lower = shifted.mT  # column-major view of the same (symmetric) matrix
    info = torch.empty((), dtype=torch.int32, device=cov.device)
    factor, info = torch.linalg.cholesky_ex(lower, out=(lower, info))
    if int(info) == 0:
        y = torch.linalg.solve_triangular(factor, rhs, upper=False)
        return torch.linalg.solve_triangular(factor.mT, y, upper=True).t()
    del factor, shifted, lower
    if dtype != cov.dtype:  # not positive definite in the lower precision: solved in the moments'
        return ridge(cov, cross, w0, rel, extra=extra).to(dtype)
    shifted = summed(cov, extra, dtype)
    shifted.diagonal().add_(lam)
    return torch.linalg.solve(shifted, rhs).t()


def error(w: torch.Tensor, cov: torch.Tensor, cross: torch.Tensor, weight: torch.Tensor | None = None) -> float:
    """E||t - x W^T||^2 up to the constant E||t||^2, from the rows' moments. The product W cov in
    their dtype (``w`` and ``cov`` alike: float32 while choosing a strength), the sums in float64;
    ``weight`` ([D], float64): each output row's weight in the sum (None: 1)."""
    wc = (w @ cov).to(torch.float64)  # [D, n]
    w = w.to(torch.float64)
    if weight is None:
        return float((wc * w).sum() - 2 * (w * cross.to(torch.float64).t()).sum())
    return float(((wc * w).sum(1) - 2 * (w * cross.to(torch.float64).t()).sum(1)) @ weight)


def _sample_shape(d: int, rows: int | None) -> tuple[int, int] | None:
    """(the rows of most energy taken whole, the stride over the rest) of :func:`strength_rows`'s
    sample of ``d`` output rows; None where every row is tried."""
    rows = STRENGTH_ROWS if rows is None else rows
    if rows <= 0 or d < SAMPLED_FROM * rows:
        return None
    top = rows // 4
    return top, max(1, (d - top) // (rows - top))


def strength_row_count(d: int, rows: int | None = None) -> int:
    """How many of a writer's ``d`` output rows :func:`strength_rows` tries the strengths on."""
    shape = _sample_shape(d, rows)
    return d if shape is None else shape[0] + -(-(d - shape[0]) // shape[1])


def strength_rows(cross: torch.Tensor, rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The output rows a writer's ridge strengths are tried on, and each one's weight in the
    held-out error; None: every row (fewer than ``SAMPLED_FROM`` x ``rows`` of them, or ``rows``
    0). ``rows`` None: :data:`STRENGTH_ROWS`.

    ``cross`` ([n, D], the fit rows' E[x^T t]) ranks the rows by the target energy they share
    with the inputs: the ``rows // 4`` highest are all taken (weight 1), and of the rest every
    s-th, s making the sample ``rows`` in all, weighted by how many of the rest each stands for.
    Chosen from the moments alone, which every process holds alike, so every process and run
    tries the same rows.
    """
    shape = _sample_shape(cross.shape[1], rows)
    if shape is None:
        return None
    top, stride = shape
    order = cross.pow(2).sum(0).argsort(descending=True, stable=True)
    rest = order[top:].sort().values
    picked = rest[::stride]
    weight = torch.ones(top + len(picked), dtype=torch.float64, device=cross.device)
    weight[top:] = len(rest) / len(picked)
    return torch.cat([order[:top], picked]), weight


def strength_sample(
    w0: torch.Tensor, fit_xt: torch.Tensor, held_xt: torch.Tensor, rows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The writer ``w0`` (D, n) and the fit and held-out cross moments ([n, D]) cut to the output
    rows :func:`strength_rows` picks (ranked by ``fit_xt``), and the rows' weights in the
    held-out error (None: every row, as they are)."""
    some = strength_rows(fit_xt, rows)
    if some is None:
        return w0, fit_xt, held_xt, None
    index, weight = some
    return w0[index], fit_xt[:, index], held_xt[:, index], weight


def choose_strength(
    errors: Callable[[float], float], grid: tuple[float, ...] = RIDGE_GRID, exhaustive: bool = False, tie: float = TIE
) -> float:
    """The relative ridge strength of ``grid`` (ascending) with the least held-out error, ties
    (within ``tie``, relative) going to the strongest ridge, the one nearest the current weights.

    ``errors(rel)`` costs a solve, so by default the grid is walked from its middle: toward stronger
    ridges while the error does not rise, else toward weaker ones while it falls. On an error that
    falls then rises along the grid (what held-out error against ridge strength does) this is the
    exhaustive choice in 3 to 6 solves instead of 11; ``benchmarks/ridge_search.py`` counts how
    often it is on real models' writers. ``exhaustive`` tries every strength.
    """
    seen: dict[int, float] = {}

    def err(j: int) -> float:
        if j not in seen:
            seen[j] = errors(grid[j])
        return seen[j]

    def no_worse(a: float, b: float) -> bool:  # a <= b up to the tie tolerance
        return a <= b + tie * abs(b)

    if exhaustive:
        best = min(err(j) for j in range(len(grid)))
        return grid[max(j for j in range(len(grid)) if no_worse(err(j), best))]
    middle = j = len(grid) // 2
    while j + 1 < len(grid) and no_worse(err(j + 1), err(j)):
        j += 1
    if j == middle:  # no stronger ridge did as well: try weaker ones
        while j > 0 and not no_worse(err(j), err(j - 1)):
            j -= 1
    return grid[j]


def refit(
    moments: FitMoments,
    w0: torch.Tensor,
    grid: tuple[float, ...] = RIDGE_GRID,
    exhaustive: bool = False,
    dtype: torch.dtype = torch.float64,
    rows: int | None = None,
) -> tuple[torch.Tensor, float]:
    """The refit writer (D, n) and the relative ridge strength chosen on the held-out rows
    (:func:`choose_strength`; ``exhaustive`` tries the whole grid), each strength tried on the
    writer's output rows :func:`strength_rows` picks (``rows`` None: about :data:`STRENGTH_ROWS`
    where the writer is wide enough; 0: every row).

    Without held-out rows the middle of the grid is used, and a grid of one strength is used as it
    is (nothing to choose, no held-out error computed). The final fit uses every row.

    ``dtype``: the precision the strengths are tried in (each a solve and a held-out error, most of
    a refit's arithmetic: 3 to 6 of them against one final solve) and the final solve is made in.
    float32 (the moments' product precision, :func:`product_dtype`, for a float32 or bfloat16
    model) runs at twice float64's rate on CPUs and 32-64x on GPUs without fast float64; its
    errors are compared within :data:`TIE_FLOAT32`. Measured against float64 at every writer of a
    compression: the walk chooses the same strength at all of SmolLM2's and Qwen's
    (benchmarks/ridge_search.py), and the final float32 solve's writer is float64's up to
    float32's rounding, but at the weakest ridges, where the float64 solve is as far from the
    writer of float64 products (the moments carry float32's rounding already:
    benchmarks/final_solve_precision.py). A sum that float32 cannot factor is solved in float64
    (:func:`ridge`). The all-rows sum is made in the solve's precision (float32: half a float64
    copy's room, 3.3 GB less at a 70B model's MLP width).
    """
    w0 = w0.to(torch.float64)
    chosen = grid[len(grid) // 2]
    fit, held = moments.fit, moments.held
    if fit.xx is None or fit.count == 0:
        raise RuntimeError("no calibration tokens reached this writer")
    if held.count and len(grid) > 1:
        # On the sums (see the module's note on memory): the held-out error of a sum is the mean's
        # times the held-out count, the same order of strengths.
        # Ties (a writer whose inputs upstream compression left exact fits equally well at every
        # strength: every candidate is w0 up to rounding) go to the strongest ridge, the one
        # nearest the current weights, so that rounding (thread count, process count) does not pick.
        # In a lower precision the held-out sums are copied once to it; with the shifted copy each
        # solve makes, the two take the room of the one float64 copy a float64 walk makes.
        # Each output row is its own least-squares problem (the same factor, its own right-hand
        # side) and the held-out error is their sum, so a weighted sample of the rows estimates it
        # (strength_rows); the relative ridge is the same for any rows (it reads the moments'
        # diagonal alone).
        held_xx = held.xx if dtype == held.xx.dtype else held.xx.to(dtype)
        w_some, fit_xt, held_xt, weight = strength_sample(w0, fit.xt, held.xt, rows)
        chosen = choose_strength(
            lambda rel: error(ridge(fit.xx, fit_xt, w_some, rel, dtype), held_xx, held_xt, weight),
            grid,
            exhaustive,
            tie_for(dtype),
        )
        del held_xx, w_some, fit_xt, held_xt
    if not held.count:
        return ridge(fit.xx, fit.xt, w0, chosen, dtype, extra=None), chosen  # a final solve: nothing to add
    # every row's sum, made once in ``dtype`` and factored in place
    return ridge(fit.xx, add_into(fit.xt.clone(), held.xt), w0, chosen, dtype, extra=held.xx), chosen
