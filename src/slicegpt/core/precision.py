"""Float32 matrix products at the rate the CPU runs fastest, for the length of a compression.

CPUs with bfloat16 units (AVX512-BF16, AMX) run oneDNN's float32 matmuls with bfloat16 arithmetic
when allowed (``torch.backends.mkldnn.matmul.fp32_precision = "bf16"``): 2-2.3x the rate here
(2-core AMD EPYC; SmolLM2's whole forward 1.74 s against 3.40 s; another EPYC with the same
flags gave 1.1x: the gain is the machine's) at float32's accuracy measured
against float64: SmolLM2's logits 7e-6 of their largest against 2e-6 (relative norm 8e-7 against
5e-7), a 4864-wide x^T x 3.8e-7 against 3.3e-7. The setting is torch's process-wide one: it is
set only inside :func:`fast_float32` and put back as it was, and only where every device of the
run is the CPU (on CUDA the same knob family means TF32 or bfloat16 inputs, a real loss).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from ..config import SliceConfig


def fast_float32_available() -> bool:
    """Whether this CPU has the bfloat16 units that make :func:`fast_float32` faster (else it changes nothing)."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN
        return False


@contextlib.contextmanager
def fast_float32(enabled: bool) -> Iterator[bool]:
    """Within: the CPU's float32 matmuls through its bfloat16 units where ``enabled`` and available;
    yields whether they are. Restores the previous setting on the way out, whatever happens."""
    matmul = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    if not enabled or matmul is None or not fast_float32_available():
        yield False
        return
    before = matmul.fp32_precision
    matmul.fp32_precision = "bf16"
    try:
        yield True
    finally:
        matmul.fp32_precision = before


def asks_fast_float32(config: SliceConfig) -> bool:
    """Whether a run with these settings uses the fast products where the CPU has the units: it
    asks for them (``fast_matmul``) and computes on the CPU alone (no ``device_map``)."""
    return config.fast_matmul and config.device_map is None and torch.device(config.device).type == "cpu"
