"""Scaling out: data parallelism and memory parallelism, applied to a built model from outside it."""
