"""Imager: text-to-image diffusion as a reproducible pipeline.

The package is a library: importing it has no side effects (no network, no file writes, no MLflow
run). The DVC stages in ``stages/`` are thin command-line adapters over it.
"""

__version__ = "0.1.0"
