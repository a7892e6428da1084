"""torchrun / DistributedDataParallel helpers: the process group, rank-0 decisions, SyncBatchNorm.

Under ``torchrun`` every rank runs the same job on its share of each batch (gloo on CPU, nccl on GPU);
rank 0 alone writes files and prints. BatchNorm statistics are summed over the ranks by default
(:class:`SyncBatchNorm2d`), so the search sees the same batches as a single process.
"""
from __future__ import annotations

import dataclasses
import os

import torch
import torch.nn as nn

from .settings import TrainerError

__all__ = ["Dist", "setup_dist", "SyncBatchNorm2d", "swap_bn", "ddp_buffer_sync"]


@dataclasses.dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self):
        if self.enabled:
            torch.distributed.barrier()

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            torch.distributed.all_reduce(t)
        return t

    def broadcast_obj(self, obj):
        if not self.enabled:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


def setup_dist(device_arg: str) -> Dist:
    """This process's rank and device from torchrun's environment; joins the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = device_arg.startswith("cuda") or (device_arg == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise TrainerError(f"--device {device_arg} asked for CUDA, but torch sees no CUDA device; "
                           f"use --device cpu (or auto)")
    if want_cuda:
        index = int(device_arg.split(":")[1]) if ":" in device_arg else (local if world > 1 else 0)
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        if device.type == "cpu":  # share the cores between the local processes
            per = max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world)))
            torch.set_num_threads(per)
    return Dist(rank, world, local, device)


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose backward sums the gradients over the ranks too: what
    ``torch.distributed.nn.functional.all_reduce`` does, which torch 2.13 deprecates (its suggested
    replacement, ``torch.distributed._functional_collectives``, is private and has no autograd here)."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        t = t.clone(memory_format=torch.contiguous_format)
        torch.distributed.all_reduce(t)
        return t

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return _SumOverRanks.apply(grad)


def ddp_buffer_sync(sync_every_forward: bool) -> dict:
    """DistributedDataParallel's keyword for syncing buffers from rank 0 before each forward: torch 2.13
    renamed ``broadcast_buffers`` to ``forward_sync_buffers`` (the old name warns), torch 2.11 only has
    the old one. Both sync the buffers at construction as well (the new keyword always does; for the old
    one, ``False`` skipped it, but every rank builds the same model from the same seed, so rank 0's
    buffers are everyone's)."""
    import inspect

    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    key = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
    return {key: sync_every_forward}


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are summed over all ranks (CPU/gloo and CUDA/nccl).

    ``nn.SyncBatchNorm`` only runs on GPUs and is no ``BatchNorm2d`` (the detector and the pruner look
    for BatchNorm2d). Forward all-reduces per-channel sums and squared sums once per layer; the
    all-reduce is differentiable (:class:`_SumOverRanks`), so backward sums the statistics' gradients
    over ranks as well. With one process it is an ordinary BatchNorm2d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and torch.distributed.is_available() and torch.distributed.is_initialized()
                and torch.distributed.get_world_size() > 1):
            return super().forward(x)
        c = x.shape[1]
        xf = x.float()
        count = torch.full((1,), float(xf.numel() // c), device=x.device)
        stats = torch.cat([xf.sum(dim=(0, 2, 3)), (xf * xf).sum(dim=(0, 2, 3)), count])
        stats = _SumOverRanks.apply(stats)
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c:2 * c] / n - mean * mean).clamp_min(0.0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1)).clamp_min(1.0), alpha=m)
        y = (xf - mean[None, :, None, None]) * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


def swap_bn(model: nn.Module, cls) -> nn.Module:
    """Replace every BatchNorm2d (exact type or SyncBatchNorm2d) by ``cls``, sharing parameters."""
    for name, child in list(model.named_children()):
        if type(child) in (nn.BatchNorm2d, SyncBatchNorm2d) and type(child) is not cls:
            new = cls.__new__(cls)
            new.__dict__ = child.__dict__.copy()
            new._parameters = child._parameters.copy()
            new._buffers = child._buffers.copy()
            setattr(model, name, new)
        else:
            swap_bn(child, cls)
    return model
