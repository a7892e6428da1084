"""One training epoch and one evaluation, plus the model plumbing around them (paper §3.1, SPEC §4).

A training epoch is SGD over this rank's batches with the network-slimming L1 subgradient on the BN
scaling factors (``gamma.grad += s * sign(gamma)`` after backward). The learning rate follows the
paper's step schedule (:func:`lr_at`). Losses and accuracies are summed over ranks.

The search's dense accuracy is reported with BatchNorm statistics re-estimated on a few training batches
(:meth:`EpochRunner.evaluate_search`), beside the running statistics' one: at lr 0.1 the running means lag
the weights (an int8 search with nearest-rounded E most, issue 22), so the running-statistics accuracy
understates how good the weights are (measured: 62.5 % running vs 78.4 % re-estimated, fp32 78.7 %).
"""
from __future__ import annotations

import contextlib
import copy
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import _rng
from .. import data as data_mod
from .dist import Dist, SyncBatchNorm2d, ddp_buffer_sync, swap_bn
from .settings import TrainerError

__all__ = ["lr_at", "EpochRunner", "local_batch_size", "build_dense_model", "prepare_for_training", "make_optimizer",
           "float_copy", "add_l1_subgradient", "int8_layers_line", "search_qconfig"]


def lr_at(epoch: int, base_lr: float, total_epochs: int) -> float:
    """The paper's step schedule scaled to the run length: ÷10 at 50 % and at 75 % of the epochs
    (epochs 80 and 120 of 160). ``epoch`` counts from 0."""
    lr = base_lr
    if epoch >= int(0.5 * total_epochs):
        lr *= 0.1
    if epoch >= int(0.75 * total_epochs):
        lr *= 0.1
    return lr


def _autocast(device: torch.device, precision: str, cache: bool = True, int8_autocast: bool = True):
    """bf16 autocast for ``precision="bf16"``, and for the float parts of the int8 search (BatchNorm,
    activations, depthwise convs, the head: the int8 layers and fused chains hand bfloat16 on under it)
    unless ``int8_autocast`` is off (``--no-int8-autocast``)."""
    if precision == "bf16" or (precision == "int8" and int8_autocast):
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache)
    return contextlib.nullcontext()


def _layout(x: torch.Tensor, precision: str) -> torch.Tensor:
    """The int8 search runs channels-last (NHWC: the layout of the int8 kernels' codes)."""
    if precision == "int8" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def add_l1_subgradient(bns, sparsity: float) -> None:
    """Network slimming: ``gamma.grad += s * sign(gamma)`` for every BatchNorm, in two multi-tensor ops."""
    pairs = [(bn.weight.grad, bn.weight.detach()) for bn in bns if bn.weight.grad is not None]
    if sparsity > 0 and pairs:
        grads, weights = zip(*pairs)
        torch._foreach_add_(list(grads), torch._foreach_sign(list(weights)), alpha=sparsity)


def search_qconfig(s):
    """The int8 search's ``QConfig`` from the settings (``--int8-mode``, ``--int8-rounding-e``)."""
    from ..config import QConfig

    return QConfig(mode=s.int8_mode, rounding_e=s.int8_rounding_e)


def prepare_for_training(model: nn.Module, precision: str, dist: Dist, sync_bn: bool, qconfig=None):
    """``(model, wrapped)``: the model on this rank's device (int8 layers with ``qconfig`` for
    ``precision="int8"``, SyncBatchNorm2d under torchrun when ``sync_bn``), and what to call forward on (DDP or
    the model)."""
    model = model.to(dist.device)
    if precision == "int8":
        from ..models import is_grouped_conv
        from ..convert import quantize_model

        model = quantize_model(model, qconfig, skip=is_grouped_conv)
    if dist.enabled and sync_bn:
        model = swap_bn(model, SyncBatchNorm2d)
    if not dist.enabled:
        return model, model
    import warnings

    from torch.nn.parallel import DistributedDataParallel as DDP

    # 1-input-channel conv weights have ambiguous strides; DDP's notice about it is harmless
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    ids = [dist.device.index] if dist.device.type == "cuda" else None
    return model, DDP(model, device_ids=ids, **ddp_buffer_sync(not sync_bn))


