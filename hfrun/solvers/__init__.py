"""Solvers: one algorithm a file, each with `step(stream) -> stats` and `state_dict()`."""
