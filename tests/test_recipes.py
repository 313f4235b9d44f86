"""Every shipped recipe validates (schema, stage configs, names); local-data ones also plan."""

import os
from pathlib import Path

import pytest

from compress.recipe import load_recipe
from tests.conftest import ROOT

RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(ROOT)) for p in RECIPES])
def test_recipe_validates(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    if not Path(os.environ.get("CREPE_WEIGHTS", "../shared/crepe/tiny.pth")).is_file():
        (tmp_path / "tiny.pth").touch()  # crepe_tiny.yaml's weights file, checked to exist, not read here
        monkeypatch.setenv("CREPE_WEIGHTS", str(tmp_path / "tiny.pth"))
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


@pytest.mark.parametrize("top, message", [
    ({"model": ["name"]}, "model: expected a mapping (like {name: ...}), got a list"),
    ({"hardware": "cpu-local"}, "hardware: expected a list (YAML items like [a, b]), got 'cpu-local'"),
    # a field that cannot be read yet (its interpolation is broken) does not stop the check of the others
    ({"name": "${nope}", "hardware": "cpu-local"}, "hardware: expected a list (YAML items like [a, b]), got 'cpu-local'"),
    ({"stages": {"train": {"epochs": 1}}},
     "stages: expected a list (YAML items like - {type: train, epochs: 10}), got a mapping"),
    ({"stages": [{"epochs": 1}]},
     "stages[0].type: required; valid: distill, evaluate, prune.structured, prune.unstructured, quantize, share, train"),
    ({"eval": {"runtimes": ["nope"]}}, "eval.runtimes[0]: unknown runtime 'nope'; valid: onnxruntime"),
    ({"eval": {"latency_repeats": 0}}, "eval.latency_repeats: 0 must be >= 1"),
    ({"model": {"name": "lenet300", "checkpoint": "no/such.ckpt"}}, "model.checkpoint: file 'no/such.ckpt' not found"),
])
def test_recipe_shape_errors_are_one_exact_line(top, message):
    assert _error({**_recipe({"type": "train", "epochs": 1}), **top}) == message


@pytest.mark.parametrize("first, second", [("share", "prune.structured"), ("quantize", "prune.unstructured"),
                                           ("share", "quantize"), ("quantize", "share")])
def test_stage_orders_that_cannot_work_are_refused_at_load(first, second):
    blocks = {"share": {"type": "share", "bits": 4}, "quantize": {"type": "quantize"},
              "prune.structured": {"type": "prune.structured", "ratio": 0.5},
              "prune.unstructured": {"type": "prune.unstructured", "sparsity": 0.5}}
    message = _error(_recipe(blocks[first], blocks[second]))
    assert message.startswith(f"stages[1].type: '{second}' after '{first}' (stages[0]): ")


def test_the_loaded_recipe_is_resolved_read_only_and_names_every_stage(tmp_path):
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import ReadonlyConfigError

    ckpt = tmp_path / "m.ckpt"
    ckpt.write_bytes(b"")  # only its existence is checked at load
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({
        "name": "x", "model": {"name": "lenet300", "checkpoint": str(ckpt)}, "data": {"name": "digits"},
        "eval": {"latency_repeats": 1},
        "stages": [{"type": "train", "epochs": 1}, {"type": "train", "epochs": 1},
                   {"type": "prune.unstructured", "name": "cut", "sparsity": 0.5}]}))
    recipe = load_recipe(path)
    assert recipe.path == path
    stages = recipe.to_container()["stages"]
    assert [(s["type"], s["name"]) for s in stages] == [("train", "train"), ("train", "train-1"),
                                                        ("prune.unstructured", "cut")]
    assert stages[2]["schedule"] == "oneshot"  # defaults filled in
    assert recipe.to_container()["out_dir"] == "runs/x" and "out_dir: runs/x" in recipe.to_yaml()
    with pytest.raises(ReadonlyConfigError):
        recipe.cfg.name = "y"
    assert load_recipe(_recipe()).path is None
    # a Recipe made from a config resolves it itself
    from compress.recipe import Recipe

    direct = Recipe(OmegaConf.create({"name": "z", "out_dir": "runs/${name}", "stages": []}))
    assert direct.cfg.out_dir == "runs/z" and direct.to_container() == {"name": "z", "out_dir": "runs/z", "stages": []}


def test_merge_structured_fills_defaults_resolves_checks_and_freezes():
    from dataclasses import dataclass, field

    from omegaconf import MISSING, OmegaConf
    from omegaconf.errors import ReadonlyConfigError

    from compress.errors import UserError
    from compress.schema import merge_structured

    @dataclass
    class Schema:
        lr: float = 0.1
        epochs: int = 1
        betas: list = field(default_factory=lambda: [0.9, 0.99])

    @dataclass
    class Required:
        bits: int = MISSING

    assert OmegaConf.to_container(merge_structured(Schema, None)) == {"lr": 0.1, "epochs": 1, "betas": [0.9, 0.99]}
    # a block that interpolates a key of the recipe around it is resolved there, before the merge
    recipe = OmegaConf.create({"max_epochs": 7, "stage": {"epochs": "${max_epochs}"}})
    cfg = merge_structured(Schema, recipe.stage, "stages[0]")
    assert cfg.epochs == 7
    with pytest.raises(ReadonlyConfigError):
        cfg.lr = 1.0
    for values, key, message in [
        ({"lr": float("nan")}, "s", "s.lr: nan is not a finite number"),
        ({"betas": [0.9, float("inf")]}, "s", "s.betas[1]: inf is not a finite number"),
        ({"epochs": "many"}, "", "epochs: Value 'many' of type 'str' could not be converted to Integer"),
    ]:
        with pytest.raises(UserError) as e:
            merge_structured(Schema, values, key)
        assert str(e.value) == message
    with pytest.raises(UserError) as e:
        merge_structured(Required, {}, "share")
    assert str(e.value) == "share.bits: required value is missing"


def test_range_and_index_width_checks_at_their_bounds():
    from compress.errors import UserError
    from compress.schema import check_index_bits, check_range

    check_range(0.0, "k", 0.0, 1.0)  # [0, 1)
    check_range(1.0, "k", 0.0, 1.0, hi_open=False)  # [0, 1]
    for value, kw, message in [(1.0, {}, "k: 1.0 is outside [0, 1)"),
                               (0.0, {"lo_open": True}, "k: 0.0 is outside (0, 1)"),
                               (-0.5, {"hi_open": False}, "k: -0.5 is outside [0, 1]"),
                               (2.0, {"lo_open": True, "hi_open": False}, "k: 2.0 is outside (0, 1]")]:
        with pytest.raises(UserError) as e:
            check_range(value, "k", 0.0, 1.0, **kw)
        assert str(e.value) == message
    for ok in (1, 16, "auto"):
        check_index_bits(ok, "encoding.index_bits")
    for bad in (0, 17, True, 5.0, "5"):
        with pytest.raises(UserError, match=r"^encoding\.index_bits: .* is not a width; use an integer in \[1, 16\]"):
            check_index_bits(bad, "encoding.index_bits")
