"""Reading PCA spectra against the widths chosen from them.

A spectrum is a point's eigenvalues, descending (:attr:`SliceReport.spectra`, a folder's
``spectra.json``, a sweep run's ``spectra``); the share of variance a width keeps is
:func:`slicegpt.core.widths.variance_kept`'s, the rule every figure here uses.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from ..core.widths import Widths, variance_kept


def as_widths(widths: Widths | Mapping[str, Any]) -> Widths:
    """A :class:`Widths`, given one or its ``to_dict()``."""
    return widths if isinstance(widths, Widths) else Widths.from_dict(dict(widths))


def cumulative_share(spectrum: Sequence[float]) -> list[float]:
    """Share of the total variance in the first k components, for k = 1 .. len(spectrum).

    Entry ``w - 1`` is what :func:`variance_kept` reports for width ``w``.
    """
    values = [float(v) for v in spectrum]
    total = sum(values)
    out, acc = [], 0.0
    for v in values:
        acc += v
        out.append(acc / total if total > 0 else 1.0)
    return out


def spectrum_summary(
    spectra: Mapping[str, Sequence[float]], widths: Widths | Mapping[str, Any]
) -> dict[str, dict[str, Any]]:
    """Per point: full dimension, kept width and the share of variance kept at that width."""
    w = as_widths(widths)
    kept = variance_kept({name: list(s) for name, s in spectra.items()}, w)
    return {
        name: {"dim": len(s), "width": w.width_at(name), "variance_kept": kept[name]} for name, s in spectra.items()
    }
