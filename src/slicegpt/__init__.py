"""slicegpt: compress decoder-only language models by SliceGPT (Ashkboos et al., ICLR 2024).

    import slicegpt
    model, tokenizer, _ = slicegpt.load_model()              # the embedded default (SmolLM2-135M)
    report = slicegpt.slice_model(model, tokenizer, "wiki", slicegpt.SliceConfig(sparsity=0.25))
    slicegpt.save(model, "sliced/", tokenizer=tokenizer)
    model = slicegpt.load("sliced/")
    ppl = slicegpt.perplexity(model, tokenizer, "wiki", seqlen=1024).perplexity
    slicegpt.use_matvec_layout(model)                         # faster one-token decoding on CPU
"""

__version__ = "0.1.0"

from .arch import ArchSpec, UnsupportedModelError, supported_architectures  # noqa: E402
from .config import EvalConfig, SliceConfig  # noqa: E402
from .data import DataError  # noqa: E402
from .evaluate import PerplexityResult, perplexity  # noqa: E402
from .io import SlicedFolderError, load, read_metadata, save  # noqa: E402
from .layout import use_matvec_layout  # noqa: E402
from .models import ModelLoadError, load_model  # noqa: E402
from .slicing import ConstantWidth, SliceReport, slice_model  # noqa: E402
from .surgery import LayerWidths, Widths, count_parameters, prepare  # noqa: E402

__all__ = [
    "ArchSpec",
    "ConstantWidth",
    "DataError",
    "EvalConfig",
    "LayerWidths",
    "ModelLoadError",
    "PerplexityResult",
    "SliceConfig",
    "SliceReport",
    "SlicedFolderError",
    "UnsupportedModelError",
    "Widths",
    "count_parameters",
    "load",
    "load_model",
    "perplexity",
    "prepare",
    "read_metadata",
    "save",
    "slice_model",
    "supported_architectures",
    "use_matvec_layout",
    "__version__",
]
