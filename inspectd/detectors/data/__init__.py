"""Dataset readers shared by training and evaluation (MVTec AD, VisA, meta.json, plain folders)."""
