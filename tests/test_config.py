"""The config: a locked, type-safe ml_collections.ConfigDict; `--set` overrides, experiment files,
validation, JSON round trips and where named experiments are found.

Library calls only (no training, no JAX): the CLI's exit status for these errors is covered by
tests/test_bad_input.py.
"""

from __future__ import annotations

import importlib.util
import json
import textwrap
from pathlib import Path

import ml_collections
import pytest

from cnn_jax import config as config_lib
from cnn_jax.config import (
    apply_overrides,
    available_experiments,
    config_from_json,
    config_to_json,
    default_config,
    experiments_dir,
    load_config,
    validate_config,
)
from cnn_jax.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def error_of(fn, *args) -> str:
    with pytest.raises(ConfigError) as e:
        fn(*args)
    return str(e.value)


# ----------------------------------------------------------------------------------------------
# default_config: locked and type-safe, model.options free-form
# ----------------------------------------------------------------------------------------------


def test_default_config_is_locked_and_type_safe():
    c = default_config()
    assert c.is_locked and c.train.is_locked and c.is_type_safe
    assert not c.model.options.is_locked
    with pytest.raises(AttributeError, match="batchsize"):
        c.train.batchsize = 32
    with pytest.raises(KeyError):
        c["nonexistent"] = 1
    with pytest.raises(TypeError):
        c.train.batch_size = "64"
    with pytest.raises(TypeError):
        c.train.num_epochs = 1.5
    c.optimizer.learning_rate = 1  # int -> float is allowed
    assert c.optimizer.learning_rate == 1.0 and isinstance(c.optimizer.learning_rate, float)
    c.model.options.anything = (8, 16)  # free-form model constructor arguments, of any type
    c.model.options.anything = "wide"
    assert c.model.options.anything == "wide"
    assert validate_config(default_config()).to_dict() == default_config().to_dict()


def test_default_configs_are_independent():
    a, b = default_config(), default_config()
    a.train.batch_size = 7
    a.dataset.classes.append(3)
    a.model.options.x = 1
    assert b.train.batch_size == 128 and b.dataset.classes == [] and "x" not in b.model.options


def test_fast_paths_key():
    c = default_config()
    assert c.model.fast_paths == "auto"
    for value in ("auto", "on", "off"):
        checked = validate_config(apply_overrides(c, [f"model.fast_paths={value}"]))
        assert checked.model.fast_paths == value
    message = error_of(validate_config, apply_overrides(c, ["model.fast_paths=yes"]))
    assert message == (
        "config key 'model.fast_paths' has invalid value 'yes'; "
        "expected one of ('auto', 'on', 'off')"
    )


# ----------------------------------------------------------------------------------------------
# --set overrides
# ----------------------------------------------------------------------------------------------

OVERRIDE_ERRORS = [
    ("optimizer.learnig_rate=0.1",
     "--set: unknown config key 'optimizer.learnig_rate'; did you mean 'optimizer.learning_rate'"),
    ("trian.batch_size=8", "did you mean 'train.batch_size'"),
    ("zzzz=1", "--set: unknown config key 'zzzz'"),
    ("model.options.a.b=1", "unknown config key 'model.options.a.b'"),
    ("train=3", ("--set 'train=3': 'train' is a section of the config, not a value; set its "
                 "keys one by one, e.g. 'train.backend=...'")),
    ("model.options={}", "'model.options' is a section of the config, not a value"),
    ("train.batch_size", "expected key=value"),
    ("train.batch_size=abc",
     "--set train.batch_size: value 'abc' has the wrong type; expected int"),
    ("train.num_epochs=1.5", "value 1.5 has the wrong type; expected int"),
    ("train.batch_size=True", "value True has the wrong type; expected int"),
    ("optimizer.learning_rate=fast", "value 'fast' has the wrong type; expected float"),
    ("optimizer.learning_rate=True", "value True has the wrong type; expected float"),
    ("dataset.flip=maybe", "value 'maybe' has the wrong type; expected bool"),
    ("dataset.flip=2", "value 2 has the wrong type; expected bool"),
    ("optimizer.step_boundaries=half", "value 'half' has the wrong type; expected list"),
]  # fmt: skip


