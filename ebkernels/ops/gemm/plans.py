"""The three GEMMs of a convolution layer as the launchers plan them, and as the one-size tile planned them
before the table (``tiles``): what ``python -m ebkernels.aot --plan`` prints."""
from __future__ import annotations

from .._launch import cdiv, MAX_TERMS, conv_out
from .tiles import Plan, Tile, conv_dgrad_plan, conv_fwd_plan
from .wgrad_tiles import conv_wgrad_plan, wgrad_splits

__all__ = ["LEGACY", "legacy_plans", "layer_plans"]

LEGACY = Tile(128, 128, 64, False, 8, 4)  # the one tile of every GEMM before this table


# --------------------------------------------------------------------------------------------------
# the one-size configuration every GEMM ran before the table ("before" of the plan summary)
# --------------------------------------------------------------------------------------------------
def legacy_plans(N, C, H, W, CO, K, stride, pad, sms):
    """(fwd, dgrad, wgrad) plans of the former launch: 128×128×64 everywhere, Cin/Cout zero-padded to a
    multiple of 16, input-grad over every tap of every input pixel (masked where the stride does not
    divide), weight-grad splits as above."""
    t = LEGACY
    Cp, COp = -(-C // 16) * 16, -(-CO // 16) * 16
    OH, OW = conv_out(H, K, stride, pad, 1), conv_out(W, K, stride, pad, 1)
    M, MI, taps = N * OH * OW, N * H * W, K * K
    useful = M * CO * C * taps
    fwd_p = cdiv(M, 128) * cdiv(CO, 128)
    dgr_p = cdiv(MI, 128) * cdiv(C, 128)
    wgr_p = cdiv(COp, 128) * taps * cdiv(Cp, 128)
    fwd = Plan("fwd", t, fwd_p, 1, 0, fwd_p * taps * cdiv(Cp, 64) * 128 * 128 * 64, useful)
    dgr = Plan("dgrad", t, dgr_p, 1, 0, dgr_p * taps * cdiv(COp, 64) * 128 * 128 * 64, useful)
    s, per = wgrad_splits(M, wgr_p, sms, MAX_TERMS)
    wgr = Plan("wgrad", t, wgr_p, s, per, wgr_p * cdiv(M, 64) * 128 * 128 * 64, useful)
    return fwd, dgr, wgr


# --------------------------------------------------------------------------------------------------
# a layer's three GEMMs, as the launchers run them (the plan printer of ``python -m ebkernels.aot --plan``)
# --------------------------------------------------------------------------------------------------
def layer_plans(N, C, CO, H, W, K, stride, pad, sms, code_channels, tma=True):
    """(fwd, dgrad, wgrad) plans of a square-kernel, dilation-1 convolution layer at batch N, with the
    code buffers' channel counts ``code_channels(c)`` (``_launch.code_channels``: the zero padding
    the Triton path applies) and the real ones counted as useful; ``tma``: the weight-grad as on sm_90
    (rule 8; the plan's default, an H100/H200)."""
    Cp, COp = code_channels(C), code_channels(CO)
    s, p, d = (stride, stride), (pad, pad), (1, 1)
    OH, OW = conv_out(H, K, stride, pad, 1), conv_out(W, K, stride, pad, 1)
    real = {"cin_real": C, "cout_real": CO}
    fwd = conv_fwd_plan(N, Cp, H, W, CO, K, K, s, p, d, sms=sms, **real)
    dgr = conv_dgrad_plan(N, COp, OH, OW, C, H, W, K, K, s, p, d, sms=sms, **real)
    wgr = conv_wgrad_plan(N, Cp, H, W, COp, OH, OW, K, K, sms=sms, stride=s, padding=p, tma=tma, **real)
    return fwd, dgr, wgr
