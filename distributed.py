"""Multi-process training under torchrun: process group set-up and the few collective operations
the loop needs. With one process every function is a cheap no-op, so the loop has one code path.

    torchrun --nproc_per_node=4 main.py --arch resnet18 ...            # one node, 4 GPUs
    torchrun --nnodes=2 --node_rank=R --rdzv_endpoint=HOST:29500 --nproc_per_node=8 main.py ...

NCCL on GPUs, gloo on CPU. --batch_size is per process: the global batch is batch_size x processes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(device_name: str) -> Context:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK); else one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Context()
    ctx = Context(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(ctx.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return ctx


def device_for(ctx: Context, device: torch.device) -> torch.device:
    return torch.device("cuda", ctx.local_rank) if device.type == "cuda" and ctx.enabled else device


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if active():
        dist.barrier()


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


def any_flag(flag: bool, device: torch.device) -> bool:
    """True on every process when any process raised `flag` (all stop at the same update)."""
    if not active():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    return bool(all_reduce_(t, "max").item())


def shutdown() -> None:
    if active():
        dist.destroy_process_group()
