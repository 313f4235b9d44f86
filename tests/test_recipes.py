"""Every shipped recipe validates (schema, stage configs, names); local-data ones also plan."""

from pathlib import Path

import pytest

from compress.recipe import load_recipe
from tests.conftest import ROOT

RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(ROOT)) for p in RECIPES])
def test_recipe_validates(path: Path):
    recipe = load_recipe(path)
    assert recipe.stages or path.parent.name == "teachers", "a recipe with no stages"
    assert str(recipe.cfg.out_dir)


@pytest.mark.parametrize("path", [p for p in RECIPES if "digits" in p.read_text() or "synthetic" in p.read_text()],
                         ids=lambda p: p.name)
def test_embedded_data_recipes_plan(path: Path):
    from compress.pipeline import Pipeline

    pipeline = Pipeline(load_recipe(path))
    model, _ = pipeline.prepare()
    assert set(pipeline.plans) == {s.name for s in pipeline.recipe.stages}


# -- the schema helpers every stage validates with ------------------------------------------------------------

def _error(source) -> str:
    from compress.errors import UserError

    with pytest.raises(UserError) as e:
        load_recipe(source)
    return str(e.value)


def _recipe(*stages) -> dict:
    return {"model": {"name": "lenet300"}, "data": {"name": "digits"}, "stages": list(stages)}


def test_a_nested_config_given_a_scalar_names_the_stage_and_the_config_it_wanted():
    # OmegaConf's merge error here carries neither a key nor a message attribute, only its text
    assert _error(_recipe({"type": "train", "epochs": 1}, {"type": "prune.unstructured", "sparsity": 0.5,
                                                           "finetune": 5})) == \
        "stages[1]: Merge error: int is not a subclass of FinetuneConfig. value: 5"


def test_unknown_keys_suggest_the_nearest_valid_one():
    assert _error(_recipe({"type": "train", "epochs": 1, "optimizer": {"lr": 0.1, "momentun": 0.9}})) == \
        "stages[0].optimizer.momentun: unknown key 'momentun'; valid: lr, momentum, name, nesterov, weight_decay " \
        "(did you mean 'momentum'?)"


def test_layer_patterns_that_match_nothing_name_the_nearest_layer_when_there_is_one():
    from compress.errors import UserError
    from compress.schema import match_layers

    names = ["features.0", "features.2", "fc_out"]
    assert match_layers(names, ["features.*", "fc_out", "features.0"], "k") == \
        {"features.0": "features.*", "features.2": "features.*", "fc_out": "fc_out"}
    with pytest.raises(UserError) as e:
        match_layers(names, ["fc_ot"], "k.layers")
    assert str(e.value) == "k.layers: 'fc_ot' matches no layer (did you mean 'fc_out'?); layers: features.0, features.2, fc_out"
    with pytest.raises(UserError) as e:
        match_layers(names, ["zzz"], "k.layers")
    assert str(e.value) == "k.layers: 'zzz' matches no layer; layers: features.0, features.2, fc_out"
