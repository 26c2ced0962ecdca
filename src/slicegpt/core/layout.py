"""Weight layout for decoding one token at a time on CPU.

``nn.Linear`` stores its weight as (out, in) with rows contiguous, so for a single token
``F.linear(x, W)`` is a matrix-vector product of ``out`` dot products of length ``in``. With
MKL on this project's CPU that form costs nearly as much per output row as per element: a
(1536, 432) weight takes 267 µs where (1536, 576) takes 306 µs (87%, for 75% of the bytes;
``benchmarks/matvec_layout.py``). Stored input-major -- (in, out) contiguous, seen through a
transposed view, so ``weight`` keeps its (out, in) shape -- the same product runs over rows of
length ``out`` and costs in proportion to its size: 149 µs against 194 µs, and the 49152 x 576
head takes 5.1 ms instead of 9.5 ms. Slicing shrinks exactly the inner widths whose saving the row-major
form hides, so a sliced model needs this layout to turn its smaller weights into speed; a dense
model gains from it too, which is why ``slicegpt bench --layout matvec`` applies it to both.
(A shortcut matrix S, used as ``x @ S`` with S stored (in, out), is input-major already.)

Only the storage order changes: every weight keeps its values, shape, dtype, device and
sharing (a head tied to the embedding stays tied), so logits are those of the stock layout up
to summation order. Meant for inference; ``slicegpt.save`` writes contiguous tensors either way.
"""

from __future__ import annotations

from torch import nn

LAYOUTS: tuple[str, ...] = ("stock", "matvec")


def prefers_input_major(out_features: int, in_features: int) -> bool:
    """Whether the matvec layout stores an (out, in) weight input-major.

    Weights with more inputs than outputs (``down_proj``: 576 x 1536, ``k_proj``: 192 x 576)
    are faster row-major; square ones are ~10% faster input-major.
    """
    return out_features >= in_features


def use_matvec_layout(model: nn.Module) -> int:
    """Store, in place, every linear weight that :func:`prefers_input_major` input-major.

    Returns how many weights were re-laid.
    """
    seen: set[int] = set()
    changed = 0
    for module in model.modules():
        if not isinstance(module, nn.Linear):
            continue
        weight = module.weight
        if id(weight) in seen:
            continue
        seen.add(id(weight))
        if prefers_input_major(*weight.shape) and weight.is_contiguous():
            # (in, out) contiguous storage, viewed as (out, in): same values, other order.
            # Assigning .data keeps the Parameter object, hence any tying to an embedding.
            weight.data = weight.data.t().contiguous().t()
            changed += 1
    return changed


def apply_layout(model: nn.Module, layout: str) -> int:
    """Apply a named layout ("stock" leaves the model as loaded). Returns weights re-laid."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown weight layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    return use_matvec_layout(model) if layout == "matvec" else 0
