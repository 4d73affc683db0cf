"""Evaluation: baselines, metrics, the standard-protocol report and its plots."""
