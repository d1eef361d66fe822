"""inspectd: a streaming visual-inspection daemon built on CLIP zero-/few-shot anomaly detectors."""

__version__ = "0.1.0"
