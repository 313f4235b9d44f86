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
