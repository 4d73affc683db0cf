"""ICL-Router: route each query to the model most likely to answer it correctly."""

__version__ = "0.1.0"
