"""Offline evaluation: dataset readers, k-shot sampling, metrics (AUROC, AP, F1-max, PRO), tables, score cache."""
