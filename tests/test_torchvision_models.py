"""torchvision CNNs through the public API: exact pruning, tickets as plain data, the int8 search.

Every model is the real torchvision definition at full width (``build_model("torchvision:<name>")``),
run in float64 on 32×32 inputs (the smallest that VGG's five pools and DenseNet's transitions leave
non-empty). One exception keeps the tests fast: vgg16_bn's two 4096-wide classifier layers (100 M
parameters, no BatchNorm: never pruned) are narrowed to 64; the flatten that couples the last conv's
channels to the first classifier layer (49 inputs per channel after the 7×7 average pool) is unchanged.
"""
import os

import pytest
import torch
from torch import nn

import ebkernels
from ebkernels.models import is_grouped_conv
from ebkernels.pruning import bn_layers, count_flops, count_params, load_ticket, prune, reinit, save_ticket
from ebkernels.train import main

from _masking import assert_same_outputs, no_zero_width_layer, per_layer, random_mask, randomise_bns

pytestmark = [pytest.mark.torchvision, pytest.mark.torch_pruning, pytest.mark.usefixtures("one_torch_thread")]

SHAPE = (3, 32, 32)


def tv_model(name, seed=0, trained_looking=False, **kw):
    torch.manual_seed(seed)
    model = ebkernels.build_model(f"torchvision:{name}", num_classes=10, **kw)
    if name == "vgg16_bn":  # see the module docstring
        model.classifier[0] = nn.Linear(512 * 7 * 7, 64)
        model.classifier[3] = nn.Linear(64, 64)
        model.classifier[6] = nn.Linear(64, 10)
    model = model.double().eval()
    randomise_bns(model, seed + 1, trained_looking)
    return model


def _x(shape=SHAPE, seed=5):
    return torch.randn((2, *shape), dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


MODELS = ["resnet50", "mobilenet_v2", "vgg16_bn", "densenet121"]


@pytest.mark.parametrize("name", MODELS)
def test_pruned_torchvision_model_computes_the_masked_network(name):
    """A random mask, and the ticket mask of trained-looking gammas at p = 0.5, each pruned exactly."""
    for trained_looking in (False, True):
        model = tv_model(name, seed=len(name), trained_looking=trained_looking)
        if trained_looking:
            mask = ebkernels.channel_mask(model, 0.5, backend="reference")
        else:
            mask = random_mask(model, 0.5, seed=3)
        pruned, report = prune(model, mask, input_shape=SHAPE, verify=False)
        eff = report["effective_mask"]
        assert report["engine"] == "graph" and report["coupled"] == "majority"
        assert_same_outputs(model, pruned, eff, _x())
        assert no_zero_width_layer(pruned)
        assert report["params_after"] == count_params(pruned) < report["params_before"]
        assert report["flops_after"] == count_flops(pruned, SHAPE) < report["flops_before"]
        got = per_layer(model, eff)
        for layer in report["layers"]:
            assert layer["kept"] == int(got[layer["name"]].sum())
        assert report["requested"]["params_reduction"] > 0.3 and report["requested"]["flops_reduction"] > 0.3
        if trained_looking:  # on a mask drawn from the |gamma| ranking, majority keeps about what it asks for
            requested = report["channels_requested"]
            assert abs(report["channels_kept"] - requested) <= 0.05 * requested
    if name == "vgg16_bn":  # no coupled channels: achieved == requested
        assert torch.equal(eff, mask) and report["requested"]["params"] == report["params_after"]
    if name == "resnet50":  # a bottleneck stage's stream: the 3-4 block BNs and the downsample BN together
        stream = {"layer1.0.downsample.1", "layer1.0.bn3", "layer1.1.bn3", "layer1.2.bn3"}
        assert any(set(group["bns"]) == stream for group in report["groups"])
        assert pruned.layer1[0].downsample[1].num_features == pruned.layer1[2].bn3.num_features < 256


def test_the_rules_on_resnet50_any_keeps_the_stream_all_empties_it():
    model = tv_model("resnet50", seed=1, trained_looking=True)
    reports = {rule: prune(model, ratio=0.5, coupled=rule, input_shape=SHAPE, verify=False)[1]
               for rule in ("any", "all")}
    lines = {rule: {line["name"]: line for line in r["layers"]} for rule, r in reports.items()}
    stream = lines["any"]["layer3.0.bn3"]
    assert stream["kept"] > stream["requested"]  # every coupled BN has a veto
    assert lines["all"]["layer3.0.bn3"]["kept"] < stream["requested"]
    assert reports["any"]["params_after"] > reports["all"]["params_after"]


def test_build_model_adapts_torchvision_models_to_the_dataset():
    small = ebkernels.build_model("torchvision:resnet18", num_classes=7, in_channels=1, small_stem=True)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1) and small.conv1.in_channels == 1
    assert isinstance(small.maxpool, nn.Identity) and small.fc.out_features == 7
    plain = ebkernels.build_model("torchvision:densenet121", in_channels=1)
    assert plain.features.conv0.kernel_size == (7, 7) and isinstance(plain.features.pool0, nn.MaxPool2d)
    vgg = ebkernels.build_model("torchvision:vgg11_bn", small_stem=True)
    assert isinstance(vgg.features[3], nn.MaxPool2d)  # VGG's stem does not downsample: its pools stay
    with torch.no_grad():
        assert small.eval()(torch.zeros(2, 1, 8, 8)).shape == (2, 7)
    with pytest.raises(ValueError, match="no classification model 'resnet51' \\(did you mean torchvision:resnet50"):
        ebkernels.build_model("torchvision:resnet51")
    with pytest.raises(ValueError, match="does not take width; accepted keyword arguments for torchvision models"):
        ebkernels.build_model("torchvision:resnet18", width=0.5)


