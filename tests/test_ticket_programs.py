"""Tickets of a home-made model (issue 24.2): saved as plain data + a checked ``torch.export`` program.

The model has what ebkernels' own families do not: a residual add, a depthwise conv and ``F.relu``
called in ``forward``. Its ticket loads without its class (the program) and into a freshly built
one (``model=``: pruned by the saved channels, trainable). A program changed by hand, even with its
digest recomputed, is refused before torch reads it: torch.export.load would run its guard code
and ``sympify`` its shape expressions.
"""
import io
import json
import zipfile

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ebkernels
from ebkernels._io import content_digest
from ebkernels.models import build_model, design_input_shape
from ebkernels.pruning import count_flops, load_ticket, prune, save_ticket

pytestmark = [pytest.mark.torch_pruning, pytest.mark.usefixtures("one_torch_thread")]

SHAPE = (3, 8, 8)


class HomeNet(nn.Module):
    """stem -> depthwise -> pointwise, added back onto the stem's output; ReLU as a function."""

    def __init__(self, width=8, classes=5):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(width)
        self.dw = nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.pw = nn.Conv2d(width, width, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        y = F.relu(self.bn1(self.dw(x)))
        x = F.relu(x + self.bn2(self.pw(y)))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def home_net(seed=0):
    torch.manual_seed(seed)
    model = HomeNet()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for bn in (model.bn0, model.bn1, model.bn2):
            bn.weight.copy_(torch.rand(bn.num_features, generator=g) * 2 - 1)
            bn.running_mean.copy_(torch.rand(bn.num_features, generator=g) - 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def ticket(tmp_path_factory):
    """A pruned HomeNet, its report and its ticket file (export once: it takes seconds)."""
    model = home_net()
    pruned, report = prune(model, ratio=0.5, input_shape=SHAPE)
    path = tmp_path_factory.mktemp("ticket") / "home.pt"
    save_ticket(path, (pruned, report), meta={"ratio": 0.5})
    return pruned.eval(), report, path


def test_a_home_made_ticket_loads_without_its_class(ticket):
    pruned, report, path = ticket
    assert report["channels_kept"] < report["channels_total"]
    payload = torch.load(path, weights_only=True)  # plain data: no pickled module
    assert payload["version"] == 2 and payload["program"].dtype == torch.uint8
    assert json.loads(payload["arch"]) == {"name": None, "class": "HomeNet", "input_shape": list(SHAPE),
                                           "engine": "graph"}
    net, info = load_ticket(path, with_info=True)
    assert not isinstance(net, HomeNet) and info["program"] is not None
    assert info["meta"] == {"ratio": 0.5} and torch.equal(info["mask"], report["effective_mask"])
    for batch in (1, 5):  # the batch dimension is free
        x = torch.randn(batch, *SHAPE)
        with torch.no_grad():
            torch.testing.assert_close(net(x), pruned(x), rtol=0, atol=0)
    with pytest.raises(NotImplementedError):  # as documented: the program is eval-only
        net.train()


def test_a_home_made_ticket_applies_to_a_fresh_model_and_retrains(ticket):
    pruned, _, path = ticket
    fresh = HomeNet()
    net = load_ticket(path, model=fresh)
    assert type(net) is HomeNet and net is not fresh and fresh.stem.out_channels == 8  # the argument is untouched
    assert {k: v.shape for k, v in net.state_dict().items()} == {k: v.shape for k, v in pruned.state_dict().items()}
    x = torch.randn(4, *SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), pruned(x), rtol=0, atol=0)
    net.train()
    F.cross_entropy(net(x), torch.tensor([0, 1, 2, 3])).backward()
    assert net.stem.weight.grad is not None
    same_widths = load_ticket(path, model=pruned)  # a model that has the ticket's widths already
    for a, b in zip(same_widths.state_dict().values(), pruned.state_dict().values()):
        assert torch.equal(a, b)


def test_a_home_made_ticket_refuses_what_does_not_fit(ticket, tmp_path):
    _, _, path = ticket
    with pytest.raises(ValueError, match="is not the network this ticket of a HomeNet was pruned from"):
        load_ticket(path, model=HomeNet(width=6))
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        load_ticket(path, model="HomeNet")
    plain = tmp_path / "plain.pt"
    save_ticket(plain, home_net(), export=False)  # no program, no shape needed
    with pytest.raises(ValueError, match="saved without its program.*model="):
        load_ticket(plain)
    assert type(load_ticket(plain, model=HomeNet())) is HomeNet
    with pytest.raises(ValueError, match=r"save_ticket needs input_shape=\(C, H, W\) for this HomeNet"):
        save_ticket(tmp_path / "x.pt", home_net())
    vgg = tmp_path / "vgg.pt"
    save_ticket(vgg, build_model("vgg11", width=0.125))
    with pytest.raises(ValueError, match="rebuilds by name; load it without model="):
        load_ticket(vgg, model=HomeNet())


def _tampered(path, out, edit):
    """A copy of the ticket whose program archive ``edit`` changed, with the digest recomputed (what
    someone who changes the file on purpose does)."""
    payload = torch.load(path, weights_only=True)
    archive = zipfile.ZipFile(io.BytesIO(payload["program"].numpy().tobytes()))
    members = {i.filename: archive.read(i.filename) for i in archive.infolist()}
    edit(members)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for name, content in members.items():
            z.writestr(name, content)
    payload["program"] = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
    payload["digest"] = content_digest({k: v for k, v in payload.items() if k != "digest"})
    torch.save(payload, out)


def _in_graph(change):
    def edit(members):
        name = next(n for n in members if n.endswith("models/model.json"))
        graph = json.loads(members[name])
        change(graph)
        members[name] = json.dumps(graph).encode()
    return edit


def _every(graph, key, value):
    stack = [graph]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for k in item:
                if k == key:
                    item[k] = value
                else:
                    stack.append(item[k])
        elif isinstance(item, list):
            stack.extend(item)


def _pickled_weights(members):
    name = next(n for n in members if n.endswith("weights_config.json"))
    config = json.loads(members[name])
    next(iter(config["config"].values()))["use_pickle"] = True
    members[name] = json.dumps(config).encode()


@pytest.mark.parametrize("edit, message", [
    (_in_graph(lambda g: g.update(guards_code=["__import__('pathlib').Path({marker!r}).touch() is None"])),
     "guard code"),
    (_in_graph(lambda g: _every(g, "expr_str", "__import__('pathlib').Path({marker!r}).touch()")),
     "the shape expression"),
    (_in_graph(lambda g: _every(g, "target", "torch.os.system")), "the operator 'torch.os.system'"),
    (_in_graph(lambda g: _every(g, "target", "torch.ops.import_module")), "the operator 'torch.ops.import_module'"),
    (_pickled_weights, "a pickled weights payload"),
    (lambda m: m.update({"archive/data/aotinductor/model.so": b"\x7fELF"}), "the file 'data/aotinductor/model.so'"),
])
def test_a_changed_program_is_refused_before_torch_reads_it(ticket, tmp_path, edit, message):
    marker = tmp_path / "code-ran"
    bad = tmp_path / "bad.pt"

    def with_marker(members):  # the marker path goes into the strings the edits write
        edit(members)
        for name, content in members.items():
            if name.endswith(".json"):
                members[name] = content.replace(b"{marker!r}", repr(str(marker)).encode())

    _tampered(ticket[2], bad, with_marker)
    with pytest.raises(ValueError, match=f"holds {message}.*refused without loading it"):
        net = load_ticket(bad)
        net(torch.randn(2, *SHAPE))  # reached only if the load was not refused
    assert not marker.exists()
    flipped = bytearray(ticket[2].read_bytes())  # a changed byte without a new digest: corrupt, as before
    payload = torch.load(ticket[2], weights_only=True)
    at = bytes(flipped).find(payload["program"].numpy().tobytes()[-4000:-3000])
    assert at >= 0
    flipped[at + 10] ^= 1
    bad.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="is corrupt: its content does not match the SHA-256"):
        load_ticket(bad)


# ---------------------------------------------------------------------------- input_shape (24.2)

def test_prune_infers_the_input_shape_only_where_the_model_knows_it():
    model = home_net()
    for call in (lambda: prune(model, ratio=0.5), lambda: count_flops(model)):
        with pytest.raises(ValueError, match=r"needs input_shape=\(C, H, W\) for this HomeNet.*"
                                             r"e\.g\. input_shape=\(3, 32, 32\)"):
            call()
    grey = build_model("vgg11", width=0.125, in_channels=1)
    assert design_input_shape(grey) == (1, 32, 32) and design_input_shape(model) is None
    assert design_input_shape(build_model("resnet18", cfg=[4] * 8)) == (3, 224, 224)  # ImageNet stem
    _, report = prune(grey, {})  # keep every channel: the shape is what is tested
    assert report["input_shape"] == [1, 32, 32]
    assert count_flops(grey) == count_flops(grey, (1, 32, 32)) != count_flops(grey, (1, 16, 16))
    assert ebkernels.prune is prune
