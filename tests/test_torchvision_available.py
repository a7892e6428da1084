"""torchvision's model definitions import here (through ebkernels' import_torchvision, which declares the detection ops a CUDA-built wheel cannot load). Skipped,
with the reason, where torchvision cannot be imported; with EBKERNELS_REQUIRE_TORCHVISION=1 (set by CI,
whose requirements.txt installs it) that is a failure, so its tests cannot silently skip there."""
import os

import pytest
import torch


def test_torchvision_imports_where_required():
    from conftest import TORCHVISION_MISSING

    if TORCHVISION_MISSING is not None and os.environ.get("EBKERNELS_REQUIRE_TORCHVISION") != "1":
        pytest.skip(TORCHVISION_MISSING)
    assert TORCHVISION_MISSING is None, TORCHVISION_MISSING
    import torchvision.models as tv_models

    assert "resnet50" in tv_models.list_models(module=tv_models)
    assert hasattr(torch.ops.torchvision, "nms")  # real or a declared schema: the name exists either way
