"""How wide each point of the residual stream is after slicing, and the policies that choose it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Protocol, Sequence

from ..arch import ArchSpec


@dataclass(frozen=True)
class LayerWidths:
    """Widths of the residual stream around one block.

    ``d_in`` enters the block, ``d_mid`` sits between attention and MLP (sequential blocks only;
    equal to ``d_in`` for parallel ones), ``d_out`` leaves it. The flags say whether the residual
    path carries a change-of-basis matrix there. ``mlp`` is the number of MLP intermediate
    neurons kept (None: all of them).
    """

    d_in: int
    d_mid: int
    d_out: int
    attn_shortcut: bool = True
    mlp_shortcut: bool = True
    mlp: int | None = None


@dataclass(frozen=True)
class Widths:
    hidden: int
    embedding: int
    layers: tuple[LayerWidths, ...]

    @property
    def head(self) -> int:
        return self.layers[-1].d_out if self.layers else self.embedding

    @property
    def mlp_neurons(self) -> int | None:
        """The MLP neurons kept in the first layer that lost some (None: none did)."""
        return next((w.mlp for w in self.layers if w.mlp is not None), None)

    def to_dict(self) -> dict[str, Any]:
        # ``mlp`` is written only where neurons were pruned: folders from before read the same.
        layers = [{k: v for k, v in asdict(w).items() if not (k == "mlp" and v is None)} for w in self.layers]
        return {"hidden": self.hidden, "embedding": self.embedding, "layers": layers}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Widths":
        return cls(
            hidden=int(data["hidden"]),
            embedding=int(data["embedding"]),
            layers=tuple(LayerWidths(**w) for w in data["layers"]),
        )

    def with_mlp(self, kept: "Sequence[int | None]") -> "Widths":
        """These widths with ``kept[i]`` MLP neurons in layer i (None: all of them)."""
        return replace(self, layers=tuple(replace(w, mlp=k) for w, k in zip(self.layers, kept, strict=True)))

    def width_at(self, point: str) -> int:
        """The kept width at a named point of the stream ("embedding", "layer.3.mid", "layer.3.out")."""
        if point in ("embedding", "uniform"):
            return self.embedding
        _, idx, where = point.split(".")
        w = self.layers[int(idx)]
        return w.d_mid if where == "mid" else w.d_out


def variance_kept(spectra: dict[str, list[float]], widths: Widths) -> dict[str, float]:
    """Share of each PCA spectrum's total kept at the chosen width (the one rule, used everywhere)."""
    kept: dict[str, float] = {}
    for name, spectrum in spectra.items():
        total = sum(spectrum)
        kept[name] = sum(spectrum[: widths.width_at(name)]) / total if total > 0 else 1.0
    return kept


class WidthPolicy(Protocol):
    """Chooses the width of every point of the residual stream."""

    def widths(self, hidden: int, num_layers: int, topology: str) -> Widths: ...


@dataclass(frozen=True)
class ConstantWidth:
    """The same kept width ``int((1 - sparsity) * D)`` rounded down to ``round_to`` everywhere.

    The last layer's output (what the final norm and head read) keeps the full width unless
    ``slice_head``.
    """

    sparsity: float
    round_to: int = 8
    slice_head: bool = False
    width: int | None = None  # an exact kept width instead of the sparsity's

    def kept(self, hidden: int) -> int:
        if self.width is not None:
            return self.width
        d = int((1.0 - self.sparsity) * hidden)
        if d < hidden:
            d -= d % self.round_to
        if d < 1:
            raise ValueError(f"sparsity {self.sparsity} leaves no width of {hidden} (round_to {self.round_to})")
        return d

    def widths(self, hidden: int, num_layers: int, topology: str) -> Widths:
        d = self.kept(hidden)
        layers = []
        for i in range(num_layers):
            last = i == num_layers - 1
            d_out = d if (self.slice_head or not last) else hidden
            layers.append(LayerWidths(d_in=d, d_mid=d, d_out=d_out, mlp_shortcut=topology == "sequential"))
        return Widths(hidden=hidden, embedding=d, layers=tuple(layers))


def fit_widths(widths: Widths, spec: ArchSpec) -> Widths:
    """Widths the family's modules can take.

    Fused MoE blocks allocate their output like their input (``mlp_preserves_width``), so the
    stream keeps one width across the MLP: ``d_mid = d_out``. In the last layer, whose output
    stays full for the head, that leaves attention's output and the MLP's inputs unsliced.
    GPT-2's forward views its final hidden states at the embeddings' width
    (``head_reads_embedding_width``): there the head is sliced like the embeddings.
    """
    layers = list(widths.layers)
    if spec.head_reads_embedding_width and layers:
        layers[-1] = replace(layers[-1], d_out=widths.embedding)
    if spec.mlp_preserves_width and spec.topology == "sequential":
        layers = [replace(w, d_mid=w.d_out) for w in layers]
    return replace(widths, layers=tuple(layers))
