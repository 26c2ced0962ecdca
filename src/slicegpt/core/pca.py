"""Covariances of the residual stream and the rotation sources that turn them into bases."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from .refit import accumulate_gram


class NumericalError(ValueError):
    """Weights or activations are not finite (NaN or Inf): slicing would silently produce garbage."""


def describe_point(point: str) -> str:
    """'layer.3.mid' -> 'layer 3, the stream after its attention branch (what its MLP reads)'."""
    parts = point.split(".")
    if parts[0] == "layer" and len(parts) == 3:
        where = {
            "mid": "the stream after its attention branch (what its MLP reads)",
            "out": "the stream after its MLP branch (the layer's output)",
        }
        return f"layer {parts[1]}, {where.get(parts[2], parts[2])}"
    return {"embedding": "the embeddings' output (what layer 0 reads)"}.get(point, point)


def check_finite(point: str, cov: "Covariance") -> None:
    """Stop, naming the layer and the branch, when calibration activations went NaN or Inf."""
    if not bool(torch.isfinite(cov.sum).all()):
        raise NumericalError(
            f"calibration activations at {describe_point(point)} are not finite (NaN or Inf); "
            "stopping before they reach the weights (check the source weights, or use a wider `dtype`)"
        )


class Covariance:
    """Streaming sum of x^T x over unmasked tokens, float64, on the device it is given."""

    def __init__(self, dim: int, device: torch.device | str = "cpu") -> None:
        self.sum = torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.count = 0

    def add(self, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        flat = x.reshape(-1, x.shape[-1])
        if mask is not None:
            flat = flat[mask.reshape(-1).to(flat.device).bool()]
        flat = flat.to(torch.float64)
        accumulate_gram(self.sum, flat)
        self.count += flat.shape[0]

    def mean(self) -> torch.Tensor:
        if self.count == 0:
            raise RuntimeError("no calibration tokens reached this point of the stream")
        return self.sum / self.count

    def pca(self, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenvalues (descending, of the mean covariance) and eigenvectors as columns."""
        cov = self.mean()
        damped = cov + damping * cov.diagonal().mean() * torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
        evals, evecs = torch.linalg.eigh(damped)
        if not bool(torch.isfinite(evals).all()):
            raise NumericalError("the covariance's eigenvalues are not finite")
        order = torch.argsort(evals, descending=True)
        # Report the undamped spectrum: what the data says, not the regulariser.
        undamped = torch.einsum("ij,ji->i", evecs.t() @ cov, evecs)
        return undamped[order], evecs[:, order]


class RotationSource(Protocol):
    """Gives the rotation (D, D float64, columns by significance) at each point of the stream.

    ``needs_statistics``: the loop must stream calibration data and accumulate covariances.
    ``shared``: every point gets the same basis, so a residual connection whose width does not
    change carries no shortcut matrix.
    ``collect_only``: the walk only gathers statistics and leaves the weights as they are.
    Returns (eigenvalues to record or None, basis).
    """

    needs_statistics: bool
    shared: bool
    collect_only: bool

    def __call__(self, point: str, cov: Covariance | None) -> tuple[torch.Tensor | None, torch.Tensor]: ...


@dataclass
class PCARotation:
    """Per-point PCA of the calibration signals (SliceGPT's choice)."""

    damping: float = 0.01
    needs_statistics: bool = True
    shared: bool = False
    collect_only: bool = False

    def __call__(self, point: str, cov: Covariance | None) -> tuple[torch.Tensor | None, torch.Tensor]:
        if cov is None:
            raise ValueError(f"PCA needs a covariance at {point}")
        return cov.pca(self.damping)


@dataclass
class FixedRotation:
    """One given rotation everywhere (a random Q in invariance tests; the uniform mode's shared Q).

    No calibration data is needed: the walk only rotates and slices weights.
    """

    q: torch.Tensor
    needs_statistics: bool = False
    shared: bool = True
    collect_only: bool = False

    def __call__(self, point: str, cov: Covariance | None) -> tuple[torch.Tensor | None, torch.Tensor]:
        return None, self.q


class PooledCovariance:
    """Collects every point's covariance, trace-normalised; the walk leaves the weights alone.

    Run over the unrotated model at full width, it yields the uniform mode's single rotation:
    the PCA of the sum of all points' covariances, each scaled to unit trace so that no layer
    dominates by the size of its activations.
    """

    needs_statistics = True
    shared = True
    collect_only = True

    def __init__(self, dim: int) -> None:
        self.eye = torch.eye(dim, dtype=torch.float64)
        self.total = torch.zeros(dim, dim, dtype=torch.float64)
        self.points: list[str] = []

    def __call__(self, point: str, cov: Covariance | None) -> tuple[torch.Tensor | None, torch.Tensor]:
        if cov is None:
            raise ValueError(f"pooling needs a covariance at {point}")
        c = cov.mean().cpu()
        self.total += c / c.trace().clamp_min(1e-30)
        self.points.append(point)
        return None, self.eye

    def rotation(self, damping: float) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = Covariance(self.total.shape[0])
        pooled.sum, pooled.count = self.total.clone(), len(self.points)
        return pooled.pca(damping)
