"""slicegpt: compress decoder-only language models by SliceGPT (Ashkboos et al., ICLR 2024).

import slicegpt
model, tokenizer, _ = slicegpt.load_model()              # the embedded default (SmolLM2-135M)
report = slicegpt.slice_model(model, tokenizer, "wiki", slicegpt.SliceConfig(sparsity=0.25))
slicegpt.save(model, "sliced/", tokenizer=tokenizer)
model = slicegpt.load("sliced/")
ppl = slicegpt.perplexity(model, tokenizer, "wiki", seqlen=1024).perplexity
slicegpt.use_matvec_layout(model)                         # faster one-token decoding on CPU
model, report = slicegpt.recover(model, tokenizer, slicegpt.RecoverConfig(train="lora"))  # recovery training
"""

from ._version import __version__
from .arch import ArchSpec, UnsupportedModelError, supported_architectures
from .config import EvalConfig, RecoverConfig, SliceConfig
from .core.layout import use_matvec_layout
from .core.report import SliceReport
from .core.slicing import slice_model
from .core.streams import Streams
from .core.surgery import count_parameters, prepare
from .core.widths import ConstantWidth, LayerWidths, Widths
from .data import DataError, Text
from .evaluation.perplexity import PerplexityResult, perplexity
from .io.folders import load, save
from .io.format import SlicedFolderError, read_metadata
from .io.models import ModelLoadError, load_model
from .training.recover import RecoveryReport, recover

__all__ = [
    "ArchSpec",
    "ConstantWidth",
    "DataError",
    "EvalConfig",
    "LayerWidths",
    "ModelLoadError",
    "PerplexityResult",
    "RecoverConfig",
    "RecoveryReport",
    "SliceConfig",
    "SliceReport",
    "Streams",
    "Text",
    "SlicedFolderError",
    "UnsupportedModelError",
    "Widths",
    "count_parameters",
    "load",
    "load_model",
    "perplexity",
    "prepare",
    "read_metadata",
    "recover",
    "save",
    "slice_model",
    "supported_architectures",
    "use_matvec_layout",
    "__version__",
]
