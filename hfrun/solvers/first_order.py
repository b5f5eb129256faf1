"""First-order baselines: torch.optim's SGD and Adam behind the solver interface.

A solver does one update per `step(stream)`, drawing the batches it needs from
the task's training stream, and returns a dict of statistics that the engine
logs; it must hold `loss` (the training loss before the update) and the
examples it pushed through gradients (`examples_grad`) and curvature-vector
products (`examples_curv`). Its state round-trips through `state_dict()`.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from hfrun.distributed import SINGLE, DataParallel


class FirstOrder:
    """One minibatch gradient and one `torch.optim` step per update."""

    def __init__(self, model: nn.Module, loss, optimizer: torch.optim.Optimizer, batch_size: int):
        if int(batch_size) < 1:
            raise ValueError(f"solver.batch_size must be a positive integer, got {batch_size}")
        self.model, self.loss, self.optimizer, self.batch_size = model, loss, optimizer, int(batch_size)
        self.forward_model: nn.Module = model
        self.parallel = SINGLE

    def distribute(self, parallel: DataParallel) -> None:
        """Run as one of `parallel.world_size` data-parallel processes: the model's forward goes through
        DistributedDataParallel, whose backward averages the equal shares' gradients over the processes."""
        if parallel.world_size > 1:
            if self.batch_size % parallel.world_size:
                raise ValueError(f"Under data parallelism every batch is shared equally by the processes, so "
                                 f"solver.batch_size={self.batch_size} must be a multiple of their number, "
                                 f"{parallel.world_size}. Change it, or the number of processes.")
            self.forward_model = DistributedDataParallel(self.model)
        self.parallel = parallel

    def step(self, stream) -> dict[str, float]:
        batch = stream.next(self.batch_size)  # this process's share under data parallelism
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(self.forward_model(batch.inputs), batch.targets, batch.mask)
        loss.backward()
        self.optimizer.step()
        return {"loss": self.parallel.mean_value(float(loss.detach())), "lr": self.optimizer.param_groups[0]["lr"],
                "examples_grad": batch.size * self.parallel.world_size, "examples_curv": 0}

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])


class SGD(FirstOrder):
    """θ ← θ − lr·(momentum buffer of the minibatch gradient); torch.optim.SGD."""

    def __init__(self, model: nn.Module, loss, *, lr: float, batch_size: int, momentum: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0):
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, nesterov=nesterov,
                                    weight_decay=weight_decay)
        super().__init__(model, loss, optimizer, batch_size)


class Adam(FirstOrder):
    """Adam (Kingma & Ba 2015); torch.optim.Adam."""

    def __init__(self, model: nn.Module, loss, *, lr: float, batch_size: int, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0):
        optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=tuple(betas), eps=eps,
                                     weight_decay=weight_decay)
        super().__init__(model, loss, optimizer, batch_size)
