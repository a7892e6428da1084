"""Physical pruning (SPEC §4): the pruned network computes what the masked network computes.

The masked network is the unpruned model with gamma and beta of every pruned BN channel set to 0,
so in eval mode that channel is exactly 0 after the ReLU and contributes nothing downstream (in a
pre-activation ResNet the stream itself is untouched: only the BN's output, which feeds the
block's first conv, is zeroed). Models run in float64 so the comparison can be tight.
"""
import copy
import math
import os
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from ebkernels.models import build_model
from ebkernels.pruning import bn_layers, count_flops, count_params, load_ticket, prune, reinit, save_ticket

from _masking import masked_network, n_channels

pytestmark = pytest.mark.usefixtures("one_torch_thread")


SMALL = {  # small members of each family, 32x32 inputs
    "vgg": ("vgg11", dict(width=0.25)),
    "preresnet": ("preresnet20", {}),
    "resnet": ("resnet18", {}),
}


def make_model(family, seed=0, **extra):
    """A float64 eval-mode model whose BN layers hold non-trivial random affine params and stats."""
    name, kw = SMALL[family]
    torch.manual_seed(seed)
    model = build_model(name, **{**kw, **extra}).double().eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, bn in bn_layers(model):
            n = bn.num_features
            bn.weight.copy_(torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1)
            bn.bias.copy_(torch.rand(n, generator=g, dtype=torch.float64) - 0.5)
            bn.running_mean.copy_(torch.rand(n, generator=g, dtype=torch.float64) * 0.4 - 0.2)
            bn.running_var.copy_(torch.rand(n, generator=g, dtype=torch.float64) + 0.5)
        for m in model.modules():
            if isinstance(m, nn.Linear):  # the reference init (std 0.01) makes tiny logits
                m.weight.normal_(0, 0.3, generator=g)
    return model


def random_mask(model, p, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n_channels(model), generator=g) >= p


