"""Float32 matrix products at the rate the CPU runs fastest, for the length of a compression.

CPUs with bfloat16 units (AVX512-BF16, AMX) run oneDNN's float32 matmuls with bfloat16 arithmetic
when allowed (``torch.backends.mkldnn.matmul.fp32_precision = "bf16"``). What that buys depends on
the machine. On two 2-core AMD EPYCs with AVX512-BF16 it ran 1.1-2.3x faster (SmolLM2's whole
forward 1.74 s against 3.40 s on one) at float32's accuracy measured against float64: SmolLM2's
logits 7e-6 of their largest against 2e-6, a 4864-wide x^T x 3.8e-7 against 3.3e-7. On a Xeon
with AMX the same setting rounds the products' inputs to bfloat16 (that x^T x 1.7e-3 from float64,
a tiny model's invariance check 3e-3 off): faster (1.8x the moments, 3.5x a projection) but no
longer float32. So the mode is used only where a probe product made in it keeps float32's
accuracy (:func:`fast_float32_available`); elsewhere the run stays in IEEE float32.

The setting is torch's process-wide one: it is set only inside :func:`fast_float32` and put back as
it was, and only where every device of the run is the CPU (on CUDA the same knob family means TF32
or bfloat16 inputs, a real loss).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

from ..config import SliceConfig


#: Largest relative error (Frobenius, against float64) a probe product may show in the fast mode
#: and still count as float32: IEEE float32 gives ~3e-7 on it, inputs rounded to bfloat16 ~2e-3.
FLOAT32_PROBE_TOLERANCE = 1e-5


def keeps_float32_accuracy(product: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> bool:
    """Whether ``product`` (a float32 matmul as some mode runs it) agrees with float64 to float32's
    rounding on a seeded [256, 512] x [512, 256] probe, large enough for oneDNN's blocked kernels."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(256, 512, generator=generator)
    b = torch.randn(512, 256, generator=generator)
    exact = a.double() @ b.double()
    got = product(a, b).double()
    return bool(torch.isfinite(got).all()) and float((got - exact).norm() / exact.norm()) <= FLOAT32_PROBE_TOLERANCE


def bfloat16_units() -> bool:
    """Whether this CPU has bfloat16 units oneDNN uses (AVX512-BF16, AMX): a bfloat16 model's
    products run at full rate on it, whatever its fast float32 mode does."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN
        return False


def _matmul_knob():
    """torch's oneDNN matmul settings, or None in a build without them."""
    return getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)


@contextlib.contextmanager
def _bf16_mode(matmul) -> Iterator[None]:
    """Within: oneDNN's float32 matmuls allowed bfloat16 arithmetic; the setting put back after."""
    before = matmul.fp32_precision
    matmul.fp32_precision = "bf16"
    try:
        yield
    finally:
        matmul.fp32_precision = before


def fast_float32_available() -> bool:
    """Whether this CPU has the bfloat16 units that make :func:`fast_float32` faster and its float32
    products keep float32's accuracy in that mode (a probe product, milliseconds); else the mode is
    not used. False on AMX Xeons, whose oneDNN rounds the inputs to bfloat16 in it."""
    matmul = _matmul_knob()
    if matmul is None or not bfloat16_units():
        return False
    with _bf16_mode(matmul):
        return keeps_float32_accuracy(torch.matmul)


@contextlib.contextmanager
def fast_float32(enabled: bool) -> Iterator[bool]:
    """Within: the CPU's float32 matmuls through its bfloat16 units where ``enabled`` and available;
    yields whether they are. Restores the previous setting on the way out, whatever happens."""
    matmul = _matmul_knob()
    if not enabled or matmul is None or not fast_float32_available():
        yield False
        return
    with _bf16_mode(matmul):
        yield True


def asks_fast_float32(config: SliceConfig) -> bool:
    """Whether a run with these settings uses the fast products where the CPU has the units: it
    asks for them (``fast_matmul``) and computes on the CPU alone (no ``device_map``)."""
    return config.fast_matmul and config.device_map is None and torch.device(config.device).type == "cpu"
