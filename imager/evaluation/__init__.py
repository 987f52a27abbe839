"""Evaluation: image features in, numbers out.

- :mod:`imager.evaluation.metrics`: FID (torchmetrics, any feature extractor), R-precision, CLIP
  score, and the standard backbones (torch-fidelity's Inception, a local Hugging Face CLIP), used
  only from local files.
- :mod:`imager.evaluation.evaluator`: the in-domain evaluator, a small CNN image encoder tuned
  contrastively against the frozen text embeddings; it gives FID features and image-text scores.
- :mod:`imager.evaluation.config`: their typed settings.

Nothing is imported here, so ``import imager.evaluation`` stays cheap (no torch).
"""