@pytest.mark.parametrize("item, fragment", OVERRIDE_ERRORS, ids=[i for i, _ in OVERRIDE_ERRORS])
def test_override_errors(item, fragment):
    assert fragment in error_of(apply_overrides, default_config(), [item])


OVERRIDES = [
    ("dataset.flip=true", "dataset.flip", True),
    ("dataset.flip=No", "dataset.flip", False),
    ("dataset.flip=1", "dataset.flip", True),
    ("train.num_steps=1e3", "train.num_steps", 1000),
    ("optimizer.learning_rate=1", "optimizer.learning_rate", 1.0),
    ("optimizer.learning_rate=3e-4", "optimizer.learning_rate", 3e-4),
    ("optimizer.step_boundaries=0.5", "optimizer.step_boundaries", [0.5]),
    ("optimizer.step_boundaries=[0.5, 0.75]", "optimizer.step_boundaries", [0.5, 0.75]),
    ("dataset.classes=(2, 3)", "dataset.classes", [2, 3]),
    ("experiment=1e3", "experiment", "1e3"),  # a string key takes the text as written
    ("dataset.data_dir='/tmp/x y'", "dataset.data_dir", "/tmp/x y"),
    ("model.options.hidden_features=(8,)", "model.options.hidden_features", (8,)),
]


@pytest.mark.parametrize("item, key, expected", OVERRIDES, ids=[i for i, _, _ in OVERRIDES])
def test_overrides(item, key, expected):
    value = apply_overrides(default_config(), [item])[key]
    assert value == expected and type(value) is type(expected)


def test_overrides_return_a_locked_copy():
    base = load_config("lenet5_digits")
    before = base.to_dict()
    changed = apply_overrides(base, ["train.batch_size=8", "model.options.activation=tanh"])
    assert base.to_dict() == before  # the input is untouched
    assert changed.train.batch_size == 8 and changed.model.options.activation == "tanh"
    assert changed.is_locked and not changed.model.options.is_locked
    # options are free-form: a new key, and a new type for an existing one (the model checks)
    changed = apply_overrides(base, ["model.options.activation=3", "model.options.new=[1]"])
    assert changed.model.options.activation == 3 and changed.model.options.new == [1]
    # an unlocked config (e.g. made from a dict) is locked for the overrides too
    unlocked = ml_collections.ConfigDict(default_config().to_dict())
    assert "train.batchsize" in error_of(apply_overrides, unlocked, ["train.batchsize=1"])


def test_learning_rate_must_be_finite():
    config = apply_overrides(default_config(), ["optimizer.learning_rate=1e999"])
    assert error_of(validate_config, config) == (
        "config key 'optimizer.learning_rate' has invalid value inf; expected a finite number"
    )


# ----------------------------------------------------------------------------------------------
# Experiment files: a misspelt key or a wrong type fails at load, naming key and line
# ----------------------------------------------------------------------------------------------


def write_config(folder: Path, name: str, body: str) -> Path:
    path = folder / name
    head = "from cnn_jax.config import default_config\n\n\ndef get_config():\n"
    path.write_text(head + textwrap.indent(textwrap.dedent(body).strip() + "\n", "    "))
    return path


FILE_ERRORS = [
    ("typo.py", "c = default_config()\nc.train.batchsize = 32\nreturn c",
     "line 6: unknown config key 'train.batchsize'; did you mean 'train.batch_size'"),
    ("root.py", "c = default_config()\nc.experimnt = 'x'\nreturn c",
     "line 6: unknown config key 'experimnt'; did you mean 'experiment'"),
    ("item.py", "c = default_config()\nc.optimizer['learnig_rate'] = 0.1\nreturn c",
     "unknown config key 'optimizer.learnig_rate'; did you mean 'optimizer.learning_rate'"),
    ("no_name.py", "default_config().dataset.imagesize = 3",
     "line 5: unknown config key 'dataset.imagesize'; did you mean 'dataset.image_size'"),
    ("read.py", "c = default_config()\nc.model.options.size = c.dataset.imagesize\nreturn c",
     "unknown config key 'dataset.imagesize'"),
    ("model_key.py", "c = default_config()\nc.model.fastpaths = 'off'\nreturn c",
     "unknown config key 'model.fastpaths'; did you mean 'model.fast_paths'"),
    ("wrong_type.py", "c = default_config()\nc.train.batch_size = '64'\nreturn c",
     "line 6: config key 'train.batch_size' has invalid value '64'; expected an integer"),
    ("fraction.py", "c = default_config()\nc.train.num_epochs = 1.5\nreturn c",
     "config key 'train.num_epochs' has invalid value 1.5; expected an integer"),
    ("section.py", "c = default_config()\nc.train = 5\nreturn c",
     "'train' is a section of the config, not a value"),
    ("raises.py", "raise RuntimeError('no GPU quota')",
     "get_config() in {path}, line 5 failed: RuntimeError: no GPU quota"),
]  # fmt: skip


