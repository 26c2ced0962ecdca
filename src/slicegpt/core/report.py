"""What one slicing run did: the typed record that saving turns into a folder's metadata."""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch

from ..config import SliceConfig
from .widths import Widths, variance_kept


@dataclass
class SliceReport:
    """Widths, spectra, parameter counts and time of one run, and what it was run on."""

    architecture: str
    model_type: str
    widths: Widths
    config: SliceConfig
    params_before: int
    params_after: int
    seconds: float
    calibration_tokens: int
    # PCA eigenvalues per point, descending: "embedding", "layer.{i}.mid", "layer.{i}.out", "uniform".
    spectra: dict[str, list[float]] = field(default_factory=dict)
    source_model: str | None = None
    # ShardReader.fingerprint of the source's weights (recover checks its teacher against it).
    source_fingerprint: str | None = None
    # With a parameter target: the target, and how the widths were chosen (axes, split, search).
    target_params: int | None = None
    allocation: dict[str, Any] = field(default_factory=dict)
    # Refit writers and the relative ridge strength chosen for each on held-out calibration rows.
    refits: dict[str, float] = field(default_factory=dict)
    # What makes a run reproducible: sha256 of the calibration token ids, the library versions,
    # and the fused model's largest relative logit difference from the original (--verify).
    calibration_sha256: str | None = None
    versions: dict[str, str] = field(default_factory=dict)
    # What the last bits of a float result depend on besides the inputs (see numerics()).
    numerics: dict[str, Any] = field(default_factory=dict)
    verified: float | None = None
    # A per-layer model that kept its basis and its tied head (the final norm holds a scale).
    tied_head: bool = False

    @property
    def mode(self) -> str:
        return "uniform" if self.config.uniform else "per-layer"

    @property
    def share_removed(self) -> float:
        return 1.0 - self.params_after / self.params_before

    def variance_kept(self) -> dict[str, float]:
        """Share of each spectrum's total kept at the chosen width."""
        return variance_kept(self.spectra, self.widths)

    def summary(self) -> dict[str, Any]:
        """The report's figures as plain data (what metadata and scripts record)."""
        return {
            "architecture": self.architecture,
            "model_type": self.model_type,
            "source_model": self.source_model,
            **({"source_fingerprint": self.source_fingerprint} if self.source_fingerprint else {}),
            "mode": self.mode,
            "settings": self.config.to_dict(),
            "widths": self.widths.to_dict(),
            "params_before": self.params_before,
            "params_after": self.params_after,
            "calibration_tokens": self.calibration_tokens,
            "variance_kept": self.variance_kept(),
            "target_params": self.target_params,
            "allocation": self.allocation,
            "corrections": self.config.corrections,
            "refits": self.refits,
            "calibration_sha256": self.calibration_sha256,
            "versions": self.versions,
            "numerics": self.numerics,
            "verify_max_relative_logit_difference": self.verified,
            **({"tied_head": True} if self.tied_head else {}),
        }


@lru_cache(maxsize=1)
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def numerics(device: str | torch.device = "cpu") -> dict[str, Any]:
    """What a run's last bits depend on beyond its inputs and settings: the processor, the math
    library and the thread count split sums differently (float64 products differ by ~1e-14
    between an AMD and an Intel CPU, or one and two threads). Two runs agree bit for bit only
    where all of these agree; a resume on other ones is told so."""
    dev = torch.device(device)
    return {
        "device": str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev),
        "cpu": _cpu_name(),
        "threads": torch.get_num_threads(),
        "blas": "mkl" if torch.backends.mkl.is_available() else "other",
        "torch": torch.__version__,
    }
