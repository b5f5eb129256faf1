"""The task seam: every task shares one batch interface and one evaluation loop.

A task owns
  - a training stream: `stream.next(batch_size) -> Batch`, resumable through
    `state_dict()` / `load_state_dict()`;
  - a fixed held-out set, `eval_batches()`, the same for a given seed;
  - its matching loss (`self.loss`, from hfrun.losses), evaluated per case;
  - a per-case metric (`metric_name`, lower is better) and optionally a
    success threshold: the run is solved when the held-out metric < threshold.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn


@dataclass
class Batch:
    """A batch of cases: inputs (B, ...), targets, and an optional (B, T) mask of scored positions."""

    inputs: Tensor
    targets: Tensor
    mask: Tensor | None = None

    @property
    def size(self) -> int:
        return self.inputs.shape[0]


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


class GeneratedStream:
    """Fresh random batches from `sample(batch_size, generator)`; its state is the generator's."""

    def __init__(self, sample: Callable[[int, torch.Generator], Batch], generator: torch.Generator):
        self.sample = sample
        self.generator = generator

    def next(self, batch_size: int) -> Batch:
        return self.sample(batch_size, self.generator)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"].cpu())


class DatasetStream:
    """Minibatches from a fixed data set, reshuffled at every epoch; resumable mid-epoch."""

    def __init__(self, inputs: Tensor, targets: Tensor, generator: torch.Generator):
        self.inputs, self.targets, self.generator = inputs, targets, generator
        self.order = self._shuffle()
        self.position = 0
        self.epoch = 0

    def _shuffle(self) -> Tensor:
        return torch.randperm(self.inputs.shape[0], generator=self.generator, device=self.generator.device)

    def next(self, batch_size: int) -> Batch:
        taken = []
        while batch_size > 0:
            if self.position == len(self.order):
                self.order, self.position, self.epoch = self._shuffle(), 0, self.epoch + 1
            chunk = self.order[self.position : self.position + batch_size]
            self.position += len(chunk)
            batch_size -= len(chunk)
            taken.append(chunk)
        index = torch.cat(taken)
        return Batch(self.inputs[index], self.targets[index])

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "order": self.order.cpu(),
                "position": self.position, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        order, position = state["order"], int(state["position"])
        if order.shape != (self.inputs.shape[0],) or not 0 <= position <= len(order):
            raise ValueError(f"the data stream's state (order of {tuple(order.shape)}, position {position}) does "
                             f"not fit a data set of {self.inputs.shape[0]} cases")
        self.generator.set_state(state["generator"].cpu())
        self.order = order.to(self.inputs.device)
        self.position, self.epoch = position, int(state["epoch"])


class Task:
    """Base class. Subclasses set the attributes below and implement the three methods."""

    name: str
    loss: Callable  # a matching loss from hfrun.losses
    input_size: int
    output_size: int
    metric_name: str = "loss"
    success_threshold: float | None = None  # solved when the held-out metric falls below it
    published_minibatch: int = 1000  # cases per minibatch in the summary's `minibatches` count (M&S 2011's unit)

    def train_stream(self) -> GeneratedStream | DatasetStream:
        raise NotImplementedError

    def eval_batches(self) -> list[Batch]:
        raise NotImplementedError

    def metric_sum(self, outputs: Tensor, batch: Batch) -> Tensor:
        """The metric summed over the cases of a batch (e.g. the number of wrong sequences)."""
        raise NotImplementedError

    def model_sizes(self) -> dict[str, int]:
        """Values the engine fills into the model config's `???` fields."""
        return {"input_size": self.input_size, "output_size": self.output_size}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, parallel=None) -> dict[str, float]:
        """Per-case loss and metric on the held-out set. Under data parallelism (`parallel`, a
        hfrun.distributed.DataParallel) the batches are dealt out to the processes in turn and the sums
        added up over them."""
        rank, world_size = (0, 1) if parallel is None else (parallel.rank, parallel.world_size)
        loss_sum, metric_sum, cases = 0.0, 0.0, 0
        for index, batch in enumerate(self.eval_batches()):
            if index % world_size != rank:
                continue
            outputs = model(batch.inputs)
            loss_sum += float(self.loss(outputs, batch.targets, batch.mask)) * batch.size
            metric_sum += float(self.metric_sum(outputs, batch))
            cases += batch.size
        if world_size > 1:
            loss_sum, metric_sum, cases = parallel.sum([loss_sum, metric_sum, cases])
        metrics = {"loss": loss_sum / cases}
        if self.metric_name != "loss":
            metrics[self.metric_name] = metric_sum / cases
        metrics.update(self.derived_metrics(metrics))
        return metrics

    def final_report(self, model: nn.Module) -> dict[str, float]:
        """Figures computed once, for the summary, from the model the run ends with: how far it is from a
        known optimum (LinearRegression), or a metric over the training set (DatasetTask). {} otherwise."""
        return {}

    def derived_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Metrics that follow from the others (a classifier's accuracy = 1 − error). {} by default."""
        return {}

    def is_solved(self, metrics: dict[str, float]) -> bool:
        return self.success_threshold is not None and metrics[self.metric_name] < self.success_threshold
