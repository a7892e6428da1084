"""Physical channel pruning of a drawn ticket, its cost, re-initialisation, and ticket files (SPEC §4).

``prune(model, mask)`` returns a smaller copy whose layers hold copied slices of the original
weights. The mask covers every ``nn.BatchNorm2d`` in ``model.modules()`` order (True = keep), the
order of ``ebkernels.channel_mask``; or it is a dict ``{bn_module_name: bool tensor}``. Two engines:

- ``families.py``: ebkernels' own families (VGG, pre-activation ResNet, BasicBlock ResNets, also
  torchvision's resnet18/34), pruned by hand-written, exactly tested rules. No extra dependency.
- ``graph.py``: any other CNN (torchvision's ResNet-50, MobileNet-V2, VGG-BN, DenseNet, ...) through
  torch-pruning's dependency graph; channels that must move together are decided per coupled group by
  the rule in ``coupling.py`` (``coupled="majority"`` by default). It does not understand the channel
  gather of ebkernels' PreResNet, which is why the families keep their own pruner.
- ``costs.py``: parameters and multiply-adds; ``masks.py``: the mask layout and per-BN bookkeeping;
  ``equivalence.py``: the final check; ``engine.py``: ``prune`` itself; ``tickets.py``: ``reinit``,
  ``save_ticket``, ``load_ticket``; ``programs.py``: a ticket's network as a ``torch.export`` program.

No layer is left with zero channels: a layer (or coupled group) whose mask keeps nothing keeps its
largest-|gamma| channel, with a warning, and is listed in ``report["rescued"]``.

``report["effective_mask"]`` is the mask the pruned network implements: zeroing gamma and beta of
every BN channel where it is False gives a network that computes the same outputs in eval mode.
``prune`` checks exactly that in float64 before it returns (``verify=True``).
"""
from __future__ import annotations

from .costs import count_flops, count_params
from .coupling import COUPLED_RULES
from .engine import ENGINES, prune
from .masks import bn_layers
from .tickets import load_ticket, reinit, save_ticket

__all__ = ["prune", "count_params", "count_flops", "reinit", "save_ticket", "load_ticket", "bn_layers", "ENGINES",
           "COUPLED_RULES"]
