"""The algorithm: specs in use, invariant surgery, pure weight ops, the one per-layer walk.

Imports only :mod:`slicegpt.arch` and the base modules (config, data, memory); nothing here
reads or writes files.
"""
