"""Useful MMA work of a convolution launch, from the real channel counts of the codes it reads.

A launch sees channel-padded int8 codes (the fused first layer's Cin 3 → 16, E's Cout rounded up to 16), so
its own extents overstate the work the layer needs. The producers say how many channels are real: the
quantizer writes a view of the real channels into the padded buffer, ``bn_relu_quant`` and
``bn_relu_bwd`` are told ``K`` / ``C``, max-pool and PyTorch copies pass them on, the TMA weight-grad's
operand copies are made from codes whose count is known. ``useful_counter`` walks the trace once in
order and maps every code buffer (by storage) to its real channels (and, for the TMA copies, real rows);
a convolution launch then counts ``2 · rows · Cout · Cin · taps`` with the real counts. None when a TMA
launch's operands are unknown (the report then counts its issued work as useful and marks it).
"""
from __future__ import annotations

from .trace import AtenOp, Launch

__all__ = ["useful_counter"]


def _real_channels(events) -> dict:
    """id(launch) -> {argument: (real channels, real rows or None)} of the code buffers each launch reads,
    as their producers wrote them before it (storages are reused: the map is read in trace order)."""
    real: dict = {}
    seen: dict = {}

    def put(t, c, rows=None):
        if t is not None:
            real[t.storage] = (int(c), rows)

    def of(t, default=None):
        return real.get(t.storage, (default, None))[0] if t is not None else default

    for e in events:
        if isinstance(e, AtenOp):
            copy = e.name.split(".")[1] in ("clone", "_to_copy", "copy_", "contiguous")
            if copy and e.inputs and e.outputs:
                src = e.inputs[-1]
                if src.storage in real:
                    real[e.outputs[0].storage] = real[src.storage]
            continue
        k, t = e.kernel, e.t
        seen[id(e)] = {n: real[a.storage] for n, a in e.tensors.items() if a.storage in real}
        if k in ("quantize_codes_kernel", "quantize_small_kernel") and t("codes_ptr") is not None:
            c = t("codes_ptr")
            if len(c.shape) == 4:
                put(c, c.shape[1])
        elif k == "bn_relu_quant_kernel" and e.get("CODES"):
            put(t("out_ptr"), e.get("K"))
        elif k == "bn_relu_bwd_kernel" and e.get("MODE") == 1:
            put(t("out_ptr"), e.get("C"))
            put(t("cm_ptr"), e.get("C"))
        elif k == "maxpool2d_int8_kernel":
            put(t("out_ptr"), of(t("x_ptr"), e.get("Cp")))
        elif k == "wgrad_tma_operands_kernel":
            x, g = t("x_ptr"), t("e_ptr")
            put(t("xd_ptr"), of(x, e.get("C")))
            put(t("ed_ptr"), of(g, e.get("CO")), e.get("N") * e.get("OH") * e.get("OW"))
    return seen


def useful_counter(trace):
    """``useful(kind, launch) -> float | None`` for ``kernel_rules.kernel_work``."""
    seen = _real_channels(trace.events)

    def ch(launch: Launch, name: str, default):
        return seen.get(id(launch), {}).get(name, (default, None))[0] or default

    def useful(kind: str, launch: Launch):
        g = launch.get
        if launch.kernel == "conv2d_int8_bn_kernel":
            return 2.0 * g("M") * g("NCOL") * ch(launch, "src_ptr", g("R")) * g("taps")
        if kind == "fwd":
            return 2.0 * g("MQ") * g("NCOL") * ch(launch, "src_ptr", g("R")) * g("KH") * g("KW")
        if kind == "dgrad":
            n = launch.t("src_ptr").shape[0]
            return 2.0 * n * g("P") * g("Q") * ch(launch, "src_ptr", g("R")) * g("NCOL") * g("KH") * g("KW")
        if launch.kernel == "conv2d_int8_wgrad_tma_kernel":
            known = seen.get(id(launch), {})
            (cout, rows), (cin, _) = known.get("e_desc", (None, None)), known.get("x_desc", (None, None))
            if not (rows and cout and cin):
                return None
            return 2.0 * rows * cout * cin * g("taps")
        return 2.0 * g("M") * ch(launch, "e_ptr", g("CO")) * ch(launch, "x_ptr", g("C")) * g("taps")

    return useful