@pytest.mark.parametrize("name, body, fragment", FILE_ERRORS, ids=[c[0] for c in FILE_ERRORS])
def test_experiment_file_errors(tmp_path, name, body, fragment):
    path = write_config(tmp_path, name, body)
    message = error_of(load_config, str(path))
    assert fragment.format(path=repr(str(path))) in message
    if "config key" in fragment:
        assert message.startswith(f"config file {str(path)!r}, line ")


def test_other_file_errors(tmp_path):
    (tmp_path / "syntax.py").write_text("def get_config(:\n")
    message = error_of(load_config, str(tmp_path / "syntax.py"))
    assert message.startswith("could not load config file")
    (tmp_path / "none.py").write_text("x = 1\n")
    assert "defines no get_config()" in error_of(load_config, str(tmp_path / "none.py"))
    assert "does not exist" in error_of(load_config, str(tmp_path / "missing.py"))
    message = error_of(load_config, "lenet5_digitz")
    assert message.startswith("unknown experiment 'lenet5_digitz'; expected one of: ")
    assert "lenet5_digits" in message


# ----------------------------------------------------------------------------------------------
# validate_config: any ConfigDict; unknown keys and types by ml_collections, then ranges
# ----------------------------------------------------------------------------------------------


def unlocked_with(change) -> ml_collections.ConfigDict:
    """A config as user code may build it: unlocked (from a dict), then changed."""
    c = ml_collections.ConfigDict(default_config().to_dict())
    change(c)
    return c


VALIDATE_ERRORS = [
    ("unknown", lambda c: c.train.__setattr__("batchsize", 3),
     "unknown config key 'train.batchsize'; did you mean 'train.batch_size'"),
    ("unknown-section", lambda c: c.__setattr__("trian", {"batch_size": 3}),
     "unknown config key 'trian'"),
    ("none", lambda c: c.train.__setattr__("eval_batch_size", None),
     "config key 'train.eval_batch_size' has invalid value None; expected an integer"),
    ("inf", lambda c: c.optimizer.__setattr__("weight_decay", float("inf")),
     "config key 'optimizer.weight_decay' has invalid value inf; expected a finite number"),
    ("nan", lambda c: c.optimizer.__setattr__("learning_rate", float("nan")),
     "'optimizer.learning_rate' has invalid value nan; expected a finite number"),
    ("bad-list", lambda c: c.optimizer.__setattr__("step_boundaries", ["half"]),
     "'optimizer.step_boundaries' has invalid value ['half']; expected a list of finite numbers"),
    ("missing", lambda c: c.checkpoint.__delattr__("keep"),
     "config key 'checkpoint.keep' is missing; start the config from"),
    ("range", lambda c: c.train.__setattr__("batch_size", 0),
     "'train.batch_size' has invalid value 0; expected an integer > 0"),
    ("cross-key", lambda c: c.train.__setattr__("grad_accum_steps", 3),
     "expected a divisor of train.batch_size=128"),
]  # fmt: skip


@pytest.mark.parametrize(
    "case, change, fragment", VALIDATE_ERRORS, ids=[c[0] for c in VALIDATE_ERRORS]
)
def test_validate_errors(case, change, fragment):
    assert fragment in error_of(validate_config, unlocked_with(change))


