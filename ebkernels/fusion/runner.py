"""Runs a model with its matched chains fused: the traced graph is rewritten (each chain one call of
``ops.fused.block``, the int8 region of ``region`` around them), compiled to Python by ``torch.fx``, and
installed as the model's ``forward`` through an instance attribute (``FusedForward``), so the modules,
Parameters, buffers, ``state_dict`` and type of the model stay what they are.

The compiled forward looks every module up on the model at each call, as the original forward does. Before
it runs, ``Plan.current`` checks cheaply (identity of the children of the traced containers, hooks of the
fused layers and of those containers, their ``training`` flags, the fused convs' qconfig and weight dtype)
that the model is still what was traced; when something changed (a pruned or replaced layer, a hook, a
``SyncBatchNorm`` swap, ``.train()`` / ``.eval()``), the plan for the new state is taken from a small cache or
built again, and a chain that no longer fuses runs its layers as they are. Inputs the fused kernels do not
take (an empty batch, a float dtype other than the model's outside autocast) and global module hooks run the
model's own forward.
"""
from __future__ import annotations

import logging
import operator
from collections import OrderedDict
from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn

from ..modules import QConv2d, QLinear
from ..ops.fused.block import (BlockInput, BlockLinks, BlockOutput, BlockSpec, BnActSpec, BnSource, GradLink,
                               Int8Activation, bn_act, fused_block)
from ..ops.fused.relu_mask import relu_keep_mask
from ..ops.fused.layouts import channel_major_input, weight_item
from ..ops.weight_step import active_weight_batch, linear_item, prepare_weight_batch
from ..ops.fused.dense_cat import dense_cat
from ..ops.gemm.pointwise import pointwise_weight
from .links import cat_pieces, grad_links
from .matcher import Chain, match
from .patterns import BN_ACT, CONV_ON_CODES, POST_ACTIVATION, PRE_ACTIVATION, hooked, pool_args
from .region import REGION_DTYPE, call_in_bf16, exit_cast, plan_region
from .trace import trace

__all__ = ["FusedForward", "Plan", "build_plan"]

log = logging.getLogger("ebkernels")
_CACHE_SIZE = 4
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")


def _spec(chain: Chain):
    """The ``ops.fused`` spec of a chain (its modules by reference; float outputs in the region's dtype)."""
    act_after = chain.role("act", after_conv=True)
    bn_after = chain.role("bn", after_conv=True)
    gather = chain.role("gather")
    if chain.pattern is BN_ACT:
        return BnActSpec(bn=chain.roles[0].module, act=chain.role("act").act,
                         select=gather.module if gather else None, out_dtype=REGION_DTYPE)
    pool = chain.role("pool", after_conv=True)
    codes_out = chain.codes_out
    spec = BlockSpec(conv=chain.role("conv").module, bn=bn_after.module if bn_after else None,
                     act=act_after.act if act_after else "identity", pool=pool_args(pool.module) if pool else None,
                     output=BlockOutput.CODES if codes_out else BlockOutput.FLOAT,
                     out_qconfig=chain.consumers[0].module.qconfig if codes_out else None,
                     out_dtype=None if codes_out else REGION_DTYPE, residual=chain.residual is not None)
    if chain.pattern in (POST_ACTIVATION, CONV_ON_CODES):
        spec.input = BlockInput.CODES if chain.codes_in else BlockInput.FLOAT
    else:
        act_in = chain.role("act")
        spec.input, spec.bn_in = BlockInput.BN, chain.roles[0].module
        spec.act_in, spec.select = act_in.act if act_in else "identity", gather.module if gather else None
    return spec


def _source_args(spec, extra: tuple) -> tuple:
    """What ``keep_bn_input`` may rebuild a pre-activation BatchNorm's input from (``BnSource``), from the
    values the compiled forward hands the chain: the concatenation's pieces, or the conv's codes and xprev."""
    src = spec.bn_source
    if src is None or not extra:
        return ()
    if src.kind == "cat":
        return tuple(extra[0])
    codes, xprev = extra
    conv = src.conv.conv
    if not isinstance(codes, Int8Activation) or not isinstance(xprev, torch.Tensor):
        return ()
    return codes.codes, codes.scale, xprev, conv.weight, conv.bias


def _runner(spec, index: int):
    """The function the compiled forward calls for one chain (named, so the generated code reads well)."""
    if isinstance(spec, BnActSpec):
        def run(x, *extra):
            return bn_act(spec, x, _source_args(spec, extra))
    else:
        def run(x, *extra, residual=None, links=None):
            return fused_block(spec, x, _source_args(spec, extra), residual, links)
    run.__name__ = run.__qualname__ = f"fused_chain_{index}"
    run.__module__ = __name__
    return run


