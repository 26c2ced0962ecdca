"""Reading and writing: the folder format and its metadata, save/load, standard and GGUF export,
model sources. Imports :mod:`slicegpt.core`, never :mod:`slicegpt.evaluation` or the CLI."""
