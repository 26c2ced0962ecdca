"""Distributed calibration: the processes torchrun starts share the calibration rows.

    torchrun --nproc-per-node N -m slicegpt slice MODEL ...   (multi-node: torchrun's usual
                                                               --nnodes/--rdzv-* flags)

Every process loads the model and runs only its share of the calibration rows through it.
Each statistic summed over rows (the covariance before each PCA, the refits' fit and held-out
moments: float64 sums and their token counts) is all-reduced before anything is decided from it,
and what is decided (bases, MLP neurons kept, refit weights) is then broadcast from rank 0, so
every process slices its copy of the model bit for bit alike and its activations, which the next
layer's statistics are taken on, stay in the bases every other process uses. Only rank 0 writes.

Rows (:func:`shard_rows`): N rows in batches of B make nb = ceil(N / B) global batches; rank r of
W takes the whole batches [r nb / W, (r + 1) nb / W) (integer division), contiguous. Its batches
are therefore the very batches one process would run, and the refits' held-out rows (those their
ridge strengths are chosen on) are the same global rows as in one process: the last global batch,
held by the last rank (:func:`slicegpt.core.corrections.held_out`). So a distributed run differs
from a one-process run only by the order in which float64 sums are added.

Backends: gloo on CPU, nccl on CUDA (each process on cuda:LOCAL_RANK). Rendezvous is env://
(WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT, as torchrun sets them). Every wait is
bounded by the process group's timeout, so an error on one process cannot hang the others for
ever (torchrun also stops the others as soon as one fails).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping

import torch
import torch.distributed as dist

from ..data import Rows
from .pca import Covariance

# Long enough for rank 0 to measure perplexity or save a large model while the others wait.
DEFAULT_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class Launch:
    """Where this process sits among those torchrun started."""

    rank: int
    world: int
    local_rank: int
    local_world: int


def launch_from_env(env: Mapping[str, str] | None = None) -> Launch | None:
    """This process's place from torchrun's environment variables; None outside torchrun or with one process."""
    env = os.environ if env is None else env
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        if world <= 1:
            return None
        rank = int(env["RANK"])
        local_rank = int(env.get("LOCAL_RANK", rank))
        local_world = int(env.get("LOCAL_WORLD_SIZE", world))
    except (KeyError, ValueError):
        raise ValueError(
            "WORLD_SIZE is set but RANK / LOCAL_RANK are missing or not integers: start the processes with torchrun"
        ) from None
    if not 0 <= rank < world:
        raise ValueError(f"RANK {rank} is outside WORLD_SIZE {world}")
    return Launch(rank, world, local_rank, local_world)


def process_device(device: str, launch: Launch) -> str:
    """The device this process calibrates on: cpu, or cuda:LOCAL_RANK for 'cuda'."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return "cpu"
    if dev.type != "cuda":
        raise ValueError(f"distributed calibration runs on cpu (gloo) or cuda (nccl), not {device!r}")
    if dev.index is not None and launch.local_world > 1:
        raise ValueError(f"under torchrun give `device=cuda`, not {device!r}: each process takes cuda:LOCAL_RANK")
    return f"cuda:{launch.local_rank if dev.index is None else dev.index}"


