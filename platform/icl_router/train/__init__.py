"""Training: pure losses and steps (``steps``); the Ray Train driver lives beside them."""
