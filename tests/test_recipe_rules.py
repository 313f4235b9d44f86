"""recipe.py and schema.py: each rule a recipe is held to, at its edges (mutation testing: docs/mutants/recipe.md).

Every expected message below is written out by hand from the rule it states (key path, the value as the
user wrote it, what would be valid), never taken from the code under test.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ReadonlyConfigError

from compress.cli import main
from compress.errors import UserError
from compress.recipe import build_stages, load_recipe
from compress.schema import (
    check_choice,
    check_finite,
    check_index_bits,
    check_range,
    join_key,
    match_layers,
    merge_structured,
)

STAGE_TYPES = "distill, evaluate, prune.structured, prune.unstructured, quantize, share, train"
TOP_KEYS = "data, encoding, eval, hardware, logger, model, name, out_dir, search, seed, stages, task, teachers_dir, trainer"


def minimal(**over) -> dict:
    recipe = {"model": {"name": "lenet300"}, "data": {"name": "digits"}}
    recipe.update(over)
    return recipe


def error_of(source, overrides=()) -> str:
    with pytest.raises(UserError) as e:
        load_recipe(source, list(overrides))
    return str(e.value)


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# -- reading the file -----------------------------------------------------------------------------------------

def test_a_recipe_file_loads_by_str_or_path_and_defaults_fill_every_section(tmp_path):
    path = write(tmp_path, "model: {name: lenet300}\ndata: {name: digits}\n")
    for source in (path, str(path)):
        recipe = load_recipe(source)
        assert recipe.path == path
    # every default of the schema, written out from the dataclasses' documented values
    assert recipe.to_container() == {
        "name": "run", "seed": 0, "out_dir": "runs/run", "model": {"name": "lenet300"}, "data": {"name": "digits"},
        "trainer": {"accelerator": "cpu", "devices": 1, "num_nodes": 1, "strategy": "auto", "precision": "32-true",
                    "gradient_clip_val": None, "log_every_n_steps": 10, "progress_bar": True},
        "logger": {"wandb": {"mode": "offline", "project": "compress", "entity": None, "group": None, "tags": [],
                             "log_model": True}, "csv": True},
        "eval": {"latency_repeats": 30, "latency_warmup": 10, "latency_batch_size": None, "latency_threads": 1,
                 "max_batches": None, "runtimes": []},
        "encoding": {"index_bits": 5}, "hardware": [], "teachers_dir": "teachers", "stages": [],
        "task": {"name": "classification", "loss": None, "metrics": None, "primary": None, "higher_is_better": None,
                 "distill": None}}
    assert recipe.stages == []


def test_a_model_or_data_section_keeps_the_default_name_when_it_gives_other_keys():
    cfg = load_recipe(minimal(model={}, data={"batch_size": 3})).to_container()
    assert cfg["model"] == {"name": "lenet300"} and cfg["data"] == {"name": "digits", "batch_size": 3}


@pytest.mark.parametrize("text, where, problem", [
    # a flow mapping left open: the parser stops at the end of the stream, line 4 column 1 (1-based)
    ("name: x\nstages:\n  - {type: train, epochs: 3\n", ":4:1", "expected ',' or '}', but got '<stream end>'"),
    # an alias to no anchor: `*y` starts at line 2, column 7
    ("name: x\nseed: *y\n", ":2:7", "found undefined alias 'y'"),
    # a control character is refused by the reader, which knows no line: no position, its own first line
    ("name: x\x07\n", "", "unacceptable character #x0007: special characters are not allowed"),
])
def test_yaml_syntax_errors_name_the_file_line_and_column(tmp_path, text, where, problem):
    path = write(tmp_path, text)
    assert error_of(path) == f"{path}{where}: YAML syntax error: {problem}"


@pytest.mark.parametrize("text, tail", [
    ("- a\n- b\n", "a recipe is a mapping of keys (name, model, data, stages, ...), got list"),
    ("3\n", "a recipe is a mapping of keys (name, model, data, stages, ...), got int"),
    ("", "the recipe is empty; give at least model, data and stages (recipes/quickstart.yaml is a complete example)"),
    ("# nothing\n", "the recipe is empty; give at least model, data and stages "
                    "(recipes/quickstart.yaml is a complete example)"),
    ("{}\n", "the recipe is empty; give at least model, data and stages (recipes/quickstart.yaml is a complete example)"),
    ("~: 1\n", "Incompatible key type 'NoneType'"),
    ("day: 2020-01-01\n", "Value 'date' is not a supported primitive type"),
])
def test_a_file_that_is_no_recipe_mapping_is_one_line_naming_the_file(tmp_path, text, tail):
    path = write(tmp_path, text)
    assert error_of(path) == f"{path}: {tail}"


def test_a_missing_file_or_a_folder_is_not_a_recipe(tmp_path):
    for path in (tmp_path / "nope.yaml", tmp_path):
        assert error_of(path) == f"{path}: recipe file not found (run `ls recipes/` for the shipped ones)"
        assert error_of(str(path)) == f"{path}: recipe file not found (run `ls recipes/` for the shipped ones)"


def test_an_empty_mapping_from_python_is_named_recipe():
    assert error_of({}) == "recipe: the recipe is empty; give at least model, data and stages " \
                           "(recipes/quickstart.yaml is a complete example)"


# -- overrides -------------------------------------------------------------------------------------------------

def test_overrides_are_applied_in_order_and_parsed_as_yaml():
    recipe = load_recipe(minimal(trainer={"progress_bar": False},
                                 stages=[{"type": "train", "epochs": 1}, {"type": "prune.unstructured", "sparsity": 0.5}]),
                         ["seed=3", "seed=4", "name=a=b", "stages.1.sparsity=0.75", "trainer={devices: 2}",
                          "+eval.latency_threads=2", " teachers_dir =t", "logger.wandb.tags=[x, y]"])
    cfg = recipe.cfg
    assert cfg.seed == 4  # the last one wins
    assert cfg.name == "a=b" and cfg.out_dir == "runs/a=b"  # split at the first '='; interpolations see it
    assert cfg.stages[1].sparsity == 0.75 and recipe.stages[1].config.sparsity == 0.75
    # a mapping merges into the section: the recipe's progress_bar stays
    assert cfg.trainer.devices == 2 and cfg.trainer.progress_bar is False
    assert cfg.eval.latency_threads == 2 and cfg.teachers_dir == "t"
    assert list(cfg.logger.wandb.tags) == ["x", "y"]


def test_override_values_that_are_not_yaml_stay_text_and_empty_stays_empty():
    cfg = load_recipe(minimal(), ["name=[a", "teachers_dir="]).cfg
    assert cfg.name == "[a" and cfg.teachers_dir == ""


def test_overrides_add_keys_to_a_structured_recipe_too():
    # a recipe built in Python as a struct-mode config (no new keys by default) still takes new model arguments
    source = OmegaConf.create(minimal())
    OmegaConf.set_struct(source, True)
    cfg = load_recipe(source, ["model.num_classes=10"]).cfg
    assert cfg.model == {"name": "lenet300", "num_classes": 10}


@pytest.mark.parametrize("stages, override, message", [
    (1, "stages.1.x=1", "override 'stages.1.x': 'stages' has 1 items; index '1' is out of range"),
    (2, "stages.2.epochs=1", "override 'stages.2.epochs': 'stages' has 2 items; index '2' is out of range"),
    (2, "stages.-1.epochs=1", "override 'stages.-1.epochs': 'stages' has 2 items; index '-1' is out of range"),
    (2, "stages.first.epochs=1", "override 'stages.first.epochs': 'stages' has 2 items; index 'first' is out of range"),
    # the last index is fine, and what it sets is checked by the stage
    (2, "stages.1.epochs=-1", "stages[1].epochs: -1 must be >= 0"),
])
def test_list_indices_in_override_keys_must_exist(stages, override, message):
    assert error_of(minimal(stages=[{"type": "train"}] * stages), [override]) == message


def test_list_indices_are_checked_below_the_top_level_too():
    source = minimal(eval={"runtimes": []})
    assert error_of(source, ["eval.runtimes.0.x=1"]) == \
        "override 'eval.runtimes.0.x': 'eval.runtimes' has 0 items; index '0' is out of range"
    # a section the recipe does not have yet is made by the override: no index to check
    assert error_of(minimal(), ["eval.runtimes.0.x=1"]) == \
        "eval.runtimes: expected a list (YAML items like [a, b]), got a mapping"


@pytest.mark.parametrize("override, message", [
    ("seed", "override 'seed': expected key=value, e.g. trainer.max_epochs=1"),
    (" =3", "override ' =3': expected key=value, e.g. trainer.max_epochs=1"),
    # the '+' of Hydra's "add a key" is dropped, nothing else: an X that starts the key stays
    ("+Xfoo=1", f"Xfoo: unknown key 'Xfoo'; valid: {TOP_KEYS}"),
    ("seed=[1", "seed: Value '[1' of type 'str' could not be converted to Integer"),
])
def test_bad_overrides_are_one_line(override, message):
    assert error_of(minimal(hardware=[]), [override]) == message


@pytest.mark.parametrize("override, message", [
    # the last part of the key is an index too when it falls in a list (a traceback before: int('x'))
    ("hardware.x=a100", "override 'hardware.x': 'hardware' has 1 items; index 'x' is out of range"),
    ("hardware.1=a100", "override 'hardware.1': 'hardware' has 1 items; index '1' is out of range"),
    ("hardware.-1=a100", "override 'hardware.-1': 'hardware' has 1 items; index '-1' is out of range"),
    ("stages.1={type: train}", "override 'stages.1': 'stages' has 1 items; index '1' is out of range"),
])
def test_an_override_replaces_list_items_but_never_appends(override, message):
    source = minimal(hardware=["cpu-local"], stages=[{"type": "train"}])
    assert error_of(source, [override]) == message
    cfg = load_recipe(source, ["hardware.0=a100", "stages.0={type: evaluate}"]).cfg
    assert list(cfg.hardware) == ["a100"] and [s.type for s in cfg.stages] == ["evaluate"]


def test_indices_are_checked_inside_list_items_and_lists_of_lists():
    source = minimal(model={"name": "lenet300", "grid": [[1, 2], [3]]},
                     stages=[{"type": "prune.unstructured", "sparsity": 0.5, "ignore": []}])
    assert error_of(source, ["stages.0.ignore.3=fc"]) == \
        "override 'stages.0.ignore.3': 'stages.0.ignore' has 0 items; index '3' is out of range"
    assert error_of(source, ["model.grid.1.1=5"]) == \
        "override 'model.grid.1.1': 'model.grid.1' has 1 items; index '1' is out of range"
    assert error_of(source, ["model.grid.0.2=5"]) == \
        "override 'model.grid.0.2': 'model.grid.0' has 2 items; index '2' is out of range"
    assert load_recipe(source, ["model.grid.0.1=5"]).cfg.model.grid == [[1, 5], [3]]


def test_an_override_replaces_a_value_that_does_not_resolve_and_names_one_it_must_walk_through():
    assert load_recipe(minimal(name="${nope}"), ["name=x"]).cfg.out_dir == "runs/x"
    assert list(load_recipe(minimal(hardware=["${nope}"]), ["hardware.0=a100"]).cfg.hardware) == ["a100"]
    assert error_of(minimal(model="${nope}"), ["model.name=lenet5"]) == \
        "override 'model.name': Interpolation key 'nope' not found"
    assert error_of(minimal(stages=["${nope}"]), ["stages.0.epochs=1"]) == \
        "override 'stages.0.epochs': Interpolation key 'nope' not found"


# -- the shape of each section ---------------------------------------------------------------------------------

@pytest.mark.parametrize("top, message", [
    ({"trainer": 3}, "trainer: expected a mapping (keys: accelerator, devices, num_nodes, strategy, precision, "
                     "gradient_clip_val, log_every_n_steps, progress_bar), got 3"),
    ({"encoding": [5]}, "encoding: expected a mapping (keys: index_bits), got [5]"),
    ({"logger": {"wandb": {"tags": "a"}}}, "logger.wandb.tags: expected a list (YAML items like [a, b]), got 'a'"),
    ({"eval": {"runtimes": "onnxruntime"}}, "eval.runtimes: expected a list (YAML items like [a, b]), got 'onnxruntime'"),
    ({"eval": {"runtimes": {"onnxruntime": 1}}}, "eval.runtimes: expected a list (YAML items like [a, b]), got a mapping"),
    ({"data": ["digits"]}, "data: expected a mapping (like {name: ...}), got a list"),
    ({"stages": "train"}, "stages: expected a list (YAML items like - {type: train, epochs: 10}), got 'train'"),
    # a null field is left to the schema, and the fields after it are still checked
    ({"teachers_dir": None, "stages": {"train": {}}},
     "stages: expected a list (YAML items like - {type: train, epochs: 10}), got a mapping"),
    ({"trainer": None}, "trainer: field 'trainer' is not Optional"),
    ({"seed": None}, "seed: Incompatible value 'None' for field of type 'int'"),
    ({"model": "lenet300"}, "model: Cannot assign str to Dict[str, Any]"),
    ({"trainr": {}}, f"trainr: unknown key 'trainr'; valid: {TOP_KEYS} (did you mean 'trainer'?)"),
])
def test_sections_of_the_wrong_shape_are_one_exact_line(top, message):
    assert error_of(minimal(**top)) == message


def test_a_broken_interpolation_is_reported_with_its_key():
    assert error_of(minimal(out_dir="runs/${nme}")) == \
        "out_dir: interpolation does not resolve: Interpolation key 'nme' not found"
    assert error_of(minimal(name="${nope}", hardware="a100")) == \
        "hardware: expected a list (YAML items like [a, b]), got 'a100'"


def test_nan_and_inf_anywhere_in_the_recipe_name_their_key():
    assert error_of(minimal(trainer={"gradient_clip_val": float("nan")})) == \
        "trainer.gradient_clip_val: nan is not a finite number"
    assert error_of(minimal(model={"name": "lenet300", "scale": float("-inf")})) == \
        "model.scale: -inf is not a finite number"


# -- top-level values at their edges ---------------------------------------------------------------------------

@pytest.mark.parametrize("key, value", [
    ("seed", 0), ("eval.latency_repeats", 1), ("eval.latency_threads", 1), ("model.output", "logits"),
    ("model.output", 0), ("encoding.index_bits", 1), ("encoding.index_bits", 16), ("encoding.index_bits", "auto"),
    ("logger.wandb.mode", "online"), ("logger.wandb.mode", "disabled"), ("hardware", ["a100", "cpu-local"]),
])
def test_values_at_the_accepted_edges_load(key, value):
    source = OmegaConf.create(minimal())
    OmegaConf.update(source, key, value)
    assert OmegaConf.select(load_recipe(source).cfg, key) == value


@pytest.mark.parametrize("top, message", [
    ({"seed": -1}, "seed: -1 must be >= 0"),
    ({"eval": {"latency_repeats": 0}}, "eval.latency_repeats: 0 must be >= 1"),
    ({"eval": {"latency_repeats": -3}}, "eval.latency_repeats: -3 must be >= 1"),
    ({"eval": {"latency_threads": 0}}, "eval.latency_threads: 0 must be >= 1 (torch intra-op threads)"),
    ({"out_dir": ""}, "out_dir: must not be empty"),
    ({"model": {"name": "lenet30"}}, "model.name: unknown model 'lenet30'; valid: crepe, lenet300, lenet5, mlp, mobilenetv2, "
                                     "mobilenetv2_small, resnet, resnet20, resnet56, transformers, vit "
                                     "(did you mean 'lenet300'?)"),
    ({"model": {"name": None}}, "model.name: unknown model 'None'; valid: crepe, lenet300, lenet5, mlp, mobilenetv2, "
                                "mobilenetv2_small, resnet, resnet20, resnet56, transformers, vit"),
    ({"model": {"name": "lenet300", "output": 1.5}}, "model.output: 1.5 must be a field name (logits) or a tuple index (0)"),
    ({"model": {"name": "lenet300", "output": True}}, "model.output: True must be a field name (logits) or a tuple index (0)"),
    ({"model": {"name": "lenet300", "output": [0]}}, "model.output: [0] must be a field name (logits) or a tuple index (0)"),
    ({"logger": {"wandb": {"mode": "offlne"}}}, "logger.wandb.mode: 'offlne' is not valid; valid: disabled, offline, "
                                                 "online (did you mean 'offline'?)"),
    ({"encoding": {"index_bits": 0}}, "encoding.index_bits: 0 is not a width; use an integer in [1, 16] (the paper: 5) "
                                      "or 'auto'"),
    ({"encoding": {"index_bits": 17}}, "encoding.index_bits: 17 is not a width; use an integer in [1, 16] (the paper: 5) "
                                       "or 'auto'"),
    ({"hardware": ["nope"]}, "hardware[0]: unknown profile 'nope'; shipped: a100, cpu-local, edge-npu-int8, jetson-tx2, "
                             "tpu-v1; or give the path of a YAML file"),
    ({"hardware": ["a100", "a100"]}, "hardware[1]: profile 'a100' is listed twice (metric keys are per profile name)"),
    ({"eval": {"runtimes": ["onnx"]}}, "eval.runtimes[0]: unknown runtime 'onnx'; valid: onnxruntime "
                                       "(did you mean 'onnxruntime'?)"),
    ({"data": {"name": "mnsit"}}, "data.name: unknown dataset 'mnsit'; valid: cifar10, digits, imagefolder, mnist, "
                                  "synthetic, text, tokens, tones (did you mean 'mnist'?)"),
])
def test_values_past_the_edges_are_one_exact_line(top, message):
    assert error_of(minimal(**top)) == message


def test_a_checkpoint_must_be_a_file(tmp_path):
    ckpt = tmp_path / "m.ckpt"
    ckpt.write_bytes(b"")
    assert load_recipe(minimal(model={"name": "lenet300", "checkpoint": str(ckpt)})).cfg.model.checkpoint == str(ckpt)
    assert error_of(minimal(model={"name": "lenet300", "checkpoint": str(tmp_path)})) == \
        f"model.checkpoint: file '{tmp_path}' not found"


@pytest.mark.parametrize("change, expected", [
    ({"seed": -1}, "error: seed: -1 must be >= 0"),
    ({"encoding": {"index_bits": "five"}},
     "error: encoding.index_bits: 'five' is not a width; use an integer in [1, 16] (the paper: 5) or 'auto'"),
    ({"stages": [{"type": "quantize"}, {"type": "quantize"}]},
     "error: stages[1].type: 'quantize' after 'quantize' (stages[0]): the model is quantised already; use one "
     "quantize stage (mode: qat fine-tunes)"),
])
def test_the_cli_prints_the_line_and_exits_2(tmp_path, capsys, change, expected):
    path = write(tmp_path, yaml.safe_dump(minimal(out_dir=str(tmp_path / "run"), **change)))
    assert main([str(path), "--dry-run"]) == 2
    captured = capsys.readouterr()
    assert (captured.err.strip(), captured.out) == (expected, "")


# -- stages ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("blocks, message", [
    (["train"], "stages[0]: a stage is a mapping with a 'type', got 'train'"),
    ([{"type": "train"}, 3], "stages[1]: a stage is a mapping with a 'type', got 3"),
    ([{"epochs": 1}], f"stages[0].type: required; valid: {STAGE_TYPES}"),
    ([{"type": None}], f"stages[0].type: required; valid: {STAGE_TYPES}"),
    ([{"type": "trian"}], f"stages[0].type: unknown stage type 'trian'; valid: {STAGE_TYPES} (did you mean 'train'?)"),
    ([{"type": 5}], f"stages[0].type: unknown stage type '5'; valid: {STAGE_TYPES}"),
    ([{"type": "train"}, {"type": "train", "epochs": -1}], "stages[1].epochs: -1 must be >= 0"),
])
def test_stage_blocks_are_checked_with_their_place_in_the_list(blocks, message):
    assert error_of(minimal(stages=blocks)) == message
    with pytest.raises(UserError) as e:
        build_stages(blocks)
    assert str(e.value) == message


@pytest.mark.parametrize("block, message", [
    ({"type": "prune.unstructured", "sparsity": 0.5, "steps": -1}, "stages[0].steps: -1 must be >= 0"),
    ({"type": "distill", "finetune": {"epochs": 0}},
     "stages[0].finetune.epochs: 0; a distill stage needs at least 1 epoch"),
    ({"type": "distill", "finetune": {"epochs": 1, "distill": {"teacher": "self"}}},
     "stages[0].finetune.distill: a distill stage takes its teacher from stages[0].distill; remove finetune.distill"),
    ({"type": "quantize", "finetune": {"epochs": 1}},
     "stages[0].finetune.epochs: mode ptq does not train; use mode: qat to fine-tune"),
])
def test_stage_ranges_are_checked_with_the_recipe(block, message):
    assert error_of(minimal(stages=[block])) == message


def test_a_recipe_key_that_is_a_python_keyword_is_read_as_its_field_from_any_mapping():
    from compress.stage_configs import StructuredConfig, make_stage_config

    for values in ({"ratio": 0.5, "global": True}, OmegaConf.create({"ratio": 0.5, "global": True})):
        cfg = make_stage_config(StructuredConfig, values, "s")
        assert cfg.global_pruning is True and "global" not in cfg and OmegaConf.is_readonly(cfg)
    assert make_stage_config(StructuredConfig, cfg, "s") is cfg  # merged already: taken as it is


def test_no_stages_is_an_empty_list():
    assert build_stages(None) == [] and build_stages([]) == []


def test_stage_names_default_to_the_type_and_stay_unique():
    stages = build_stages([{"type": "train"}, {"type": "train", "name": None}, {"type": "evaluate", "name": "e"},
                           {"type": "train"}, {"type": "evaluate", "name": "e"}])
    assert [(s.type_name, s.name, s.key) for s in stages] == [
        ("train", "train", "stages[0]"), ("train", "train-1", "stages[1]"), ("evaluate", "e", "stages[2]"),
        ("train", "train-3", "stages[3]"), ("evaluate", "e-4", "stages[4]")]


def test_a_stage_name_made_unique_does_not_take_a_name_given_later():
    # stage 2's default name "train-2" is taken by stage 1's own name: it must not be reused
    names = [s.name for s in build_stages([{"type": "train"}, {"type": "train", "name": "train-2"}, {"type": "train"}])]
    assert names == ["train", "train-2", "train-2-2"]


def test_stage_configs_come_back_with_their_defaults():
    recipe = load_recipe(minimal(stages=[{"type": "train", "epochs": 2, "optimizer": {"lr": 0.1}}]))
    assert recipe.to_container()["stages"] == [{
        "type": "train", "name": "train", "epochs": 2,
        "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0, "nesterov": False},
        "lr_schedule": "cosine", "distill": None, "limit_train_batches": 1.0}]
    assert recipe.stages[0].config.epochs == 2
    with pytest.raises(ReadonlyConfigError):
        recipe.cfg.stages[0].epochs = 3


REFUSED = {
    ("share", "prune.structured"): "structured pruning after weight sharing would re-cluster nothing and break the "
                                   "codebooks; put prune.structured before share",
    ("quantize", "prune.structured"): "channels removed after quantisation would leave calibrated ranges and int8 "
                                      "scales of another network; put prune.structured before quantize",
    ("quantize", "prune.unstructured"): "masks set after quantisation change weights the int8 scales were fitted to; "
                                        "put prune.unstructured before quantize",
    ("quantize", "share"): "a codebook over int8 weights is not a format any runtime runs; choose share (Deep "
                           "Compression file) or quantize (int8 runtime)",
    ("share", "quantize"): "int8 over shared codebook weights is not a format any runtime runs; choose share (Deep "
                           "Compression file) or quantize (int8 runtime)",
    ("quantize", "quantize"): "the model is quantised already; use one quantize stage (mode: qat fine-tunes)",
}
BLOCKS = {"share": {"type": "share", "bits": 4}, "quantize": {"type": "quantize"},
          "prune.structured": {"type": "prune.structured", "ratio": 0.5},
          "prune.unstructured": {"type": "prune.unstructured", "sparsity": 0.5}, "train": {"type": "train"}}


@pytest.mark.parametrize("first, later", list(REFUSED), ids=[f"{a}>{b}" for a, b in REFUSED])
def test_refused_orders_name_both_stages_even_with_others_between(first, later):
    message = error_of(minimal(stages=[BLOCKS["train"], BLOCKS[first], BLOCKS["train"], BLOCKS[later]]))
    assert message == f"stages[3].type: '{later}' after '{first}' (stages[1]): {REFUSED[(first, later)]}"


def test_every_other_order_of_two_stages_loads():
    for first in BLOCKS:
        for later in BLOCKS:
            if (first, later) not in REFUSED:
                stages = load_recipe(minimal(stages=[BLOCKS[first], BLOCKS[later]])).stages
                assert [s.type_name for s in stages] == [first, later]


# -- schema helpers --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prefix, key, joined", [
    ("", "a", "a"), ("", "[0]", "[0]"), ("s", "", "s"), ("", "", ""),
    ("stages[1]", "lr", "stages[1].lr"), ("stages", "[1]", "stages[1]"), ("a.b", "c.d", "a.b.c.d"),
])
def test_join_key(prefix, key, joined):
    assert join_key(prefix, key) == joined


@dataclass
class Opt:
    lr: float = 0.1
    betas: list = field(default_factory=lambda: [0.9, 0.99])


@dataclass
class Schema:
    epochs: int = 1
    opt: Opt = field(default_factory=Opt)


@dataclass
class TwoRequired:
    zeta: int = MISSING
    alpha: int = MISSING
    beta: int = 0


@dataclass
class Empty:
    pass


def test_merge_structured_fills_defaults_and_keeps_given_values():
    cfg = merge_structured(Schema, {"opt": {"lr": 0.5}}, "s")
    assert OmegaConf.to_container(cfg) == {"epochs": 1, "opt": {"lr": 0.5, "betas": [0.9, 0.99]}}
    assert OmegaConf.is_readonly(cfg)
    with pytest.raises(ReadonlyConfigError):
        cfg.opt.lr = 1.0
    assert OmegaConf.to_container(merge_structured(Schema, OmegaConf.create({"epochs": 4}))) == \
        {"epochs": 4, "opt": {"lr": 0.1, "betas": [0.9, 0.99]}}
    with pytest.raises(UserError) as e:  # no key given: the path inside is the whole key
        merge_structured(Schema, {"opt": {"lr": "fast"}})
    assert str(e.value) == "opt.lr: Value 'fast' of type 'str' could not be converted to Float"


@pytest.mark.parametrize("values, message", [
    ([1, 2], "s: expected a mapping, got list ([1, 2])"),
    (ListConfig([1, 2]), "s: expected a mapping, got list ([1, 2])"),
    (3, "s: expected a mapping, got int (3)"),
    ({"opt": {"lr": float("inf")}}, "s.opt.lr: inf is not a finite number"),
    ({"opt": {"betas": [0.9, float("-inf")]}}, "s.opt.betas[1]: -inf is not a finite number"),
    ({"opt": {"lrr": 1.0}}, "s.opt.lrr: unknown key 'lrr'; valid: betas, lr (did you mean 'lr'?)"),
    ({"epoch": 1}, "s.epoch: unknown key 'epoch'; valid: epochs, opt (did you mean 'epochs'?)"),
    ({"zzz": 1}, "s.zzz: unknown key 'zzz'; valid: epochs, opt"),
    # OmegaConf's merge error of a nested config carries no key: the block's key is all there is
    ({"opt": 2}, "s: Merge error: int is not a subclass of Opt. value: 2"),
])
def test_merge_structured_errors_are_one_line_under_the_key(values, message):
    with pytest.raises(UserError) as e:
        merge_structured(Schema, values, "s")
    assert str(e.value) == message


def test_merge_structured_names_the_alphabetically_first_missing_value():
    with pytest.raises(UserError) as e:
        merge_structured(TwoRequired, {}, "q")
    assert str(e.value) == "q.alpha: required value is missing"
    with pytest.raises(UserError) as e:
        merge_structured(TwoRequired, {"alpha": 1}, "q")
    assert str(e.value) == "q.zeta: required value is missing"
    assert OmegaConf.to_container(merge_structured(TwoRequired, {"alpha": 1, "zeta": 2}, "q")) == \
        {"zeta": 2, "alpha": 1, "beta": 0}


def test_an_unknown_key_of_a_schema_with_no_keys_has_nothing_to_suggest():
    with pytest.raises(UserError) as e:
        merge_structured(Empty, {"x": 1}, "k")
    assert str(e.value) == "k.x: Key 'x' not in 'Empty'"


def test_check_finite_walks_nested_mappings_and_lists():
    check_finite(OmegaConf.create({"a": 1.5, "b": [0.0, -2.0, {"c": 1e308}], "n": None, "i": 10**30}), "k")
    for cfg, message in [({"a": {"b": [1.0, float("nan")]}}, "k.a.b[1]: nan is not a finite number"),
                         ({"x": float("inf")}, "k.x: inf is not a finite number"),
                         ([[0.0], [float("-inf")]], "k[1][0]: -inf is not a finite number")]:
        with pytest.raises(UserError) as e:
            check_finite(OmegaConf.create(cfg), "k")
        assert str(e.value) == message
    with pytest.raises(UserError) as e:
        check_finite(OmegaConf.create([float("nan")]), "")
    assert str(e.value) == "[0]: nan is not a finite number"
    check_finite(1.0, "k")  # not a config: nothing in it to check


@pytest.mark.parametrize("value, kw, ok", [
    (0.0, {}, True), (-1e-9, {}, False), (0.999, {}, True), (1.0, {}, False),
    (0.0, {"lo_open": True}, False), (1e-9, {"lo_open": True}, True),
    (1.0, {"hi_open": False}, True), (1.0 + 1e-9, {"hi_open": False}, False),
    (1.0, {"lo_open": True, "hi_open": False}, True), (0.0, {"lo_open": True, "hi_open": False}, False),
])
def test_check_range_bounds(value, kw, ok):
    if ok:
        check_range(value, "k", 0.0, 1.0, **kw)
    else:
        with pytest.raises(UserError, match=r"^k: .* is outside [\[(]0, 1[\])]$"):
            check_range(value, "k", 0.0, 1.0, **kw)


def test_check_range_message_writes_the_interval_as_chosen():
    with pytest.raises(UserError) as e:
        check_range(20, "bits", 1, 16, hi_open=False)
    assert str(e.value) == "bits: 20 is outside [1, 16]"
    with pytest.raises(UserError) as e:
        check_range(0.5, "k", 0.5, 2.5, lo_open=True)
    assert str(e.value) == "k: 0.5 is outside (0.5, 2.5)"


def test_check_choice():
    check_choice("b", "k", ("a", "b"))
    with pytest.raises(UserError) as e:
        check_choice("bb", "k", ["a", "b"])
    assert str(e.value) == "k: 'bb' is not valid; valid: a, b (did you mean 'b'?)"


@pytest.mark.parametrize("value", [1, 2, 5, 15, 16, "auto"])
def test_index_bits_accepted(value):
    check_index_bits(value, "k")


@pytest.mark.parametrize("value, shown", [(0, "0"), (-5, "-5"), (17, "17"), (True, "True"), (False, "False"),
                                          (5.0, "5.0"), ("5", "'5'"), ("Auto", "'Auto'"), (None, "None")])
def test_index_bits_refused(value, shown):
    with pytest.raises(UserError) as e:
        check_index_bits(value, "k")
    assert str(e.value) == f"k: {shown} is not a width; use an integer in [1, 16] (the paper: 5) or 'auto'"


def test_match_layers_exact_names_globs_and_the_first_pattern_wins():
    names = ["a[1]", "a1", "b.0", "b.1"]
    # "a[1]" is a glob for "a1" and the exact name of "a[1]"; the first pattern that matches a layer keeps it
    assert match_layers(names, ["a[1]", "b.*", "*"], "k") == {"a[1]": "a[1]", "a1": "a[1]", "b.0": "b.*",
                                                              "b.1": "b.*"}
    assert match_layers(names, {"b.1": 0.5, "b.?": 0.9}, "k") == {"b.1": "b.1", "b.0": "b.?"}
    assert match_layers(names, [], "k") == {}
    with pytest.raises(UserError) as e:
        match_layers(names, ["b.*", "a[2]"], "k.layers")
    assert str(e.value) == "k.layers: 'a[2]' matches no layer (did you mean 'a[1]'?); layers: a[1], a1, b.0, b.1"


def test_merge_structured_accepts_a_readonly_dictconfig_block():
    # a DictConfig block is turned into plain data before the merge (a read-only block cannot be merged into)
    block = OmegaConf.create({"opt": {"lr": 0.2}})
    OmegaConf.set_readonly(block, True)
    cfg = merge_structured(Schema, block, "s")
    assert isinstance(cfg, DictConfig) and cfg.opt.lr == 0.2 and OmegaConf.is_readonly(cfg)


@dataclass
class Lists:
    ignore: list = field(default_factory=list)
    ratios: dict = field(default_factory=dict)
    opt: Opt = field(default_factory=Opt)


@pytest.mark.parametrize("values, message", [
    # OmegaConf raises a TypeError with no key for these ("Cannot merge incompatible container types"): a
    # traceback before
    ({"ignore": {"fc": 1}}, "s.ignore: expected a list (YAML items like [a, b]), got a mapping"),
    ({"ratios": ["fc"]}, "s.ratios: expected a mapping (like {key: value}), got a list"),
    ({"ignore": ["fc"], "opt": {"lr": 0.5, "betas": {"b1": 0.9}}},
     "s.opt.betas: expected a list (YAML items like [a, b]), got a mapping"),
])
def test_a_list_given_a_mapping_or_a_mapping_given_a_list_is_one_line(values, message):
    with pytest.raises(UserError) as e:
        merge_structured(Lists, values, "s")
    assert str(e.value) == message


def test_stage_lists_of_the_wrong_shape_name_the_stage_key():
    assert error_of(minimal(stages=[{"type": "prune.unstructured", "sparsity": 0.5, "ignore": {"fc": 1}}])) == \
        "stages[0].ignore: expected a list (YAML items like [a, b]), got a mapping"
    assert error_of(minimal(stages=[{"type": "prune.structured", "ratio": 0.5, "layer_ratios": ["fc"]}])) == \
        "stages[0].layer_ratios: expected a mapping (like {key: value}), got a list"


def test_a_recipe_made_from_a_config_holds_its_values_not_interpolations():
    from compress.recipe import Recipe

    recipe = Recipe(OmegaConf.create({"name": "z", "out_dir": "runs/${name}", "stages": []}))
    # read without resolving: the stored value itself is the resolved one
    assert OmegaConf.to_container(recipe.cfg) == {"name": "z", "out_dir": "runs/z", "stages": []}


def test_stage_blocks_that_interpolate_the_recipe_are_resolved_against_it():
    recipe = OmegaConf.create({"epochs": 3, "stages": [{"type": "train", "epochs": "${epochs}"}]})
    (stage,) = build_stages(recipe.stages)
    assert stage.config.epochs == 3


def test_a_whole_section_given_an_interpolation_is_named_in_its_error():
    # OmegaConf names no key when a section's node itself cannot take the resolved value
    assert error_of({"model": "${seed}", "data": {"name": "digits"}}) == \
        "model: interpolation does not resolve: Cannot assign int to Dict[str, Any]"
    assert error_of(minimal(data="${seed}")) == "data: interpolation does not resolve: Cannot assign int to Dict[str, Any]"
    # a section that resolves to another mapping is checked as that mapping: the trainer block has no model name
    assert error_of(minimal(model="${trainer}")) == \
        "model.name: required (a zoo name such as lenet300, or import:pkg.module:Class)"


def test_an_interpolation_inside_a_section_is_named_by_its_full_key():
    # OmegaConf's own key, not the section: the section is no interpolation itself
    assert error_of(minimal(data={"name": "digits", "batch_size": "${nope}"})) == \
        "data.batch_size: interpolation does not resolve: Interpolation key 'nope' not found"


def test_a_stage_with_enabled_false_is_checked_and_left_out(tmp_path):
    stages = [{"type": "train", "epochs": 1},
              {"type": "quantize", "mode": "ptq", "enabled": False},
              {"type": "prune.unstructured", "sparsity": 0.5, "enabled": True}]
    recipe = load_recipe({"stages": stages})
    assert [s.type_name for s in recipe.stages] == ["train", "prune.unstructured"]  # no order refusal
    assert [s["type"] for s in recipe.to_container()["stages"]] == ["train", "prune.unstructured"]
    assert "enabled" not in recipe.to_container()["stages"][1]
    with pytest.raises(UserError, match=r"^stages\[1\]\.mode: 'int4'"):  # left out, still checked
        load_recipe({"stages": [stages[0], {**stages[1], "mode": "int4"}]})
    with pytest.raises(UserError, match=r"^stages\[1\]\.enabled: 'no'; give true, or false"):
        load_recipe({"stages": [stages[0], {**stages[1], "enabled": "no"}]})
    twice = load_recipe({"stages": [{"type": "train", "enabled": False}, {"type": "train"}]})
    assert [s.name for s in twice.stages] == ["train"]  # a stage left out takes no name
