"""Tasks: where batches come from, which matching loss applies, how predictions are scored."""
from hfrun.tasks.base import Batch, DatasetStream, GeneratedStream, Task

__all__ = ["Batch", "DatasetStream", "GeneratedStream", "Task"]
