"""Which layer produces and which layer reads each BatchNorm channel (for LT's filter norms and
ThiNet's next-layer reconstruction), found from the model's traced data flow rather than from its
family, so any traceable CNN works.

- The *producer* of a BN is the conv whose output it normalises, when that conv feeds nothing but
  this BN (a conv on a residual stream that also feeds a shortcut is not the channel's own filter).
- The *consumer* of a BN is the one Conv2d/Linear its output reaches through channel-wise steps only
  (ReLU, pooling, dropout, flatten after a 1×1 pool, a channel gather that keeps every channel). A BN
  whose output also reaches an addition, a concatenation or two layers has no single consumer
  (e.g. the stream BNs of a torchvision ResNet).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..models import ChannelSelection
from ..pruning import bn_layers

__all__ = ["ChannelLink", "channel_links"]

# modules that act on each channel separately (channel c of the output depends only on channel c
# of the input), so a pruned (zero) channel stays a zero channel through them
_CHANNELWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SiLU, nn.Hardswish, nn.MaxPool2d, nn.AvgPool2d,
                        nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Dropout, nn.Dropout2d, nn.Identity,
                        ChannelSelection)
_CHANNELWISE_FUNCTIONS = (F.relu, torch.relu, F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.dropout)
_CHANNELWISE_METHODS = ("relu", "relu_")


@dataclasses.dataclass
class ChannelLink:
    """The layers around one BatchNorm2d (``name``, ``channels``): ``producer`` (a Conv2d, or None) and
    ``consumer`` (a Conv2d or Linear reading exactly these channels in order, or None), with their
    module names."""

    name: str
    channels: int
    producer: nn.Conv2d | None
    producer_name: str | None
    consumer: nn.Module | None
    consumer_name: str | None


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        # a ChannelSelection branches on a shape: traced as one step
        return isinstance(m, ChannelSelection) or super().is_leaf_module(m, qualname)


def _is_channelwise(node: fx.Node, modules: dict) -> bool:
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, ChannelSelection):  # keeps every channel only on an unpruned network
            return m.num_kept == m.num_channels
        return isinstance(m, _CHANNELWISE_MODULES) or isinstance(m, nn.Flatten)
    if node.op == "call_function":
        return node.target in _CHANNELWISE_FUNCTIONS or node.target is torch.flatten
    if node.op == "call_method":
        return node.target in _CHANNELWISE_METHODS or node.target == "flatten"
    return False


def _consumers(node: fx.Node, modules: dict) -> list[fx.Node] | None:
    """Conv2d/Linear nodes reached from ``node`` through channel-wise steps; None when any path meets
    anything else (an add, a concatenation, the output)."""
    found = []
    for user in node.users:
        if user.op == "call_module" and isinstance(modules[user.target], (nn.Conv2d, nn.Linear)):
            found.append(user)
        elif _is_channelwise(user, modules):
            deeper = _consumers(user, modules)
            if deeper is None:
                return None
            found += deeper
        else:
            return None
    return found


def channel_links(model: nn.Module) -> list[ChannelLink]:
    """One :class:`ChannelLink` per BatchNorm2d, in module order (the mask's layout)."""
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # data-dependent control flow and the like
        raise ValueError(f"cannot trace {type(model).__name__} with torch.fx ({type(e).__name__}: {e}); this "
                         f"criterion needs each BatchNorm's producing and consuming layer") from e
    modules = dict(model.named_modules())
    by_bn = {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], nn.BatchNorm2d):
            continue
        bn = modules[node.target]
        producer = producer_name = consumer = consumer_name = None
        src = node.args[0] if node.args else None
        if (isinstance(src, fx.Node) and src.op == "call_module" and isinstance(modules[src.target], nn.Conv2d)
                and len(src.users) == 1 and modules[src.target].groups == 1
                and modules[src.target].out_channels == bn.num_features):
            producer, producer_name = modules[src.target], src.target
        users = _consumers(node, modules)
        # a flatten is channel-wise only after a 1x1 pool: then the consumer's width is the BN's
        if users is not None and len(users) == 1:
            m = modules[users[0].target]
            width = m.in_channels if isinstance(m, nn.Conv2d) else m.in_features
            groups = m.groups if isinstance(m, nn.Conv2d) else 1
            if width == bn.num_features and groups == 1:
                consumer, consumer_name = m, users[0].target
        if node.target in by_bn:  # the same BN module called twice: its channels have no single role
            raise ValueError(f"BatchNorm2d {node.target!r} is called more than once in the forward pass")
        by_bn[node.target] = ChannelLink(node.target, bn.num_features, producer, producer_name, consumer,
                                         consumer_name)
    links = []
    for name, bn in bn_layers(model):
        if name not in by_bn:
            raise ValueError(f"BatchNorm2d {name!r} is not used in the forward pass; its channels cannot be scored")
        links.append(by_bn[name])
    return links

