import pytest
import torch

from compress.errors import UserError
from compress.models import MODELS, build_model


# images in, logits out (crepe takes 1024-sample frames only: tests/test_crepe.py)
@pytest.mark.parametrize("name", [n for n in MODELS.names() if n not in ("transformers", "crepe")])
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


def test_a_factory_taking_kwargs_gets_only_what_the_recipe_names(tmp_path):
    """torchvision/timm factories forward **kwargs to a class that does not know input_shape."""
    from compress.checkpoint import load_model
    from compress.pipeline import Pipeline
    from compress.recipe import load_recipe
    from tests.conftest import quick_recipe

    recipe = quick_recipe(tmp_path, model={"name": "import:tests.conftest:factory_net", "num_classes": 10, "width": 12},
                          stages=[{"type": "train", "epochs": 4}])
    pipeline = Pipeline(load_recipe(recipe), quiet=True)
    records = pipeline.run()
    assert pipeline.spec["kwargs"] == {"num_classes": 10, "width": 12}  # no input_shape: the factory never names it
    assert records[-1]["metrics"]["accuracy"] > 0.5
    model = load_model(tmp_path / "run" / "stage-1-train.ckpt", trust_model_code=True)
    assert model.head.out_features == 10 and model.body[1].out_features == 12


def test_zoo_models_get_input_shape_and_num_classes_from_the_data():
    from compress.models import model_kwargs

    assert model_kwargs("lenet5", {}, input_shape=(1, 8, 8), num_classes=10) == {"input_shape": [1, 8, 8], "num_classes": 10}
    assert model_kwargs("import:tests.conftest:factory_net", {}, input_shape=(1, 8, 8), num_classes=10) == {}