def _inplace_users(node: fx.Node, modules: dict) -> bool:
    """Whether an operation changes ``node``'s value in place (then a chain must keep a copy of it)."""
    for u in node.users:
        name = u.target if isinstance(u.target, str) else getattr(u.target, "__name__", "")
        if u.op == "call_module":
            if getattr(modules[u.target], "inplace", False):
                return True
        elif u.kwargs.get("inplace") or (name.endswith("_") and not name.startswith("__")) or \
                u.target in (operator.iadd, operator.isub, operator.imul, operator.itruediv):
            return True
    return False


def _bn_sources(chains: list, specs: list, modules: dict) -> dict:
    """chain index -> (BnSource, the nodes whose values the chain gets): a pre-activation chain reading a
    concatenation along channels keeps its pieces; one reading ``conv on codes + xprev`` (a ``CONV_ON_CODES``
    chain with its residual add), where xprev is what another pre-activation chain keeps, replays the conv and
    its epilogue's add in backward (every other block of a residual stream: the one before keeps its input)."""
    index = {id(c): i for i, c in enumerate(chains)}
    by_last = {c.last: c for c in chains}
    pre = [c for c in chains if c.pattern in (PRE_ACTIVATION, BN_ACT)]
    keeps = {c.source: c for c in reversed(pre)}
    out, replaying = {}, set()
    for c in pre:
        src = c.source
        r = by_last.get(src)
        pieces = cat_pieces(src)
        if pieces is not None:
            out[index[id(c)]] = (BnSource("cat"), (pieces,))
        elif r is not None and r.pattern is CONV_ON_CODES and r.residual is not None:
            # the conv on codes with the residual add in its epilogue: replayed as it ran
            xprev = r.residual
            before = keeps.get(xprev)
            if before is not None and before is not c and id(before) not in replaying:
                out[index[id(c)]] = (BnSource("residual", specs[index[id(r)]]), (r.source, xprev))
                replaying.add(id(c))
    return out


def _stats_pairs(chains: list, specs: list) -> dict:
    """putter chain index -> taker chain index: a pre-activation chain (its input kept as is) reading the output
    of a ``CONV_ON_CODES`` chain with its residual add gets its BatchNorm statistics from that conv's launch
    (``stages.conv_next_bn_forward``; while its gather keeps every channel): one pass over the stream fewer."""
    by_last = {c.last: i for i, c in enumerate(chains)}
    out = {}
    for j, c in enumerate(chains):
        i = by_last.get(c.source)
        if (c.pattern is PRE_ACTIVATION and i is not None and chains[i].pattern is CONV_ON_CODES
                and chains[i].residual is not None and specs[j].keep_input and i not in out):
            out[i] = j
            specs[i].next_bn, specs[i].next_act, specs[i].next_select = specs[j].bn_in, specs[j].act_in, specs[j].select
    return out


def new_grad_link(stochastic: bool = False) -> Optional[GradLink]:
    """A fresh ``GradLink`` for one forward (None under ``torch.compile``: the blocks return every gradient)."""
    return None if torch.compiler.is_compiling() else GradLink(stochastic)


