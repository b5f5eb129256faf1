"""Tasks on a fixed data set held in memory on the run's device: one home for their loading,
streaming and evaluation.

A subclass turns raw arrays into (inputs, targets) for training and held-out use and names its
loss and metric; `DatasetTask` does the rest:
  - the training stream is a `DatasetStream`, reshuffled every epoch and resumable mid-epoch;
  - the held-out set is the data set's own test split, evaluated in batches of `eval_batch_size`;
  - `train_size` / `eval_size` take the first N cases (quick runs; null: all);
  - `model_sizes()` offers input_size (flattened), input_shape and output_size, and the engine fills
    only those the model's config has;
  - `final_report()` adds the metric over the whole training set where the papers report that
    (Martens 2010's autoencoder error is a training error).
Files come from hfrun.datasets (download, verify, parse): `data_dir` (null: $HFRUN_DATASETS, else
./datasets), `download` and `verify` are passed through.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from hfrun import datasets
from hfrun.tasks.metrics import METRICS
from hfrun.tasks.base import Batch, DatasetStream, Task, make_generator


class DatasetTask(Task):
    report_train_metric = False  # True: final_report() gives the metric over the training set
    sequence_inputs = False  # True: inputs are (B, T, features) sequences

    def __init__(self, *, name: str, seed: int, device, dtype: torch.dtype, data_dir: str | None = None,
                 download: bool = True, verify: bool = True, train_size: int | None = None,
                 eval_size: int | None = None, eval_batch_size: int = 1000):
        for key, value in (("train_size", train_size), ("eval_size", eval_size)):
            if value is not None and value < 1:
                raise ValueError(f"task.{key} must be a positive integer or null (all cases), got {value!r}")
        if eval_batch_size < 1:
            raise ValueError(f"task.eval_batch_size must be a positive integer, got {eval_batch_size!r}")
        self.name, self.seed = name, seed
        self.device, self.dtype = torch.device(device), dtype
        self.data_dir, self.download, self.verify = data_dir, download, verify
        self.train_size, self.eval_size, self.eval_batch_size = train_size, eval_size, eval_batch_size
        self.metric = METRICS[self.metric_name]

    # ------------------------------------------------------------ for subclasses
    def load(self, dataset: str) -> dict[str, Tensor]:
        """The named data set's arrays (hfrun.datasets.load), downloaded and verified as configured."""
        return datasets.load(dataset, self.data_dir, download=self.download, verify=self.verify)

    def set_data(self, train_inputs: Tensor, train_targets: Tensor, eval_inputs: Tensor, eval_targets: Tensor) -> None:
        """Keep the (first train_size / eval_size) cases on the run's device; floating data in the run's dtype."""
        self.train_inputs, self.train_targets = self._on_device(train_inputs[: self.train_size]), \
            self._on_device(train_targets[: self.train_size])
        self.eval_inputs, self.eval_targets = self._on_device(eval_inputs[: self.eval_size]), \
            self._on_device(eval_targets[: self.eval_size])

    def _on_device(self, tensor: Tensor) -> Tensor:
        dtype = self.dtype if tensor.is_floating_point() else tensor.dtype
        return tensor.to(device=self.device, dtype=dtype).contiguous()

    # ------------------------------------------------------------ the Task interface
    @property
    def input_shape(self) -> list[int]:
        return list(self.train_inputs.shape[1:])

    @property
    def input_size(self) -> int:
        """Features per case for a feed-forward model (the flattened input), per step for a sequence."""
        return self.input_shape[-1] if self.sequence_inputs else math.prod(self.input_shape)

    @property
    def train_cases(self) -> int:
        return self.train_inputs.shape[0]

    def model_sizes(self) -> dict:
        return {"input_size": self.input_size, "input_shape": self.input_shape, "output_size": self.output_size}

    def train_stream(self) -> DatasetStream:
        return DatasetStream(self.train_inputs, self.train_targets, make_generator(self.seed, self.device))

    def eval_batches(self) -> list[Batch]:
        return self._batches(self.eval_inputs, self.eval_targets)

    def _batches(self, inputs: Tensor, targets: Tensor) -> list[Batch]:
        size = self.eval_batch_size
        return [Batch(inputs[start:start + size], targets[start:start + size])
                for start in range(0, inputs.shape[0], size)]

    def metric_sum(self, outputs: Tensor, batch: Batch) -> Tensor:
        return self.metric(outputs, batch.targets, self.loss)

    @torch.no_grad()
    def final_report(self, model: nn.Module) -> dict[str, float]:
        if not self.report_train_metric:
            return {}
        total = sum(float(self.metric_sum(model(batch.inputs), batch))
                    for batch in self._batches(self.train_inputs, self.train_targets))
        return {f"train_{self.metric_name}": total / self.train_cases}