def local_batch_size(batch_size: int, world_size: int, n_train: int) -> int:
    """This process's share of the global batch; BatchNorm needs 2 samples per process and batch (a
    last batch of one is merged into the one before, see ``data.iterate_batches``)."""
    if batch_size % world_size:
        raise TrainerError(f"--batch-size {batch_size} must be divisible by the number of processes "
                           f"({world_size}): it is the global batch, split evenly over the ranks")
    if batch_size // world_size < 2:
        raise TrainerError(f"--batch-size {batch_size} over {world_size} processes gives batches of one sample; "
                           f"BatchNorm cannot train on those: accepted: at least 2 per process "
                           f"(--batch-size {2 * world_size} or more)")
    if -(-n_train // world_size) < 2:
        raise TrainerError(f"the training set has {n_train} sample(s) for {world_size} process(es); BatchNorm "
                           f"cannot train on one sample: accepted: at least {world_size + 1} training samples "
                           f"(--train-subset)")
    if batch_size > n_train:
        raise TrainerError(f"--batch-size {batch_size} is larger than the training set ({n_train} samples): an epoch "
                           f"would be one step on a batch that is not full, and the ticket would be drawn from a "
                           f"barely trained network; accepted: at most {n_train} (or a larger --train-subset)")
    return batch_size // world_size


def build_dense_model(s, ds) -> nn.Module:
    """The dense network of the settings for the dataset, seeded with ``s.seed``."""
    from ..models import build_model

    torch.manual_seed(s.seed)
    _rng.manual_seed(s.seed)  # the int8 layers' stochastic rounding (device-side state)
    try:
        kw = {} if s.width == 1.0 else {"width": s.width}
        if s.small_stem:
            kw["small_stem"] = True
        model = build_model(s.model, num_classes=ds.num_classes, in_channels=ds.in_channels, **kw)
    except (ValueError, KeyError, TypeError, ImportError) as e:
        raise TrainerError(f"--model {s.model!r}: {e}") from e
    if not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        raise TrainerError(f"--model {s.model!r} has no BatchNorm2d layers: the detector needs BN scaling factors")
    try:  # an ImageNet stem or five pools on 8-16 px images fail here, before a run directory exists
        with torch.no_grad():
            model.eval()(torch.zeros((1, *ds.input_shape)))
    except RuntimeError as e:
        raise TrainerError(f"--model {s.model!r} cannot run on {ds.name} images of shape {ds.input_shape} ({e}); "
                           f"accepted: a model whose downsampling leaves them at least 1x1 (for torchvision models "
                           f"try --small-stem, or a dataset with larger images)") from e
    return model.train()


def int8_layers_line(model: nn.Module) -> str:
    """What ``quantize_model`` swapped for the int8 search, and what it kept in float."""
    from ..fusion import fused_chains
    from ..modules import QConv2d, QLinear

    q = [m for m in model.modules() if isinstance(m, (QConv2d, QLinear))]
    grouped = [n for n, m in model.named_modules() if type(m) is nn.Conv2d and m.groups > 1]
    plain = [n for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear) and n not in grouped]
    line = (f"int8 search layers: {sum(isinstance(m, QConv2d) for m in q)} Conv2d and "
            f"{sum(isinstance(m, QLinear) for m in q)} Linear swapped to QConv2d/QLinear")
    if grouped:
        line += (f"; {len(grouped)} grouped/depthwise Conv2d kept in float (the int8 kernels run them on a slow "
                 f"reference path): {', '.join(grouped[:4])}{', ...' if len(grouped) > 4 else ''}")
    if plain:
        line += f"; {len(plain)} other layer(s) kept in float"
    chains = fused_chains(model)
    if chains:
        line += f"; {len(chains)} conv/BatchNorm/activation chains run as fused int8 blocks (ebkernels.fusion)"
    return line


def make_optimizer(model: nn.Module, settings) -> torch.optim.Optimizer:
    s = settings
    return torch.optim.SGD(model.parameters(), lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)


def float_copy(model: nn.Module) -> nn.Module:
    """A plain-float copy of a training model (no QConv2d/QLinear, no SyncBatchNorm2d)."""
    m = copy.deepcopy(model)
    if any(type(x).__name__ in ("QConv2d", "QLinear") for x in m.modules()):
        from ..convert import dequantize_model

        m = dequantize_model(m)
    return swap_bn(m, nn.BatchNorm2d)


