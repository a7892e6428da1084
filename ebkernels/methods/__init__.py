"""Ticket criteria behind one interface: ``method.masks(model, data, ratios) -> {ratio: (mask, report)}``.

Every criterion returns a *channel* mask over the BatchNorm2d channels in module order (the layout of
:func:`ebkernels.channel_mask`), which :func:`ebkernels.prune` applies physically; the trainer
(``ebkernels --method NAME``) then retrains, summarises and accounts for all of them alike.

====== ============================================================ ========== ================
name   criterion                                                    drawn      ticket weights
====== ============================================================ ========== ================
eb     |γ| (network slimming's L1 on γ), at the detector's epoch     early      trained so far
ns     |γ| after full training with L1 on γ (``--baseline``)          trained    trained
lt     filter ℓ1 norm / layer mean, after full training               trained    rewound to init
snip   |dL/dg| of a gate per BN channel, a few batches                init       initial
synflow iterative synaptic flow per BN channel, no data, 100 rounds   init       initial
thinet greedy next-layer reconstruction on sampled activations        trained    trained
====== ============================================================ ========== ================

Each lives in its own module (``eb.py``, ``ns.py``, ``lt.py``, ``snip.py``, ``synflow.py``,
``thinet.py``); ``base.py`` holds the interface and the shared mask rule.
"""
from __future__ import annotations

from .base import DRAWS, TICKET_WEIGHTS, ScoringData, TicketMethod, mask_from_scores
from .eb import EarlyBirdTicket
from .lt import LotteryTicket
from .ns import NetworkSlimming
from .snip import Snip
from .synflow import SynFlow
from .thinet import ThiNet

__all__ = ["METHOD_NAMES", "get_method", "TicketMethod", "ScoringData", "mask_from_scores", "EarlyBirdTicket",
           "NetworkSlimming", "LotteryTicket", "Snip", "SynFlow", "ThiNet", "DRAWS", "TICKET_WEIGHTS"]

_CLASSES = {cls.name: cls for cls in (EarlyBirdTicket, NetworkSlimming, LotteryTicket, Snip, SynFlow, ThiNet)}
METHOD_NAMES = tuple(_CLASSES)


def get_method(name: str, **options) -> TicketMethod:
    """The criterion called ``name``; ``options`` go to its constructor (``synflow``: ``rounds``)."""
    if name not in _CLASSES:
        raise ValueError(f"unknown ticket method {name!r}; accepted: {', '.join(METHOD_NAMES)}")
    return _CLASSES[name](**options)