def _rewrite(graph: fx.Graph, chains: list, region, modules: dict):
    """(a new graph: each chain one call of its runner, the region's local autocast and casts inserted; the
    chains' specs)."""
    out = fx.Graph()
    env: dict = {}
    inner = {n for c in chains for n in c.nodes[:-1]}
    by_last = {c.last: (i, c) for i, c in enumerate(chains)}
    specs = [_spec(c) for c in chains]
    sources = _bn_sources(chains, specs, modules)
    links = grad_links(graph, chains)
    made: dict = {}  # link id -> the node of its GradLink
    for i, c in enumerate(chains):
        if c.pattern in (PRE_ACTIVATION, BN_ACT):
            specs[i].keep_input = not _inplace_users(c.source, modules)
            specs[i].bn_source = sources.get(i, (None, ()))[0]
        if isinstance(specs[i], BlockSpec) and specs[i].output is BlockOutput.CODES and specs[i].pool is None:
            # the codes also channel-major when every conv reading them takes them so in its weight-grad
            specs[i].out_channel_major = all(channel_major_input(r.module) for r in c.consumers)
    stats_puts = _stats_pairs(chains, specs)
    stats_takes = {j: i for i, j in stats_puts.items()}

    def arg(a, dtype=None):
        v = env[a]
        return out.call_function(exit_cast, (v, dtype)) if dtype is not None else v

    for n in graph.nodes:
        if n in inner:
            continue
        dtype = region.casts.get(n)
        mapped = lambda a: arg(a, dtype)  # noqa: E731
        if n in by_last:
            i, c = by_last[n]
            extra = fx.map_arg(sources.get(i, (None, ()))[1], lambda a: env[a])
            kwargs = {"residual": env[c.residual]} if c.residual is not None else {}
            kw = {}
            if i in links.takes:  # the link is made before its taker runs, which is before its putter
                made[links.takes[i]] = kw["grad_from"] = out.call_function(new_grad_link, ())
            if i in links.puts:
                kw["grad_to"] = made[links.puts[i]]
            if i in links.amax_takes:  # (here the taker runs first in forward, last in backward)
                stochastic = specs[i].conv.qconfig.rounding_e == "stochastic"
                made[links.amax_takes[i]] = kw["amax_from"] = out.call_function(new_grad_link, (stochastic,))
            if i in links.amax_puts:
                kw["amax_to"] = made[links.amax_puts[i]]
            if i in stats_puts:  # forward: the putter runs first
                made[("stats", i)] = kw["stats_to"] = out.call_function(new_grad_link, ())
            if i in stats_takes:
                kw["stats_from"] = made[("stats", stats_takes[i])]
            if kw:
                kwargs["links"] = out.call_function(BlockLinks, (), kw)
            env[n] = out.call_function(_runner(specs[i], i), (env[c.source], *extra), kwargs)
        elif n in links.cats and n not in region.casts:
            lid, passed = links.cats[n]
            env[n] = out.call_function(dense_cat, (tuple(env[a] for a in n.args[0]), made[lid], passed))
        elif n in region.masked:
            env[n] = out.call_function(relu_keep_mask, (env[n.all_input_nodes[0]],))
        elif n in region.in_bf16:
            mod = out.get_attr(n.target)
            env[n] = out.call_function(call_in_bf16, (mod, *fx.map_arg(n.args, mapped)),
                                       fx.map_arg(n.kwargs, mapped))
        else:
            env[n] = out.node_copy(n, mapped)
    return out, specs


def _linear_weight(m: nn.Module) -> Optional[torch.Tensor]:
    """The (out, in) weight of an int8 ``QLinear``, or of a ``QConv2d`` that runs as one on 1×1 maps, as the weight
    batch holds it; None for other modules."""
    if type(m) is QLinear and m.qconfig.bits_w is not None and m.weight.dim() == 2:
        return m.weight
    if (type(m) is QConv2d and m.qconfig.bits_w is not None and m.kernel_size == (1, 1) and m.groups == 1
            and m.padding in ((0, 0), "valid") and m.padding_mode == "zeros"):
        return pointwise_weight(m.weight)
    return None


class Plan:
    """How the model runs in one state of its modules: the compiled forward (None: its own forward), the fused
    chains' lines, and what ``current`` checks."""

    def __init__(self, model: nn.Module, report):
        self.fn = None
        self.lines: list = []
        self.block_specs: list = []
        self.linears: list = []
        self.dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.get_default_dtype())
        modules = dict(model.named_modules())
        traced = trace(model, report)
        containers = [""] if traced is None else ["", *traced.containers]
        parents = [modules[n] for n in containers]
        self._edges = [(p, k, c) for p in parents for k, c in p._modules.items()]
        self._sizes = [(p, len(p._modules)) for p in parents]
        self._flags = [(m, m.training) for m in parents]
        self._hooks, self._convs = list(parents), []
        if traced is None:
            return
        chains = match(traced.graph, modules, report)
        region = plan_region(traced.graph, chains, modules, model, self.dtype)
        if not chains and not region.masked:
            return  # nothing to gain: the model's own forward
        for c in chains:
            for r in c.roles + c.consumers:
                if r.module is not None:
                    self._hooks.append(r.module)
                    if type(r.module) is QConv2d:
                        self._convs.append((r.module, r.module.qconfig, r.module.weight.dtype))
        self._hooks += [modules[n.target] for n in region.masked if n.op == "call_module"]
        graph, specs = _rewrite(traced.graph, chains, region, modules)
        self.block_specs = [s for s in specs if isinstance(s, BlockSpec)]
        # the int8 Linears the forward calls, and its 1×1 convs outside the chains (on 1×1 maps they run as
        # Linears: ``ops.gemm.pointwise``): their weights join the step's weight batch
        fused = {id(m) for m, _, _ in self._convs}
        self.linears = [m for m in (modules[n.target] for n in traced.graph.nodes if n.op == "call_module")
                        if _linear_weight(m) is not None and id(m) not in fused]
        code = graph.python_code(root_module="self")
        scope = dict(code.globals)
        exec(compile(code.src, f"<ebkernels fused forward of {type(model).__name__}>", "exec"), scope)  # noqa: S102
        self.fn = scope["forward"]
        self.lines = [c.describe() for c in chains]

    def current(self) -> bool:
        """Whether the model is still in the state this plan was made for (cheap: no walk of the tree)."""
        for p, k, c in self._edges:
            if p._modules.get(k) is not c:
                return False
        for p, n in self._sizes:
            if len(p._modules) != n:
                return False
        for m, training in self._flags:
            if m.training != training:
                return False
        for m in self._hooks:
            if hooked(m):
                return False
        for conv, qconfig, dtype in self._convs:
            if conv.qconfig is not qconfig or conv.weight.dtype != dtype:
                return False
        return True