def _input(seed=123):
    return torch.randn(3, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def model_output(model, seed=123):
    with torch.no_grad():
        return model(_input(seed))


def assert_same_function(a, b, seed=123):
    ya, yb = model_output(a, seed), model_output(b, seed)
    assert ya.abs().max() > 1e-3  # not a degenerate all-zero comparison
    torch.testing.assert_close(ya, yb, rtol=1e-10, atol=1e-12)
    return ya


# ------------------------------------------------------------------------------------ equivalence

@pytest.mark.parametrize("p", [0.3, 0.5, 0.7])
@pytest.mark.parametrize("family", ["vgg", "preresnet"])
def test_pruned_equals_masked_random_masks(family, p):
    model = make_model(family, seed=int(p * 10))
    mask = random_mask(model, p, seed=int(p * 100))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no layer is emptied at these sizes: no rescue warning
        pruned, report = prune(model, mask)
    eff = report["effective_mask"]
    assert torch.equal(eff, mask)  # every entry applied, none rescued
    assert report["rescued"] == [] and report["unapplied"] == []
    y = assert_same_function(pruned, masked_network(model, mask))
    # the comparison can fail: the unmasked model, on the same input, computes something else
    assert not torch.allclose(y, model_output(model), atol=1e-6)
    # per-layer kept counts follow the mask
    sizes = [bn.num_features for _, bn in bn_layers(model)]
    for layer, chunk in zip(report["layers"], torch.split(mask, sizes)):
        assert layer["kept"] == int(chunk.sum())
    assert report["params_after"] < report["params_before"]
    assert report["flops_after"] < report["flops_before"]
    assert report["params_after"] == count_params(pruned)
    assert report["channels_kept"] == int(mask.sum())
    # the original model is untouched
    assert n_channels(model) == mask.numel()




def test_preresnet_stream_is_never_narrowed():
    model = make_model("preresnet", seed=3)
    pruned, report = prune(model, random_mask(model, 0.5, seed=4))
    for old, new in zip(model.blocks(), pruned.blocks()):
        assert new.bn1.num_features == old.bn1.num_features  # reads the stream: whole
        assert new.conv3.out_channels == old.conv3.out_channels  # writes the stream: whole
        assert new.conv1.in_channels == new.select.num_kept < old.conv1.in_channels
        assert new.conv1.out_channels == new.bn2.num_features == new.conv2.in_channels
        assert new.conv2.out_channels == new.bn3.num_features == new.conv3.in_channels
    assert pruned.bn.num_features == model.bn.num_features
    assert pruned.fc.in_features == pruned.select.num_kept
    roles = {layer["name"]: layer["role"] for layer in report["layers"]}
    assert roles["layer1.0.bn1"] == "stream (gathered)" and roles["layer1.0.bn2"] == "pruned"


def test_preresnet_prunes_again():
    """A pruned PreResNet prunes further; stream channels gone before stay gone."""
    model = make_model("preresnet", seed=5)
    once, _ = prune(model, random_mask(model, 0.4, seed=6))
    mask2 = random_mask(once, 0.4, seed=7)
    twice, report = prune(once, mask2)
    eff = report["effective_mask"]
    assert not torch.equal(eff, mask2)  # some stream channels the new mask keeps were already gone
    assert bool((eff <= mask2).all())
    assert_same_function(twice, masked_network(once, eff))
    assert count_params(twice) < count_params(once)


def test_resnet18_prunes_inner_channels_keeps_stream():
    model = make_model("resnet", seed=8)
    mask = random_mask(model, 0.5, seed=9)
    pruned, report = prune(model, mask)
    eff = report["effective_mask"]
    inner = [f"layer{i}.{b}.bn1" for i in range(1, 5) for b in range(2)]
    offset = 0
    for name, bn in bn_layers(model):
        chunk, got = mask[offset: offset + bn.num_features], eff[offset: offset + bn.num_features]
        offset += bn.num_features
        assert torch.equal(got, chunk) if name in inner else bool(got.all())
    assert set(report["unapplied"]) == {n for n, _ in bn_layers(model)} - set(inner)
    assert pruned.layer3[1].conv2.out_channels == 256 and pruned.layer3[1].conv1.out_channels < 256
    assert_same_function(pruned, masked_network(model, eff))
    assert report["flops_after"] < report["flops_before"]


# ------------------------------------------------------------------------------------------ rescue

def _empty_layer(model, mask, layer_name):
    offset = 0
    mask = mask.clone()
    for name, bn in bn_layers(model):
        if name == layer_name:
            mask[offset: offset + bn.num_features] = False
            return mask, bn, offset
        offset += bn.num_features
    raise KeyError(layer_name)


@pytest.mark.parametrize("family,layers", [
    ("vgg", ["features.9", "features.26"]),  # a middle layer and the last one (feeds the classifier)
    ("preresnet", ["layer2.0.bn1", "layer2.1.bn2", "layer3.1.bn3", "bn"]),  # stream, inner and final BNs
])
def test_all_pruned_layer_is_rescued(family, layers):
    model = make_model(family, seed=11)
    mask = random_mask(model, 0.5, seed=12)
    picked = {}
    for layer in layers:
        mask, bn, offset = _empty_layer(model, mask, layer)
        best = int(torch.argmax(bn.weight.abs()))
        with torch.no_grad():  # let the surviving channel carry signal (a negative one may be all-zero)
            bn.weight[best] = bn.weight.abs().max()
            bn.bias[best] = 0.5
        picked[layer] = (offset, best)
    with pytest.warns(UserWarning, match="prunes every channel") as record:
        pruned, report = prune(model, mask)
    assert sorted(report["rescued"]) == sorted(layers)
    message = " ".join(str(w.message) for w in record)
    assert all(layer in message for layer in layers)
    eff = report["effective_mask"]
    for layer, (offset, best) in picked.items():
        kept = [layer_info["kept"] for layer_info in report["layers"] if layer_info["name"] == layer]
        assert kept == [1]
        assert bool(eff[offset + best])  # the largest-|gamma| channel survives
    assert_same_function(pruned, masked_network(model, eff))


def test_rescue_on_vgg_single_channel_layer_rebuilds():
    model = make_model("vgg", seed=13)
    with torch.no_grad():  # positive gammas and betas: the single surviving channels carry signal
        for _, bn in bn_layers(model):
            bn.weight.abs_()
            bn.bias.abs_()
    mask = torch.zeros(n_channels(model), dtype=torch.bool)  # everything pruned
    with pytest.warns(UserWarning):
        pruned, report = prune(model, mask)
    assert [v for v in pruned.cfg if v != "M"] == [1] * 8
    assert len(report["rescued"]) == 8
    assert_same_function(pruned, masked_network(model, report["effective_mask"]))


# ---------------------------------------------------------------------------------- masks by ratio

@pytest.mark.parametrize("p", [0.3, 0.7])
def test_ratio_mask_follows_spec_rule(p):
    model = make_model("preresnet", seed=14)
    gammas = np.concatenate([bn.weight.detach().abs().numpy() for _, bn in bn_layers(model)])
    thr = np.sort(gammas)[int(math.floor(gammas.size * p))]
    expected = torch.from_numpy(gammas > thr)
    pruned, report = prune(model, ratio=p)
    # stream BNs keep every flag, so the effective mask is the spec mask exactly (no rescue here)
    assert torch.equal(report["effective_mask"], expected)
    assert report["ratio"] == p
    assert_same_function(pruned, masked_network(model, expected))
    import ebkernels
    channel_mask = getattr(ebkernels, "channel_mask", None)
    if channel_mask is not None:  # the detector's mask must agree with the pruner's layout
        assert torch.equal(channel_mask(model, p).cpu().flatten(), expected)


def test_dict_mask_equals_flat_mask():
    model = make_model("vgg", seed=15)
    flat = random_mask(model, 0.5, seed=16)
    sizes = [bn.num_features for _, bn in bn_layers(model)]
    as_dict = {name: chunk for (name, _), chunk in zip(bn_layers(model), torch.split(flat, sizes))}
    a, _ = prune(model, flat)
    b, _ = prune(model, as_dict)
    partial, rep = prune(model, {"features.5": as_dict["features.5"]})  # others keep everything
    assert a.cfg == b.cfg
    assert rep["channels_kept"] == flat.numel() - int((~as_dict["features.5"]).sum())
    assert_same_function(a, b)
    assert pruned_is_independent(model, a)


def pruned_is_independent(model, pruned):
    """The pruned copy shares no storage with the original."""
    ptrs = {p.data_ptr() for p in model.parameters()}
    return all(p.data_ptr() not in ptrs for p in pruned.parameters())


# ------------------------------------------------------------------------------------ costs

def test_count_flops_by_hand():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1, stride=2),
                          nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.Flatten(), nn.Linear(100, 7))
    expected = 8 * 10 * 10 * 27 + 4 * 5 * 5 * 8 + 4 * 5 * 5 * 2 * 9 + 100 * 7
    assert count_flops(model, (3, 10, 10)) == expected
    assert count_flops(model, (4, 3, 10, 10)) == expected  # per sample
    model.train()
    count_flops(model, (3, 10, 10))
    assert model.training  # mode restored
    assert count_params(model) == sum(p.numel() for p in model.parameters())
    with pytest.raises(ValueError, match="input_shape"):
        count_flops(model, (10, 10))


