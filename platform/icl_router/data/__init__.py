"""Datasets: the Parquet layout, importers, splits, anchors and Ray Data pipelines."""