class EpochRunner:
    """Trains and evaluates on one dataset with this rank's share of each (global) batch."""

    def __init__(self, ds, dist: Dist, local_batch: int, seed: int, augment: bool, show_progress: bool,
                 int8_autocast: bool = True):
        self.ds, self.dist, self.local_batch = ds, dist, local_batch
        self.seed, self.augment, self.show_progress = seed, augment, show_progress
        self.int8_autocast = int8_autocast

    def autocast(self, precision: str, cache: bool = True):
        """The autocast context a training step / an evaluation of this precision runs in."""
        return _autocast(self.dist.device, precision, cache, self.int8_autocast)

    def _bar(self, total: int, desc: str):
        from tqdm import tqdm

        disable = not (self.show_progress and self.dist.is_main)
        # disable=None: tqdm turns itself off when stderr is not a terminal (logs, CI)
        return tqdm(total=total, desc=desc, leave=False, disable=True if disable else None,
                    dynamic_ncols=True, file=sys.stderr)

    def graphed_step(self, model, sparsity: float, precision: str):
        """A ``GraphedStep`` for ``--cuda-graphs`` (see ``train/graphs.py``)."""
        from .graphs import GraphedStep

        bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d) and m.weight is not None]
        return GraphedStep(model, bns, sparsity, lambda: self.autocast(precision, cache=False))

    def train_epoch(self, model, wrapped, opt, epoch: int, lr: float, sparsity: float, precision: str,
                    desc: str, graphed=None) -> dict:
        for g in opt.param_groups:
            g["lr"] = lr
        model.train()
        bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d) and m.weight is not None]
        dev = self.dist.device
        stats = torch.zeros(3, dtype=torch.float64, device=dev)  # loss sum, correct, count
        n_batches = data_mod.num_batches(self.ds, self.local_batch, True, self.dist.world_size)
        bar = self._bar(n_batches, desc)
        for i, (x, y) in enumerate(data_mod.iterate_batches(
                self.ds, self.local_batch, train=True, epoch=epoch, seed=self.seed, rank=self.dist.rank,
                world_size=self.dist.world_size, augment=self.augment, device=dev)):
            x = _layout(x, precision)
            if graphed is not None:  # forward, loss, backward and the L1 term replayed from a CUDA graph
                loss, logits = graphed.step(x, y, opt)
            else:
                with self.autocast(precision):
                    logits = wrapped(x)
                loss = F.cross_entropy(logits.float(), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                add_l1_subgradient(bns, sparsity)  # network slimming: L1 on the BN scaling factors
            opt.step()
            with torch.no_grad():
                stats += torch.stack([loss.detach().double() * len(y),
                                      (logits.argmax(1) == y).sum().double(),
                                      torch.tensor(float(len(y)), dtype=torch.float64, device=dev)])
            bar.update(1)
            if i % 10 == 0 and bar.disable is False:
                bar.set_postfix(loss=f"{stats[0].item() / max(stats[2].item(), 1):.3f}")
        bar.close()
        stats = self.dist.all_sum(stats)
        loss_sum, correct, count = stats.tolist()
        return {"train_loss": loss_sum / max(count, 1), "train_acc": 100.0 * correct / max(count, 1)}

    @torch.no_grad()
    def recalibrated(self, model, precision: str, n_batches: int) -> nn.Module:
        """A copy of ``model`` whose BatchNorm running statistics are re-estimated with its current weights:
        reset, then the cumulative average (momentum None) over the first ``n_batches`` training batches of
        this rank (epoch 0's order, no augmentation: the test images have none), forward only. ``model``,
        the random states and so the search itself are left as they were."""
        m = copy.deepcopy(model)
        for bn in m.modules():
            if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.track_running_stats:
                bn.reset_running_stats()
                bn.momentum = None
        m.train()
        dev = self.dist.device
        states = torch.get_rng_state(), _rng.get_state()
        try:
            batches = data_mod.iterate_batches(self.ds, self.local_batch, train=True, epoch=0, seed=self.seed,
                                               rank=self.dist.rank, world_size=self.dist.world_size, augment=False,
                                               device=dev)
            for _, (x, _) in zip(range(n_batches), batches):
                with _autocast(dev, precision):
                    m(_layout(x, precision))
        finally:
            torch.set_rng_state(states[0])
            _rng.set_state(states[1])
        return m.eval()

    def evaluate_search(self, model, precision: str, recal_batches: int) -> dict:
        """The search's evaluation: ``test_acc``/``test_loss`` with BatchNorm statistics re-estimated on
        ``recal_batches`` training batches (:meth:`recalibrated`), and ``test_acc_running``/``test_loss_running``
        with the running statistics; ``recal_batches`` 0: the running statistics only (as ``evaluate``)."""
        running = self.evaluate(model, precision)
        if recal_batches <= 0:
            return running
        test = self.evaluate(self.recalibrated(model, precision, recal_batches), precision)
        return {**test, "test_acc_running": running["test_acc"], "test_loss_running": running["test_loss"]}

    @torch.no_grad()
    def evaluate(self, model, precision: str = "fp32") -> dict:
        model.eval()
        dev = self.dist.device
        stats = torch.zeros(3, dtype=torch.float64, device=dev)
        for x, y in data_mod.iterate_batches(self.ds, max(self.local_batch, 256), train=False,
                                             rank=self.dist.rank, world_size=self.dist.world_size, device=dev):
            with self.autocast(precision):
                logits = model(_layout(x, precision))
            stats += torch.stack([F.cross_entropy(logits.float(), y, reduction="sum").double(),
                                  (logits.argmax(1) == y).sum().double(),
                                  torch.tensor(float(len(y)), dtype=torch.float64, device=dev)])
        loss_sum, correct, count = self.dist.all_sum(stats).tolist()
        return {"test_loss": loss_sum / max(count, 1), "test_acc": 100.0 * correct / max(count, 1)}
