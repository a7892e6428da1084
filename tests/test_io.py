"""ebkernels._io: atomic writes and their failures, content digests, plain-data loads, stale temporaries."""
import errno
import io
import os
import re

import pytest
import torch

from ebkernels import _io


def _nested():
    return {"model": {"w": torch.randn(3, 4), "b": torch.zeros(0), "n": torch.tensor(7)},
            "half": torch.randn(5).to(torch.bfloat16), "mask": torch.tensor([True, False]),
            "opt": {"state": {0: {"momentum_buffer": torch.ones(2)}}, "param_groups": [{"lr": 0.1, "nesterov": False,
                                                                                        "foreach": None}]},
            "found": [("0.5", 3)], "name": "vgg11", "ratio": 0.3}


def test_content_digest_survives_a_save_and_load_and_sees_one_changed_bit():
    obj = _nested()
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    digest = _io.content_digest(obj)
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest) and _io.content_digest(loaded) == digest
    loaded["model"]["w"].view(torch.int32)[1, 2] ^= 1  # one bit of one float
    assert _io.content_digest(loaded) != digest
    assert _io.content_digest({"a": 1}) != _io.content_digest({"a": 1.0}) != _io.content_digest({"a": "1"})
    assert _io.content_digest(torch.zeros(2, 3)) != _io.content_digest(torch.zeros(3, 2))
    with pytest.raises(TypeError, match="a object is not plain data"):
        _io.content_digest({"x": object()})


def test_a_refused_write_names_the_file_and_size_and_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")

    def full(tmp):
        with open(tmp, "wb") as f:
            f.write(b"part")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(_io.WriteFailed) as caught:
        _io.atomic_write(path, full, nbytes=12345)
    e = caught.value
    assert isinstance(e, OSError) and e.errno == errno.ENOSPC and e.path == str(path) and e.nbytes == 12345
    assert str(e) == f"cannot write {path} (12,345 bytes): No space left on device; the file there before is unchanged"
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]


@pytest.mark.parametrize("what, name", [(os.getcwd, "posix.getcwd"),  # from a module torch blocks outright
                                        (io.BytesIO, "_io.BytesIO")])  # from one it merely does not allow
def test_load_plain_refuses_what_would_import_something(tmp_path, what, name):
    path = tmp_path / "x.pt"
    torch.save({"t": torch.ones(1), "f": what}, path)  # pickled by reference: imported when loaded
    with pytest.raises(_io.NotPlainData, match=rf"asks to import {re.escape(name)}; refused without running any"):
        _io.load_plain(path)
    obj = _nested()
    torch.save(obj, path)
    assert _io.content_digest(_io.load_plain(path)) == _io.content_digest(obj)
