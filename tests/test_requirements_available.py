"""The requirements a machine may lack (torchvision, torch-pruning, matplotlib: ``helpers.REQUIREMENTS``) import
here. Skipped, with the reason, where one cannot be imported; with ``EBKERNELS_REQUIRE_<NAME>=1`` (set by
CI, whose requirements.txt installs them) that is a failure, so their tests cannot silently skip there.
torchvision imports through ebkernels' import_torchvision, which declares the detection ops a CUDA-built
wheel cannot load."""
import pytest
import torch

from helpers import REQUIREMENTS, required


@pytest.mark.parametrize("marker", list(REQUIREMENTS))
def test_requirement_imports_where_required(marker):
    missing = REQUIREMENTS[marker][0]
    if missing is not None and not required(marker):
        pytest.skip(missing)
    assert missing is None, missing


@pytest.mark.torchvision
def test_torchvision_models_are_there():
    import torchvision.models as tv_models

    assert "resnet50" in tv_models.list_models(module=tv_models)
    assert hasattr(torch.ops.torchvision, "nms")  # real or a declared schema: the name exists either way
