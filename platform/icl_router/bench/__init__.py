"""Benchmarks (`icl-router bench NAME`): both sides measured in one run; the
result dict is printed as a JSON object on the last line."""