def test_a_torchvision_ticket_saves_and_loads_as_plain_data(tmp_path):
    model = tv_model("mobilenet_v2", seed=2, trained_looking=True, in_channels=1, small_stem=True)
    pruned, report = prune(model, ratio=0.5, input_shape=(1, 16, 16))
    assert report["cfg"]["features.2.conv.1.0"][2] < 96  # a depthwise conv narrowed with its groups
    path = save_ticket(str(tmp_path / "t.pt"), (pruned, report), meta={"epoch": 3})
    raw = torch.load(path, weights_only=True)  # plain data only: no pickled module or class
    assert isinstance(raw["arch"], str) and all(isinstance(v, torch.Tensor) for v in raw["state_dict"].values())
    loaded, info = load_ticket(path, with_info=True)
    assert info["arch"]["name"] == "torchvision:mobilenet_v2" and info["arch"]["kwargs"] == {"small_stem": True}
    x = _x((1, 16, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), pruned(x), rtol=0, atol=0)
    assert count_params(loaded) == count_params(pruned)
    # re-init: the same pruned widths, torchvision's initialisation, reproducible by seed
    again = reinit(load_ticket(path), seed=4)
    other = reinit(load_ticket(path), seed=4)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), other.state_dict().values()))
    assert not torch.equal(again.features[0][0].weight, loaded.features[0][0].weight)
    assert [tuple(p.shape) for p in again.parameters()] == [tuple(p.shape) for p in loaded.parameters()]


def test_int8_search_swaps_dense_layers_keeps_depthwise_float_and_feeds_the_detector():
    torch.manual_seed(0)
    model = ebkernels.build_model("torchvision:mobilenet_v2", num_classes=10, in_channels=1, small_stem=True)
    grouped = [n for n, m in model.named_modules() if is_grouped_conv(n, m)]
    with ebkernels.force_backend("reference"):
        ebkernels.quantize_model(model, skip=is_grouped_conv)
        swapped = [n for n, m in model.named_modules() if isinstance(m, (ebkernels.QConv2d, ebkernels.QLinear))]
        kept = [n for n, m in model.named_modules() if type(m) is nn.Conv2d]
        assert len(grouped) == 17 and kept == grouped and len(swapped) == 36
        x = torch.randn(4, 1, 8, 8)
        loss = nn.functional.cross_entropy(model.train()(x), torch.tensor([0, 1, 2, 3]))
        loss.backward()
        assert model.features[1].conv[1].weight.grad is not None  # a QConv2d's weight learns
        detector = ebkernels.EarlyBird(0.5, eps=0.1, window=2)
        assert detector.step(model) is False  # one mask: nothing to compare yet
        mask = ebkernels.channel_mask(model, 0.5, backend="reference")
        assert mask.numel() == sum(bn.num_features for _, bn in bn_layers(model)) == 17056