def test_validate_wrong_type_in_an_unlocked_config():
    c = ml_collections.ConfigDict(default_config().to_dict(), type_safe=False)
    c.train.batch_size = "64"
    c2 = ml_collections.ConfigDict(default_config().to_dict(), type_safe=False)
    c2.dataset.flip = 1
    assert error_of(validate_config, c) == (
        "config key 'train.batch_size' has invalid value '64'; expected an integer"
    )
    assert "'dataset.flip' has invalid value 1; expected a bool" in error_of(validate_config, c2)
    partial = ml_collections.ConfigDict({"model": {"name": "lenet5"}})
    assert "is missing; start the config from" in error_of(validate_config, partial)


def test_validate_returns_a_locked_normalised_copy():
    c = unlocked_with(lambda c: c.dataset.__setattr__("classes", (1, 2)))
    checked = validate_config(c)
    assert checked is not c and checked.is_locked and not checked.model.options.is_locked
    assert checked.dataset.classes == [1, 2]
    assert validate_config(checked).to_dict() == checked.to_dict()


def test_every_named_experiment_loads_validated_and_locked():
    names = available_experiments()
    assert "lenet5_digits" in names
    for name in names:
        config = validate_config(load_config(name))
        assert config.experiment == name and config.is_locked


# ----------------------------------------------------------------------------------------------
# JSON
# ----------------------------------------------------------------------------------------------


def test_json_round_trip_and_new_keys_filled():
    config = apply_overrides(load_config("lenet5_digits"), ["model.fast_paths=off"])
    back = config_from_json(config_to_json(config))
    assert back.to_dict() == config.to_dict() and back.is_locked
    old = json.loads(config_to_json(config))
    del old["model"]["fast_paths"], old["checkpoint"]["strict_resume"]  # keys added since
    restored = config_from_json(json.dumps(old))
    assert restored.model.fast_paths == "auto" and restored.checkpoint.strict_resume is False
    assert restored.model.options.to_dict() == config.model.options.to_dict()
    assert restored.train.batch_size == config.train.batch_size


@pytest.mark.parametrize(
    "text, fragment",
    [
        ('{"train": {"batchsize": 3}}',
         "saved config: unknown config key 'train.batchsize'; did you mean 'train.batch_size'"),
        ('{"zzz": 1}', "saved config: unknown config key 'zzz'"),
        ('{"train": {"batch_size": "x"}}',
         "saved config: config key 'train.batch_size' has invalid value 'x'; expected an integer"),
        ('{"train": 3}', "'train' is a section of the config, not a value"),
        ("[1]", "expected a JSON object"),
        ("{", "not valid JSON"),
    ],
)  # fmt: skip
def test_json_errors(text, fragment):
    assert fragment in error_of(config_from_json, text)


def test_json_error_names_its_source():
    message = error_of(lambda: config_from_json('{"zzz": 1}', source="run/config.json"))
    assert message.startswith("run/config.json: unknown config key 'zzz'")


# ----------------------------------------------------------------------------------------------
# Where named experiments come from
# ----------------------------------------------------------------------------------------------


def test_experiments_dir_is_the_checkout_folder_here():
    assert experiments_dir() == REPO / "experiments"
    spec = importlib.util.find_spec("cnn_jax.experiments")
    if spec is not None:  # an install that maps the package (pip install -e after this change)
        assert [Path(p) for p in spec.submodule_search_locations] == [REPO / "experiments"]


def test_experiments_come_from_the_package(tmp_path, monkeypatch):
    """experiments_dir follows importlib's spec of cnn_jax.experiments."""
    folder = tmp_path / "shipped"
    folder.mkdir()
    (folder / "__init__.py").write_text('"""Experiments."""\n')
    write_config(folder, "tiny.py", "c = default_config()\nc.experiment = 'tiny'\nreturn c")
    real = importlib.util.find_spec

    def find_spec(name, package=None):
        if name == config_lib.EXPERIMENTS_PACKAGE:
            return importlib.util.spec_from_file_location(
                name, folder / "__init__.py", submodule_search_locations=[str(folder)]
            )
        return real(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    assert experiments_dir() == folder
    assert available_experiments() == ["tiny"]
    assert load_config("tiny").experiment == "tiny"