def test_pruned_vgg_costs_match_its_cfg():
    model = make_model("vgg", seed=17)
    pruned, report = prune(model, random_mask(model, 0.5, seed=18))
    params, flops, cin, size = 0, 0, 3, 32
    for v in pruned.cfg:
        if v == "M":
            size //= 2
            continue
        params += 9 * cin * v + 2 * v
        flops += 9 * cin * v * size * size
        cin = v
    params += cin * 10 + 10
    flops += cin * 10
    assert report["params_after"] == params
    assert report["flops_after"] == flops
    assert report["input_shape"] == [3, 32, 32]
    assert 0 < report["flops_reduction"] < 1 and 0 < report["params_reduction"] < 1
    _, small = prune(model, random_mask(model, 0.5, seed=18), input_shape=(3, 16, 16))
    assert small["flops_after"] < report["flops_after"]


# ------------------------------------------------------------------------------- quantized layers

class FakeQConv2d(nn.Conv2d):
    """Stands in for a quantized conv: an nn.Conv2d subclass taking ``qconfig``."""

    def __init__(self, *args, qconfig=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.qconfig = qconfig


class OddConv2d(nn.Conv2d):
    """A subclass whose constructor does not take nn.Conv2d's arguments."""

    def __init__(self, spec):
        super().__init__(*spec)


def _swap_convs(model, make):
    for i, m in enumerate(model.features):
        if type(m) is nn.Conv2d:
            new = make(m)
            new.load_state_dict(m.state_dict())
            model.features[i] = new.to(m.weight.dtype)
    return model


def test_subclassed_convs_keep_their_class_and_qconfig():
    qconfig = ("int8", 8)
    plain = make_model("vgg", seed=19)
    model = _swap_convs(copy.deepcopy(plain), lambda m: FakeQConv2d(
        m.in_channels, m.out_channels, 3, padding=1, bias=False, qconfig=qconfig))
    mask = random_mask(model, 0.5, seed=20)
    pruned, _ = prune(model, mask)
    convs = [m for m in pruned.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(type(m) is FakeQConv2d and m.qconfig == qconfig for m in convs)
    assert_same_function(pruned, masked_network(plain, mask))

    odd = _swap_convs(copy.deepcopy(plain), lambda m: OddConv2d((m.in_channels, m.out_channels, 3, 1, 1, 1, 1, False)))
    with pytest.warns(UserWarning, match="plain Conv2d"):
        pruned_odd, _ = prune(odd, mask)
    assert all(type(m) is nn.Conv2d for m in pruned_odd.modules() if isinstance(m, nn.Conv2d))


def test_ebkernels_qconv2d_model_prunes():
    from ebkernels import QConv2d, quantize_model

    model = build_model("vgg11", width=0.25)
    mask = random_mask(model, 0.5, seed=21)
    float_pruned, _ = prune(model, mask)
    qmodel = quantize_model(copy.deepcopy(model))
    pruned, report = prune(qmodel, mask)
    assert any(isinstance(m, QConv2d) for m in pruned.modules())
    assert pruned.cfg == float_pruned.cfg
    assert report["flops_after"] == count_flops(float_pruned)


# ----------------------------------------------------------------------------------------- reinit

def test_reinit_keeps_architecture_and_resets_weights():
    model = make_model("preresnet", seed=22)
    pruned, _ = prune(model, random_mask(model, 0.5, seed=23))
    before = copy.deepcopy(pruned.state_dict())
    rng_state = torch.get_rng_state()
    a = reinit(copy.deepcopy(pruned), seed=1)
    assert torch.equal(torch.get_rng_state(), rng_state)  # global RNG untouched
    b = reinit(copy.deepcopy(pruned), seed=1)
    sa, sb = a.state_dict(), b.state_dict()
    assert {k: v.shape for k, v in sa.items()} == {k: v.shape for k, v in before.items()}
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k  # reproducible
        if k.endswith("select.indices"):
            assert torch.equal(sa[k], before[k])  # structure kept
    assert not torch.equal(sa["layer1.0.conv1.weight"], before["layer1.0.conv1.weight"])
    for _, bn in bn_layers(a):
        assert torch.all(bn.weight == 0.5) and torch.all(bn.bias == 0) and torch.all(bn.running_var == 1)
    r18 = reinit(build_model("resnet18", cfg=[4] * 8))
    assert all(torch.all(bn.weight == 1) for _, bn in bn_layers(r18))
    with pytest.raises(TypeError, match="reinit supports"):
        reinit(nn.Linear(2, 2))


# ------------------------------------------------------------------------------------ ticket files

def _plain_data(obj):
    if isinstance(obj, dict):
        return all(isinstance(k, str) and _plain_data(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return all(_plain_data(v) for v in obj)
    return obj is None or isinstance(obj, (str, int, float, bool, torch.Tensor))


@pytest.mark.parametrize("family", ["vgg", "preresnet"])
def test_ticket_round_trip_reproduces_outputs(family, tmp_path):
    model = make_model(family, seed=25)
    pruned, report = prune(model, random_mask(model, 0.5, seed=26))
    path = tmp_path / "ticket.pt"
    save_ticket(path, (pruned, report), meta={"epoch": 12, "ratio": 0.5})
    assert os.listdir(tmp_path) == ["ticket.pt"]  # no temp file left behind
    payload = torch.load(path, weights_only=True)  # no pickled modules inside
    assert _plain_data(payload)
    loaded, info = load_ticket(path, with_info=True)
    assert type(loaded) is type(pruned) and loaded.cfg == pruned.cfg
    assert next(loaded.parameters()).dtype == torch.float64
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), pruned(x))
    assert info["meta"] == {"epoch": 12, "ratio": 0.5}
    assert torch.equal(info["mask"], report["effective_mask"])
    assert info["report"]["params_after"] == report["params_after"]
    assert info["arch"]["cfg"] == pruned.cfg


def test_ticket_save_is_atomic(tmp_path, monkeypatch):
    model = make_model("vgg", seed=27)
    path = tmp_path / "t.pt"
    save_ticket(path, model)
    good = path.read_bytes()

    def broken_save(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_ticket(path, model)
    assert path.read_bytes() == good and os.listdir(tmp_path) == ["t.pt"]
    monkeypatch.undo()
    with pytest.raises(TypeError, match="meta must be JSON-able"):
        save_ticket(tmp_path / "u.pt", model, meta={"when": object()})
    assert os.listdir(tmp_path) == ["t.pt"]


class _Call:
    """Pickles as ``fn(*args)``: what a crafted file uses to run code when it is unpickled."""

    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


def _flip_bits_in_tensor_data(raw: bytes, tensors, count: int, seed: int):
    """``count`` copies of the file ``raw``, each with one bit flipped inside one tensor's stored bytes."""
    import random

    rng = random.Random(seed)
    regions = []
    for t in tensors:
        data = t.detach().contiguous().numpy().tobytes()
        at = raw.find(data)
        if len(data) >= 64 and at >= 0 and raw.find(data, at + 1) < 0:  # only unambiguous locations
            regions.append((at, len(data)))
    assert len(regions) >= 5
    for _ in range(count):
        at, n = rng.choice(regions)
        bad = bytearray(raw)
        bad[at + rng.randrange(n)] ^= 1 << rng.randrange(8)
        yield bytes(bad)


def test_a_flipped_bit_in_a_tickets_tensor_data_is_reported_as_corrupt(tmp_path):
    model = make_model("vgg", seed=5)
    path = tmp_path / "t.pt"
    save_ticket(path, model)
    bad_path = tmp_path / "bad.pt"
    for bad in _flip_bits_in_tensor_data(path.read_bytes(), model.state_dict().values(), count=40, seed=0):
        bad_path.write_bytes(bad)
        with pytest.raises(ValueError, match=f"'{bad_path}' is corrupt: its content does not match the SHA-256"):
            load_ticket(bad_path)
    assert isinstance(load_ticket(path), nn.Module)  # the intact file still loads


def test_a_ticket_written_before_digests_loads_and_says_so_once(tmp_path):
    model = make_model("vgg", seed=6)
    path = tmp_path / "old.pt"
    save_ticket(path, model)
    payload = torch.load(path, weights_only=True)
    del payload["digest"]  # what ebkernels wrote before tickets carried a digest
    torch.save(payload, path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first, _ = load_ticket(path), load_ticket(path)
    notes = [str(w.message) for w in caught if "carries no content digest" in str(w.message)]
    assert len(notes) == 1 and str(path) in notes[0]
    for a, b in zip(first.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)


def test_ticket_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_ticket(tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(256))
    with pytest.raises(ValueError, match="not a readable ticket"):
        load_ticket(garbage)
    model = make_model("vgg", seed=28)
    good = tmp_path / "good.pt"
    save_ticket(good, model)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="not a readable ticket"):
        load_ticket(truncated)
    code = tmp_path / "code.pt"  # a pickled call of open(marker, "w"): refused, never run
    marker = tmp_path / "code-ran"
    torch.save({"format": "ebkernels.ticket", "arch": _Call(open, (str(marker), "w"))}, code)
    with pytest.raises(ValueError, match="holds more than plain data.*refused without running"):
        load_ticket(code)
    assert not marker.exists()
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match="not an ebkernels ticket"):
        load_ticket(other)
    with pytest.raises(FileNotFoundError, match="directory"):
        save_ticket(tmp_path / "no" / "such" / "dir.pt", model)
    with pytest.raises(ValueError, match=r"save_ticket needs input_shape=\(C, H, W\) for this Sequential"):
        save_ticket(tmp_path / "x.pt", nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)))  # tests/test_ticket_programs.py


