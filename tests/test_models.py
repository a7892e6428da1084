"""Models: layouts, shapes, cfg rebuilds, the torchvision-compatible ResNet-18 and the registry."""
import pytest
import torch
from torch import nn

from ebkernels.models import (ChannelSelection, PreResNet, VGG, architecture, build_model, model_names,
                              preresnet_cfg, vgg_cfg)
from ebkernels.models.resnet import ResNet, resnet18
from ebkernels.models.vgg import VGG_CFGS

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _vgg_params(cfg, in_channels, num_classes):
    """Parameter count of the reference VGG layout, derived from the cfg by hand."""
    total, cin = 0, in_channels
    for v in cfg:
        if v == "M":
            continue
        total += 9 * cin * v + 2 * v  # conv3x3 without bias, BN gamma and beta
        cin = v
    return total + cin * num_classes + num_classes


@pytest.mark.parametrize("depth", [11, 13, 16, 19])
def test_vgg_layout_matches_reference_counts(depth):
    model = build_model(f"vgg{depth}", num_classes=100, width=0.5)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == depth - 3  # VGG-d has d-3 convs (its 3 FC layers are one Linear on CIFAR)
    assert [c.out_channels for c in convs] == [v // 2 for v in VGG_CFGS[depth] if v != "M"]
    assert sum(p.numel() for p in model.parameters()) == _vgg_params(vgg_cfg(depth, 0.5), 3, 100)
    assert all(c.bias is None and c.kernel_size == (3, 3) for c in convs)
    # reference init: BN gamma starts at 0.5
    assert all(torch.all(m.weight == 0.5) for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_vgg16_full_size_parameter_count():
    # 14.72 M: the CIFAR VGG16-BN of network slimming / EB (13 convs, one 512->10 linear)
    assert sum(p.numel() for p in build_model("vgg16").parameters()) == 14_724_042


@pytest.mark.parametrize("name,kw", [
    ("vgg11", dict(width=0.125)), ("vgg13", dict(width=0.125)), ("vgg16", dict(width=0.125)),
    ("vgg19", dict(width=0.125)), ("preresnet11", {}), ("preresnet20", dict(width=0.5)), ("resnet18", {}),
])
@pytest.mark.parametrize("in_channels,size", [(3, 32), (1, 8)])
def test_forward_shapes(name, kw, in_channels, size):
    model = build_model(name, num_classes=7, in_channels=in_channels, **kw).eval()
    x = torch.randn(2, in_channels, size, size)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 7) and torch.isfinite(y).all()


def test_preresnet101_structure():
    model = build_model("preresnet101")
    assert isinstance(model, PreResNet)
    for stage, planes in zip((model.layer1, model.layer2, model.layer3), (16, 32, 64)):
        assert len(stage) == 11
        for block in stage:
            assert block.conv3.out_channels == 4 * planes  # bottleneck expansion 4
            assert block.bn1.num_features == block.conv1.in_channels  # unpruned: gather keeps all
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 3 * 33 + 1
    assert model.cfg == preresnet_cfg(101) and len(model.cfg) == 100
    assert model.cfg[:6] == [16, 16, 16, 64, 16, 16]  # reference cfg layout
    assert model.fc.in_features == 256


def test_preresnet_rejects_bad_depth_and_cfg():
    with pytest.raises(ValueError, match="9n\\+2"):
        build_model("preresnet21")
    cfg = preresnet_cfg(20)
    with pytest.raises(ValueError, match="needs 19"):
        build_model("preresnet20", cfg=cfg[:-1])
    bad = list(cfg)
    bad[0] = bad[0] + 1  # gathers more channels than the stream has
    with pytest.raises(ValueError, match="gathers more"):
        build_model("preresnet20", cfg=bad)


@pytest.mark.parametrize("name,kw,cfg_edit", [
    ("vgg11", dict(width=0.25), lambda c: [v if v == "M" else max(1, v - 3) for v in c]),
    ("preresnet20", {}, lambda c: [max(1, v - (i % 5)) for i, v in enumerate(c)]),
    ("resnet18", {}, lambda c: [v // 2 for v in c]),
])
def test_cfg_rebuilds_the_same_architecture(name, kw, cfg_edit):
    base = build_model(name, **kw)
    cfg = cfg_edit(architecture(base)["cfg"])
    narrow = build_model(name, cfg=cfg, **kw)
    assert architecture(narrow)["cfg"] == cfg
    again = build_model(name, cfg=architecture(narrow)["cfg"], **kw)
    shapes = {k: v.shape for k, v in narrow.state_dict().items()}
    assert shapes == {k: v.shape for k, v in again.state_dict().items()}
    assert sum(p.numel() for p in narrow.parameters()) < sum(p.numel() for p in base.parameters())
    with torch.no_grad():
        assert narrow.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def _torchvision_resnet18_keys():
    """torchvision.models.resnet18's state_dict keys, written out from its structure."""
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    keys = ["conv1.weight"] + [f"bn1.{k}" for k in bn]
    for layer in range(1, 5):
        for block in range(2):
            p = f"layer{layer}.{block}"
            keys += [f"{p}.conv1.weight"] + [f"{p}.bn1.{k}" for k in bn]
            keys += [f"{p}.conv2.weight"] + [f"{p}.bn2.{k}" for k in bn]
            if layer > 1 and block == 0:
                keys += [f"{p}.downsample.0.weight"] + [f"{p}.downsample.1.{k}" for k in bn]
    return keys + ["fc.weight", "fc.bias"]


def test_resnet18_matches_torchvision_state_dict():
    model = resnet18(num_classes=1000, use_torchvision=False)
    assert isinstance(model, ResNet)
    sd = model.state_dict()
    assert list(sd) == _torchvision_resnet18_keys()
    assert sum(p.numel() for p in model.parameters()) == 11_689_512  # torchvision's resnet18 count
    assert sd["conv1.weight"].shape == (64, 3, 7, 7)
    assert sd["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)
    try:
        import torchvision  # noqa: F401
    except Exception:
        return
    tv = torchvision.models.resnet18(weights=None)
    assert {k: v.shape for k, v in tv.state_dict().items()} == {k: v.shape for k, v in sd.items()}


def test_resnet18_in_channels_and_cfg():
    model = build_model("resnet18", in_channels=1, cfg=[8] * 8)
    assert model.conv1.in_channels == 1
    assert [b.conv1.out_channels for b in (model.layer1[0], model.layer4[1])] == [8, 8]
    assert model.layer4[1].conv2.out_channels == 512  # stream width untouched
    with pytest.raises(ValueError, match="needs 8"):
        build_model("resnet18", cfg=[8] * 7)
    with pytest.raises(ValueError, match="1..64"):
        build_model("resnet18", cfg=[65] + [8] * 7)


def test_registry_rejects_unknown_names_and_bad_args():
    with pytest.raises(ValueError) as err:
        build_model("vgg12")
    for accepted in ("vgg11", "vgg16", "preresnet101", "resnet18"):
        assert accepted in str(err.value)
    with pytest.raises(ValueError, match="unknown model name 'alexnet'"):
        build_model("alexnet")
    with pytest.raises(TypeError, match="name must be a str"):
        build_model(16)
    with pytest.raises(ValueError, match="num_classes=0"):
        build_model("vgg11", num_classes=0)
    with pytest.raises(ValueError, match="in_channels=-1"):
        build_model("preresnet20", in_channels=-1)
    with pytest.raises(ValueError, match="width=0"):
        build_model("vgg11", width=0)
    with pytest.raises(ValueError, match="VGG-11 layout"):
        build_model("vgg11", cfg=[64, 128])
    with pytest.raises(ValueError, match="cfg entry 0"):
        build_model("vgg11", cfg=[0 if v != "M" else v for v in vgg_cfg(11)])
    with pytest.raises(TypeError):
        build_model("vgg11", depth_multiplier=2)
    assert {"vgg11", "vgg13", "vgg16", "vgg19", "preresnet20", "preresnet101", "resnet18"} <= set(model_names())


def test_architecture_needs_build_model():
    with pytest.raises(ValueError, match="build_model"):
        architecture(VGG(11, width=0.125))
    arch = architecture(build_model("VGG11", num_classes=3, in_channels=1, width=0.125))
    assert arch["name"] == "vgg11" and arch["num_classes"] == 3 and arch["in_channels"] == 1
    assert arch["kwargs"] == {"width": 0.125}


def test_channel_selection_gathers_sorted_indices():
    sel = ChannelSelection(6)
    x = torch.randn(2, 6, 3, 3)
    assert sel(x) is x  # nothing pruned: no copy
    sel.set_indices(torch.tensor([1, 4, 5]))
    assert torch.equal(sel(x), x[:, [1, 4, 5]])
    for bad in ([4, 1], [1, 1], [6], []):
        with pytest.raises(ValueError):
            sel.set_indices(torch.tensor(bad, dtype=torch.long))
    assert sel.state_dict()["indices"].tolist() == [1, 4, 5]
    assert not list(sel.parameters())  # structure, not a weight