def _state_key(model: nn.Module) -> tuple:
    """Everything a plan depends on, by value (the slow path, when ``Plan.current`` says no)."""
    return tuple((id(m), m.training, hooked(m), id(getattr(m, "qconfig", None)),
                  tuple(t.dtype for t in m._parameters.values() if t is not None)) for m in model.modules())


def build_plan(model: nn.Module, report=None) -> Plan:
    """A plan for ``model`` as it is now; ``report(line)`` gets why a part of it does not fuse."""
    return Plan(model, report or (lambda line: None))


class FusedForward:
    """The ``forward`` of a model with fused chains (module docstring). ``original`` is the model's own."""

    def __init__(self, module: nn.Module, plan: Optional[Plan] = None):
        self.module = module
        self._plans: OrderedDict = OrderedDict()
        self._plan = plan
        self._reported: set = set()
        if plan is not None:
            self._plans[_state_key(module)] = plan

    def _report(self, line: str) -> None:
        if line not in self._reported:
            self._reported.add(line)
            log.info("fusion: %s", line)

    def plan(self) -> Plan:
        """The plan for the model's current state (cached, or built now)."""
        if self._plan is not None and self._plan.current():
            return self._plan
        key = _state_key(self.module)
        plan = self._plans.get(key)
        if plan is None or not plan.current():
            plan = build_plan(self.module, self._report)
            self._plans[key] = plan
            while len(self._plans) > _CACHE_SIZE:
                self._plans.popitem(last=False)
        self._plans.move_to_end(key)
        self._plan = plan
        return plan

    def original(self, *args, **kwargs):
        return type(self.module).forward(self.module, *args, **kwargs)

    def _runnable(self, plan: Plan, args, kwargs) -> bool:
        if plan.fn is None or any(getattr(nn.modules.module, h) for h in _GLOBAL_HOOKS):
            return False
        for t in list(args) + list(kwargs.values()):
            if isinstance(t, torch.Tensor):
                if t.numel() == 0:
                    return False
                if t.is_floating_point() and t.dtype != plan.dtype and not torch.is_autocast_enabled(t.device.type):
                    return False
        return True

    def __call__(self, *args, **kwargs):
        plan = self.plan()
        if not self._runnable(plan, args, kwargs):
            return self.original(*args, **kwargs)
        if torch.compiler.is_compiling():
            # the weight batch is a host-side cache keyed on storage addresses and versions, which a trace cannot
            # guard: every block quantizes its own weight there (the same codes, a batch of one)
            return plan.fn(self.module, *args, **kwargs)
        # every fused conv's weight codes in one batch (``ops.weight_batch``: two multi-program launches for all)
        x = next((t for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor)), None)
        items = [weight_item(s, x) for s in plan.block_specs] + [
            linear_item(_linear_weight(m), m.qconfig.bits_w, m.qconfig.mode) for m in plan.linears] if x is not None else []
        with active_weight_batch(prepare_weight_batch(items) if items else None):
            return plan.fn(self.module, *args, **kwargs)

    def describe(self) -> list:
        return list(self.plan().lines)

    def __getstate__(self):
        return {"module": self.module}

    def __setstate__(self, state):
        self.__init__(state["module"])

    def __deepcopy__(self, memo):
        return FusedForward(memo.get(id(self.module), self.module))

    def __repr__(self) -> str:
        return f"FusedForward({type(self.module).__name__}, {len(self.plan().lines)} fused chains)"