def shard_rows(rows: Rows, batch_size: int, rank: int, world: int) -> tuple[Rows, range]:
    """Rank ``rank``'s rows: whole global batches of ``batch_size``, a contiguous block (see the module
    docstring), and the global batch indices they are."""
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    batches = -(-len(rows) // batch_size)
    if batches < world:
        raise ValueError(
            f"{len(rows)} calibration rows in batches of {batch_size} make {batches} batch(es) for {world} processes; "
            "each needs one: give more rows (`nsamples`), smaller batches (`batch_size`) or fewer processes"
        )
    lo, hi = rank * batches // world, (rank + 1) * batches // world
    a, b = lo * batch_size, min(hi * batch_size, len(rows))
    return rows.take(slice(a, b)), range(lo, hi)


class ProcessesDisagree(ValueError):
    """A mismatch every process found at once (:meth:`TorchDistributedReduction.check_same`), so
    every one raises it. torchrun ends the other processes as soon as one exits, so one that
    reported and left at once could end another before it printed: :meth:`reported` waits for
    every process to have reported it (all of them are on their way there) before any exits."""

    def __init__(self, message: str, ranks: "TorchDistributedReduction") -> None:
        super().__init__(message)
        self.ranks = ranks

    def reported(self) -> None:
        """Call once this process has printed the error: returns when every process has (a wait
        bounded by the group's timeout), and leaves the group."""
        self.ranks.finish()


class TorchDistributedReduction:
    """The :class:`~slicegpt.core.streams.Reduction` of processes in a torch.distributed group.

    Sums are all-reduced and decisions broadcast from rank 0 on the group's wire device (the
    process's GPU under nccl, the host under gloo); tensors elsewhere travel there and back.
    """

    def __init__(self, rank: int, world: int, device: str, group: dist.ProcessGroup | None = None) -> None:
        self.rank, self.processes, self.device, self.group = rank, world, device, group
        self.wire = torch.device(device) if dist.get_backend(group) == "nccl" else torch.device("cpu")

    @property
    def leader(self) -> bool:
        """Rank 0: the process that reports and writes."""
        return self.rank == 0

    def __call__(self, cov: Covariance) -> Covariance:
        count = torch.tensor([cov.count], dtype=torch.float64, device=cov.sum.device)  # exact below 2^53 tokens
        self.sum_([cov.sum, count])
        cov.count = int(count.item())
        return cov

    def sum_(self, tensors: list[torch.Tensor]) -> None:
        for t in tensors:
            if t.device == self.wire and t.is_contiguous():
                dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
            else:
                buf = t.to(self.wire).contiguous()
                dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.group)
                t.copy_(buf)

    def agree(self, tensor: torch.Tensor) -> torch.Tensor:
        buf = tensor.detach().to(self.wire, copy=True).contiguous()
        dist.broadcast(buf, src=0, group=self.group)
        return buf.to(tensor.device)

    def check_same(self, digest: str, what: str) -> None:
        """Every process must hold the same ``what`` (given as a hex digest): on a mismatch every
        process raises :class:`ProcessesDisagree` at once, naming it, instead of waiting or mixing
        two runs."""
        value = int(digest[:15], 16)  # below 2^60: exact in int64
        both = torch.tensor([value, -value], dtype=torch.int64, device=self.wire)
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.group)  # [max, -min]
        if int(both[0]) != -int(both[1]):
            raise ProcessesDisagree(
                f"the {self.processes} torchrun processes differ in {what}: every process must run the same "
                "command on the same model",
                self,
            )

    def share(self, rows: Rows, batch_size: int) -> tuple[Rows, range]:
        return shard_rows(rows, batch_size, self.rank, self.processes)

    def barrier(self) -> None:
        if self.wire.type == "cuda":
            dist.barrier(group=self.group, device_ids=[self.wire.index])
        else:
            dist.barrier(group=self.group)

    def finish(self) -> None:
        """Wait for every process (rank 0 has written), then leave the group."""
        self.barrier()
        dist.destroy_process_group(self.group)


def init_from_env(device: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> TorchDistributedReduction | None:
    """Join the processes torchrun started (env:// rendezvous): gloo for cpu, nccl for cuda, every
    wait bounded by ``timeout_s``. None outside torchrun or with one process."""
    launch = launch_from_env()
    if launch is None:
        return None
    if not timeout_s > 0:
        raise ValueError(f"the distributed timeout must be positive seconds, got {timeout_s}")
    dev = process_device(device, launch)
    backend = "nccl" if dev.startswith("cuda") else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but CUDA is not available on this machine")
        torch.cuda.set_device(torch.device(dev))
    dist.init_process_group(
        backend, init_method="env://", rank=launch.rank, world_size=launch.world, timeout=timedelta(seconds=timeout_s)
    )
    return TorchDistributedReduction(launch.rank, launch.world, dev)
