"""Data parallelism on torch.distributed: the same run as one process, its batches spread over W processes.

Launch with PyTorch's own launcher, `torchrun --nproc_per_node=W -m hfrun.cli ...` (gloo on the CPU, NCCL on
GPUs, one process per GPU), or as a job of Hydra's submitit launcher with several tasks
(`adopt_submitit_environment`); `from_environment` joins the process group described in the environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Without it, `SINGLE` stands for one process and
every operation below is the identity.

The split (He et al. 2016 distribute HF the same way):
  - Every rank draws the whole global batch from the same stream, seeded alike, and keeps its share, the
    cases rank, rank + W, rank + 2W, ... (`shard`). So the global batch is exactly what one process would
    draw, whatever W, and a checkpoint's stream state is every rank's: a run resumes at any world size.
    The price is generating (or indexing) the whole batch on every rank, small next to the model's work.
  - Every batch size must be a multiple of W, so that the shares are equal. Losses are per-case means
    (hfrun.losses), so the mean over ranks of each rank's per-case mean is the global batch's mean:
    gradients, curvature-vector products, loss values (ρ, backtracking, line search) and Martens'
    preconditioner are all-reduced as that mean (`mean`), in one place, the shared second-order core
    (hfrun/solvers/second_order.py). Interleaved shares keep Martens' curvature batch, the first cases of
    the gradient batch, the same set of cases as in one process.
  - CG, λ and the line-search decisions are computed on every rank, not computed once and broadcast:
    their inputs are all-reduced values, the same bits on every rank, and the arithmetic is deterministic,
    so every rank takes the same decisions and the same step without a broadcast per CG iteration (which
    would add a round trip to each of the hundreds of products an update makes). The tests check that the
    ranks' parameters agree bit for bit.
  - Stopping (wall-clock budget, Ctrl-C) is rank 0's decision, broadcast each update.
  - The held-out set's batches are dealt out to the ranks in turn and the sums all-reduced (`sum`).
  - First-order solvers wrap the model in DistributedDataParallel, whose gradient all-reduce averages the
    equal shares' gradients.
Collectives time out after `run.collective_timeout_s`, so a rank that dies ends the others with a message
instead of a hang.
"""
from __future__ import annotations

import datetime
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from hfrun.tasks.base import Batch


@dataclass
class DataParallel:
    """Where this process stands in a data-parallel run: rank `rank` of `world_size`; `collective_seconds`
    adds up the time spent in the all-reduces of the solvers' sums (waiting for the other processes
    included), which the engine reports per update as `time_collective_s`."""

    rank: int = 0
    world_size: int = 1
    collective_seconds: float = 0.0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes the run directory."""
        return self.rank == 0

    def mean(self, tensor: Tensor) -> Tensor:
        """The mean over ranks (a new tensor): the global batch's per-case mean from equal shares' means."""
        if not self.active:
            return tensor
        reduced = tensor.detach().clone()
        started = time.perf_counter()
        dist.all_reduce(reduced)
        self.collective_seconds += time.perf_counter() - started
        return reduced / self.world_size

    def mean_value(self, value: float) -> float:
        if not self.active:
            return value
        return float(self.mean(torch.tensor([value], dtype=torch.float64, device=self.device)))

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over ranks of a few numbers (float64)."""
        if not self.active:
            return list(values)
        reduced = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(reduced)
        return reduced.tolist()

    def all_true(self, flag: bool) -> bool:
        """Whether `flag` holds in every process (one all-reduce)."""
        if not self.active:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return bool(value.item() == 1.0)

    def broadcast(self, value):
        """Rank 0's value of a picklable object, on every rank."""
        if not self.active:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def broadcast_parameters(self, module: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers, on every rank (same seed, same initialization: a safeguard)."""
        if not self.active:
            return
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(tensor.data, src=0)

    def agree(self, module: torch.nn.Module) -> bool:
        """Whether every process holds rank 0's parameters bit for bit (one broadcast, one reduction)."""
        if not self.active:
            return True
        with torch.no_grad():
            mine = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
            ranks0 = mine.clone()
            dist.broadcast(ranks0, src=0)
        return self.all_true(torch.equal(mine, ranks0))

    def shard(self, batch: Batch) -> Batch:
        """This rank's share of a global batch: the cases rank, rank + W, rank + 2W, ..."""
        if not self.active:
            return batch
        if batch.size % self.world_size:
            raise ValueError(f"a batch of {batch.size} cases cannot be shared equally by {self.world_size} "
                             "processes")
        take = slice(self.rank, None, self.world_size)
        return Batch(batch.inputs[take].contiguous(), batch.targets[take].contiguous(),
                     None if batch.mask is None else batch.mask[take].contiguous())

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else \
            torch.device("cpu")


SINGLE = DataParallel()


class ShardedStream:
    """A task's training stream seen by one rank: `next(n)` draws n cases (the global batch) and returns
    this rank's share of them; its state is the underlying stream's, the same on every rank."""

    def __init__(self, stream, parallel: DataParallel):
        self.stream, self.parallel = stream, parallel

    def next(self, batch_size: int) -> Batch:
        return self.parallel.shard(self.stream.next(batch_size))

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)


def is_collective_failure(error: BaseException) -> bool:
    """Whether an exception comes from a collective whose peer died or timed out (gloo's and NCCL's errors
    are torch.distributed.DistError or RuntimeErrors that name the backend or the connection)."""
    if isinstance(error, dist.DistError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        marker in text for marker in ("gloo", "Gloo", "NCCL", "Connection closed", "Connection reset", "timed out",
                                      "Timed out", "Broken pipe"))


def adopt_submitit_environment() -> None:
    """Inside a job of Hydra's submitit launcher with several tasks (hydra.launcher.tasks_per_node, nodes), set
    the variables torchrun would set (RANK, WORLD_SIZE, MASTER_ADDR, ...) from submitit's job environment, so
    that the job's tasks form one data-parallel run. Nothing happens outside such a job or under torchrun."""
    if "WORLD_SIZE" in os.environ:
        return
    try:
        from submitit import JobEnvironment
        from submitit.helpers import TorchDistributedEnvironment

        if JobEnvironment().num_tasks <= 1:
            return
    except Exception:  # not in a submitit job (JobEnvironment cannot tell which cluster it runs on)
        return
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)  # LOCAL_RANK picks the GPU


def launched_world_size() -> int:
    """The number of processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def from_environment(device: torch.device, timeout_s: float) -> DataParallel:
    """Join the process group torchrun describes (gloo on the CPU, NCCL on CUDA); SINGLE without one."""
    world_size = launched_world_size()
    if world_size <= 1:
        return SINGLE
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DataParallel(dist.get_rank(), dist.get_world_size())


def leave() -> None:
    """Leave the process group (at the end of a run; harmless without one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
