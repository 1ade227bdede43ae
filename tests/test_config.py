import pytest

from fewshot.config import find_recipe, load_config, parse_override
from fewshot.errors import ConfigError


def test_defaults_validate():
    cfg = load_config()
    assert cfg.method.name == "simclr" and cfg.train.steps >= 1


def test_overrides_are_typed_and_nested():
    cfg = load_config(overrides=["train.steps=7", "eval.shots=[1,2]", "train.max_minutes=null", "method=triplet"])
    assert cfg.train.steps == 7 and cfg.eval.shots == [1, 2] and cfg.train.max_minutes is None
    assert cfg.method.name == "triplet"  # a section alone sets its name


def test_recipe_then_overrides(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  steps: 5\n  lr: 0.1\n")
    cfg = load_config(recipe, ["train.steps=9"])
    assert cfg.train.steps == 9 and cfg.train.lr == 0.1


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.stpes=3", "unknown config key 'train.stpes'"),
        ("train.steps=many", "train.steps"),
        ("train.steps=0", "train.steps"),
        ("data.source=imagenet", "data.source"),
        ("nokey", "not key=value"),
    ],
)
def test_bad_overrides_are_one_line_errors(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_parse_override_reads_yaml_values():
    assert parse_override("a.b=1e-3") == ("a.b", 1e-3)
    assert parse_override("a=[5, 20]") == ("a", [5, 20])


def test_every_shipped_recipe_validates():
    for name in ["quickstart", "simclr-digits", "simclr-omniglot", "triplet-digits", "npair-digits", "supcon-digits", "moco-omniglot", "byol-omniglot"]:
        load_config(find_recipe(name))


def test_unknown_recipe_lists_known():
    with pytest.raises(ConfigError, match="quickstart"):
        find_recipe("nope")
