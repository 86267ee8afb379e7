"""Data-parallel training over several processes, as ``torchrun`` and ``accelerate launch`` start them.

Both launchers set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
with ``WORLD_SIZE`` above 1 the processes join one group (gloo on the CPU, nccl on CUDA) and
every step's batch is split between them. Without it ``Ranks()`` is one process and every
method here is a no-op, so a single-process run computes exactly what it did before.

Gradients are summed with ``all_reduce`` rather than through DistributedDataParallel: each
process scales its share of the loss by the *global* number of examples (or tokens) of the
step, so the sum over processes is the one-process gradient, even when the shares are uneven
or a process gets none. DDP averages per-process means instead, and wrapping the model
would rename the parameters that LoRA saving and checkpoints rely on.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    """This process's place among the processes of one run."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """The process that writes: the reference cache, checkpoints, the model and its metrics."""
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.size > 1

    def share(self, indices: Sequence[int]) -> list[int]:
        """This process's contiguous part of a batch; parts differ in size by at most one, and may be empty."""
        start = self.rank * len(indices) // self.size
        end = (self.rank + 1) * len(indices) // self.size
        return list(indices[start:end])

    def sum_gradients(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Sum the gradients of ``params`` over the processes (one ``all_reduce`` per dtype and device)."""
        if not self.parallel:
            return
        buckets: dict[tuple[torch.dtype, torch.device], list[torch.nn.Parameter]] = {}
        for p in params:
            if p.grad is None:  # a process whose share of the step was empty
                p.grad = torch.zeros_like(p)
            buckets.setdefault((p.grad.dtype, p.grad.device), []).append(p)
        for group in buckets.values():
            flat = torch.cat([p.grad.reshape(-1) for p in group])  # type: ignore[union-attr]
            dist.all_reduce(flat)
            offset = 0
            for p in group:
                grad = p.grad
                assert grad is not None
                grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
                offset += grad.numel()

    def total(self, sums: dict[str, float]) -> dict[str, float]:
        """Each figure summed over the processes (in float64), so logged figures are those of the whole step."""
        if not self.parallel:
            return sums
        values = torch.tensor(list(sums.values()), dtype=torch.float64, device=_collective_device())
        dist.all_reduce(values)
        return dict(zip(sums, values.tolist(), strict=True))

    def agree(self, flag: bool) -> bool:
        """The main process's answer, on every process (whether to stop, say), so all leave the loop together."""
        if not self.parallel:
            return flag
        value = torch.tensor([1 if flag else 0], device=_collective_device())
        dist.broadcast(value, src=0)
        return bool(value.item())

    def barrier(self) -> None:
        if self.parallel:
            dist.barrier()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """The main process runs the block first (writing, say, a cache), the others after it has finished."""
        if not self.main:
            self.barrier()
        yield
        if self.main:
            self.barrier()


def join_processes() -> Ranks:
    """This process's ``Ranks``, joining the launcher's process group when ``WORLD_SIZE`` is above 1.

    On CUDA each process uses the GPU of its ``LOCAL_RANK``. Calling it again returns the same ranks.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return Ranks()
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
    return Ranks(rank=dist.get_rank(), size=dist.get_world_size())


def leave_processes() -> None:
    """Leave the process group at the end of a run (nothing to do for one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _collective_device() -> torch.device:
    # nccl only moves tensors that live on the GPU.
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
