import pytest
import torch

from compress.errors import UserError
from compress.models import MODELS, build_model


@pytest.mark.parametrize("name", MODELS.names())
@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 16, 16)])
def test_every_zoo_model_runs_on_any_input_shape(name, shape):
    model = build_model(name, input_shape=shape, num_classes=7)
    out = model(torch.randn(2, *shape))
    assert out.shape == (2, 7)
    out.sum().backward()  # trainable


def test_lenet5_has_the_caffe_shape():
    model = build_model("lenet5", input_shape=(1, 28, 28))
    assert sum(p.numel() for p in model.parameters()) == 431_080  # Deep Compression, Table 3
    assert sum(p.numel() for p in build_model("lenet300").parameters()) == 266_610  # Table 2


def test_import_form_and_errors():
    model = build_model("import:torch.nn:Linear", in_features=3, out_features=2)
    assert model(torch.randn(1, 3)).shape == (1, 2)
    with pytest.raises(UserError, match="did you mean 'resnet56'"):
        build_model("resnet65")
    with pytest.raises(UserError, match="cannot import module 'nope.mod'"):
        build_model("import:nope.mod:X")
