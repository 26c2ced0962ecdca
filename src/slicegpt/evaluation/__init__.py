"""Measuring: perplexity, zero-shot tasks, FLOPs, speed, sweeps, inspection, reports and plots.
Imports :mod:`slicegpt.core` and :mod:`slicegpt.io`, never the CLI."""