# ------------------------------------------------------------------------------------- bad input

def test_bad_masks_and_ratios():
    model = make_model("vgg", seed=29)
    total = n_channels(model)
    with pytest.raises(ValueError, match=f"mask has {total - 1} entries.*{total}"):
        prune(model, torch.ones(total - 1, dtype=torch.bool))
    with pytest.raises(TypeError, match="dtype float32.*bool"):
        prune(model, torch.ones(total))
    with pytest.raises(TypeError, match="bool torch.Tensor"):
        prune(model, [True] * total)
    with pytest.raises(ValueError, match="1-D"):
        prune(model, torch.ones(1, total, dtype=torch.bool))
    with pytest.raises(ValueError, match="not BatchNorm2d layers"):
        prune(model, {"features.0": torch.ones(16, dtype=torch.bool)})
    with pytest.raises(ValueError, match="mask\\['features.1'\\] has 3 entries"):
        prune(model, {"features.1": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="mask or a ratio"):
        prune(model)
    for bad in (0, 1, 1.5, -0.1, float("nan"), True):
        with pytest.raises(ValueError, match="ratio"):
            prune(model, ratio=bad)
    np_mask = np.ones(total, dtype=bool)
    pruned, _ = prune(model, np_mask)  # numpy bool arrays are accepted
    assert pruned.cfg == model.cfg


def test_bad_models():
    with pytest.raises(ValueError, match="no BatchNorm2d"):
        prune(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), ratio=0.5)
    with pytest.raises(TypeError, match="engine='family' prunes VGG and PreResNet"):
        prune(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), ratio=0.5, engine="family")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        prune("vgg11", ratio=0.5)
