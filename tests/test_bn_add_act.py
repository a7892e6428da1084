"""BatchNorm-apply + residual add + activation with its mask in one pass (``bn_add_act``), SPEC §9: the
kernel (interpreter on CPU) bit-identical to its PyTorch reference, and both what BatchNorm + add + ReLU /
ReLU6 compute; the mask gives torch's gradient."""
import pytest
import torch
import torch.nn.functional as F

from ebkernels.ops.fused.bn_add_act import _bn_add_act_op, bn_add_act, bn_add_act_reference
from ebkernels.ops.fused.bn_relu_quant import bn_stats
from helpers import CL, bits_equal, fresh_seed, gen


@pytest.mark.parametrize("act", ["relu", "relu6", "identity"])
@pytest.mark.parametrize("res_kind", ["f32_nchw", "bf16_cl"])
def test_bn_add_act_is_bit_identical_to_its_reference_and_to_torch(device, poisoned, act, res_kind):
    seed = fresh_seed()
    g = gen(seed)
    msg = f"seed={seed} {act} {res_kind}"
    N, C, H, W = 3, 37, 5, 6  # 90 rows, 37 channels: partial tiles
    x = torch.randn((N, C, H, W), generator=g).to(device)
    gamma, beta = torch.randn(C, generator=g).to(device), torch.randn(C, generator=g).to(device)
    xb, _, bnp, _ = bn_stats(x, gamma, beta)
    r = torch.randn((N, C, H, W), generator=g) * 3
    r = (r.contiguous() if res_kind == "f32_nchw" else r.to(torch.bfloat16).contiguous(memory_format=CL)).to(device)
    nbt = torch.tensor(2, device=device)
    z, mask = bn_add_act(xb, bnp, r, nbt, act, torch.bfloat16)
    assert nbt.item() == 3 and z.dtype == torch.bfloat16 and z.is_contiguous(memory_format=CL), msg
    z_ref, mask_ref = bn_add_act_reference(xb.cpu(), bnp.cpu(), r.cpu(), None, act, torch.bfloat16)
    assert bits_equal(z.cpu(), z_ref), msg
    assert mask.dtype == torch.bool and torch.equal(mask.cpu(), mask_ref), msg
    # what the layers compute: BatchNorm on the bf16 input, + r, the activation
    t = F.batch_norm(xb.float(), None, None, gamma, beta, True, 0.0, 1e-5) + r.float()
    want = {"relu": F.relu, "relu6": F.relu6, "identity": lambda v: v}[act](t)
    torch.testing.assert_close(z.float(), want, rtol=1e-2, atol=1e-2, msg=msg)
    if act != "identity":  # the mask is where torch's own backward passes the gradient
        tl = t.detach().requires_grad_()
        {"relu": F.relu, "relu6": F.relu6}[act](tl).backward(torch.ones_like(tl))
        agree = (mask == (tl.grad != 0)).float().mean().item()
        assert agree > 0.999, msg  # t differs by a rounding here and there from the kernel's
    else:
        assert mask.numel() == 0


def test_bn_add_act_refuses_what_it_cannot_compute():
    x = torch.randn(2, 4, 3, 3)
    xb, _, bnp, _ = bn_stats(x, torch.ones(4), torch.zeros(4))
    with pytest.raises(ValueError, match="act='silu' is not supported after a residual add"):
        bn_add_act(xb, bnp, x, act="silu")
    with pytest.raises(ValueError, match="residual shape"):
        bn_add_act(xb, bnp, x[:1])


def test_opcheck():
    g = gen(4)
    x = torch.randn((2, 5, 3, 4), generator=g)
    xb, _, bnp, _ = bn_stats(x, torch.randn(5, generator=g), torch.randn(5, generator=g))
    torch.library.opcheck(_bn_add_act_op, (xb, bnp, torch.randn(2, 5, 3, 4), torch.tensor(0), "relu", torch.bfloat16))
    torch.library.opcheck(_bn_add_act_op, (xb, bnp, torch.randn(2, 5, 3, 4), xb.new_empty((0,)), "identity", torch.float32))
