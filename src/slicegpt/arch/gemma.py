"""Gemma (1): RMSNorm storing its scale as w and multiplying by (1 + w); scaled embeddings.

The embedding output is multiplied by sqrt(hidden_size) (a scalar buffer), which commutes with
any rotation. Gemma was trained with BOS at the start of every sequence.
"""

from __future__ import annotations

from . import ArchSpec, register

GEMMA = register(ArchSpec(name="gemma", model_types=("gemma",), norm_weight_offset=1.0, bos_per_row=True))