def test_cli_early_bird_job_on_torchvision_resnet18_end_to_end_and_resume(tmp_path, capsys, monkeypatch):
    """The whole job (search -> detect -> prune -> retrain) on digits, interrupted once and resumed.

    fp32 search: the int8 layers' CPU reference spends seconds per step on ResNet-18's 11 M weight
    gradients (the seeded stochastic rounding); the next test runs the int8 job on MobileNet-V2.
    """
    from ebkernels.train import job as job_mod

    args = ["--model", "torchvision:resnet18", "--precision", "fp32", "--train-subset", "128", "--test-subset",
            "64", "--batch-size", "32", "--epochs", "3", "--retrain-epochs", "1", "--eps", "0.5", "--window", "1",
            "--no-progress", "--out", str(tmp_path)]
    saved, calls = job_mod.Job._checkpoint, []

    def interrupt_after_first_epoch(self, state):
        saved(self, state)
        calls.append(state["epoch"])
        if len(calls) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(job_mod.Job, "_checkpoint", interrupt_after_first_epoch)
    assert main(args) == 130
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "resuming" in printed and "from its checkpoint (search epoch 1" in printed
    run, summary = _finished_run(tmp_path)
    ticket = summary["tickets"][0]
    assert ticket["params_after"] < ticket["params_before"] and ticket["engine"] == "family"
    loaded = load_ticket(os.path.join(run, ticket["path"]))
    assert loaded.ebk_arch["name"] == "torchvision:resnet18" and loaded.conv1.in_channels == 1
    assert "retrain_acc" in ticket and os.path.isfile(os.path.join(run, ticket["retrain_path"]))
    assert main(args) == 0 and "already finished" in capsys.readouterr().out


def test_cli_int8_job_on_torchvision_mobilenet_v2_small_stem(tmp_path, capsys):
    args = ["--model", "torchvision:mobilenet_v2", "--small-stem", "--train-subset", "64", "--test-subset", "64",
            "--batch-size", "32", "--epochs", "2", "--retrain-epochs", "1", "--eps", "0.5", "--window", "1",
            "--no-progress", "--out", str(tmp_path)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "(small-image stem)" in printed
    assert "35 Conv2d and 1 Linear swapped to QConv2d/QLinear; 17 grouped/depthwise Conv2d kept in float" in printed
    # expand conv → BN → ReLU6 and BN → ReLU6 → project conv → BN around each depthwise conv (ebkernels.fusion)
    assert "; 35 conv/BatchNorm/activation chains run as fused int8 blocks" in printed
    assert "the mask asked for" in printed
    run, summary = _finished_run(tmp_path)
    ticket = summary["tickets"][0]
    assert summary["search"]["precision"] == "int8" and ticket["engine"] == "graph"
    assert ticket["requested_params"] > 0 and ticket["params_after"] < ticket["params_before"]
    loaded = load_ticket(os.path.join(run, ticket["path"]))
    assert loaded.features[0][0].kernel_size == (3, 3) and loaded.features[0][0].stride == (1, 1)


@pytest.mark.slow
def test_cli_int8_job_on_torchvision_resnet50_small_stem(tmp_path, capsys):
    """The paper's ImageNet model through the whole int8 job on tiny data: every conv → BN (→ ReLU) of the
    bottlenecks and projection shortcuts fuses (53 chains), the residual adds run between them in bfloat16."""
    args = ["--model", "torchvision:resnet50", "--small-stem", "--train-subset", "32", "--test-subset", "16",
            "--batch-size", "32", "--epochs", "2", "--retrain-epochs", "1", "--eps", "0.5", "--window", "1",
            "--no-progress", "--out", str(tmp_path)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "53 Conv2d and 1 Linear swapped to QConv2d/QLinear" in printed
    assert "; 53 conv/BatchNorm/activation chains run as fused int8 blocks" in printed
    run, summary = _finished_run(tmp_path)
    assert summary["search"]["precision"] == "int8" and summary["tickets"][0]["params_after"] > 0


def test_cli_unknown_torchvision_model_is_a_clear_message(tmp_path, capsys):
    assert main(["--model", "torchvision:resnet51", "--out", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert "torchvision has no classification model 'resnet51' (did you mean torchvision:resnet50" in err
    assert main(["--model", "torchvision:vgg16_bn", "--out", str(tmp_path / "runs")]) == 2
    assert "cannot run on digits images of shape (1, 16, 16)" in capsys.readouterr().err  # five pools
    assert not (tmp_path / "runs").exists()


def _finished_run(out):
    import json

    runs = [d for d in out.iterdir() if d.is_dir()]
    assert len(runs) == 1, runs
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert summary["finished"]
    return str(runs[0]), summary
