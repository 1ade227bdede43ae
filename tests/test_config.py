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


# --------------------------------------------------------------------------- each method owns its config

def _readme_defaults() -> dict[str, dict[str, str]]:
    """README's "defaults from the paper" table: {method: {field: value as written}}."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = text.split("| method | defaults from the paper | paper |", 1)[1].split("\n\n", 1)[0]
    rows = {}
    for line in table.strip().splitlines()[1:]:  # after the |---| line
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        name = cells[0].strip("`")
        rows[name] = dict(re.findall(r"`(\w+)` = (\[[^\]]*\]|[^,]+)", cells[1]))
    return rows


def _as_written(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)


def test_every_method_default_equals_the_paper_value_readme_cites():
    from fewshot.methods import METHODS

    cited = _readme_defaults()
    shipped = {name for name, cls in METHODS.items() if cls.__module__.startswith("fewshot.")}  # not a bench's own (attribute-heads)
    assert set(cited) == shipped, "README's defaults table must list every method fewshot ships"
    for name, fields in cited.items():
        defaults = METHODS[name].config_class()
        for field, written in fields.items():
            assert _as_written(getattr(defaults, field)) == written.strip(), f"{name}.{field}"


def test_a_method_does_not_inherit_another_methods_temperature():
    # The old single MethodConfig gave MoCo and SupCon SimCLR's τ = 0.5 when a recipe set none.
    assert load_config(overrides=["method=moco"]).method.temperature == 0.2
    assert load_config(overrides=["method=supcon"]).method.temperature == 0.1
    assert load_config(overrides=["method=time-contrastive"]).method.temperature == 1.0


def test_a_key_another_method_owns_is_refused_with_what_the_method_takes():
    with pytest.raises(ConfigError, match=r"unknown config key 'method.margin'; method 'moco' takes: .*queue_size"):
        load_config(overrides=["method=moco", "method.margin=0.3"])
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        load_config(overrides=["method=nope"])


def test_stored_configs_keep_their_method_fields_and_drop_other_methods_ones():
    from fewshot.config import config_from_dict

    cfg = load_config(overrides=["method=moco", "method.queue_size=96"])
    stored = cfg.model_dump(mode="json")
    assert stored["method"]["queue_size"] == 96  # the subclass's fields are serialised, not only `name`
    stored["method"]["margin"] = 1.0  # as a run written before each method owned its config
    assert config_from_dict(stored) == cfg
