"""Llama family: Llama 2/3/3.x, SmolLM/SmolLM2, Mistral, Qwen2 (q/k/v biases), Qwen3 (q/k norms).

All four share the module layout of ``LlamaDecoderLayer``; Qwen2's attention biases are ordinary
linear biases, and Qwen3's q/k norms act per head inside attention, on widths that slicing never
touches.
"""

from . import ArchSpec, register

LLAMA = register(ArchSpec(name="llama", model_types=("llama", "mistral", "qwen2", "qwen3"), gguf_arch="llama"))
