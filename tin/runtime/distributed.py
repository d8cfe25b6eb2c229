"""Multi-process training under torchrun: process group set-up and the few collective operations
the loop needs. With one process every function is a cheap no-op, so the loop has one code path.

    torchrun --nproc_per_node=4 main.py --arch resnet18 ...            # one node, 4 GPUs
    torchrun --nnodes=2 --node_rank=R --rdzv_endpoint=HOST:29500 --nproc_per_node=8 main.py ...

NCCL on GPUs, gloo on CPU. --batch_size is per process: the global batch is batch_size x processes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from utils import UserError

# NCCL's watchdog ends a job whose collective waits longer than this; the decode cache of a big
# folder dataset, built once per node before training, can take longer: that wait is on gloo.
TIMEOUT = timedelta(minutes=float(os.environ.get("TIN_DIST_TIMEOUT_MIN", "30")))
CACHE_TIMEOUT = timedelta(hours=4)
_cpu_group = None  # a gloo group for waits on the host (cache builds), with CACHE_TIMEOUT


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device_index: int = 0  # this process's CUDA device (0 when each process sees one GPU)

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(device_name: str) -> Context:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK); else one process.
    NCCL on GPUs, gloo on CPU; only rank 0 draws progress bars."""
    global _cpu_group
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Context()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    index = cuda_index(local_rank) if use_cuda else 0
    if use_cuda:
        torch.cuda.set_device(index)
    if rank != 0:
        os.environ["TQDM_DISABLE"] = "1"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=TIMEOUT)
    _cpu_group = dist.new_group(backend="gloo", timeout=CACHE_TIMEOUT) if use_cuda else None
    return Context(rank, world, local_rank, index)


def cuda_index(local_rank: int) -> int:
    """The GPU of local process `local_rank`: its own index when it sees all of the node's GPUs,
    0 when the scheduler gives each process one (SLURM --gpus-per-task=1, CUDA_VISIBLE_DEVICES)."""
    count = torch.cuda.device_count()
    if count == 1:
        return 0
    if local_rank < count:
        return local_rank
    raise UserError(
        f"torchrun's LOCAL_RANK is {local_rank} but this process sees {count} GPUs; start at most {count} processes "
        "per node (--nproc_per_node), or give each process its own GPU"
    )


def device_for(ctx: Context, device: torch.device) -> torch.device:
    return torch.device("cuda", ctx.device_index) if device.type == "cuda" and ctx.enabled else device


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if active():
        dist.barrier()


def barrier_long() -> None:
    """A barrier for long host-side waits (a node building the decode cache): on gloo, with hours of
    timeout, so NCCL's watchdog never fires while one process decodes images."""
    if active():
        dist.barrier(group=_cpu_group)


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In place across processes (sum or max); unchanged with one process."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor


def broadcast(obj: Any) -> Any:
    """Rank 0's value of a picklable object, on every process."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every process, in place: each process
    saw its own shard, so without this each would evaluate with its own statistics."""
    if active():
        for buf in module.buffers():
            dist.broadcast(buf.data, src=0)


def gather(obj: Any) -> list[Any]:
    """[value of rank 0, value of rank 1, ...] on every process."""
    if not active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def interleave(parts: list[list[Any]]) -> list[Any]:
    """Undo a strided split: process r held items r, r + world, r + 2 world, ..."""
    out: list[Any] = [None] * sum(len(p) for p in parts)
    for r, part in enumerate(parts):
        out[r :: len(parts)] = part
    return out


def agree(values: list[float], device: torch.device) -> list[float]:
    """The largest of each value across processes, on every process: one small all-reduce (and one
    read of the device), so that all take the same decision — stop, and why. Unchanged with one
    process."""
    if not active():
        return [float(v) for v in values]
    return all_reduce_(torch.tensor([float(v) for v in values], device=device), "max").tolist()


def shutdown() -> None:
    if active():
        dist.destroy_process_group()
