"""Experiment configuration: defaults, loading from Python files, `--set` overrides, validation.

A config is an `ml_collections.ConfigDict`. Experiment files (`experiments/NAME.py`) define
`get_config()`, which starts from `default_config()` and changes fields, as in the Flax examples.
Every key exists in `default_config()`, so a misspelt override is caught with a suggestion.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import math
import numbers
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import ml_collections

from cnn_jax.errors import ConfigError

EXPERIMENTS_DIR = Path(__file__).resolve().parent.parent / "experiments"

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "step")
BACKENDS = ("jit", "pmap")
FEEDERS = ("auto", "device", "streaming")
BEST_MODES = ("max", "min")


def default_config() -> ml_collections.ConfigDict:
    """Every configurable key with its default value."""
    c = ml_collections.ConfigDict()
    c.experiment = "default"
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.name = "lenet5"
    # Extra keyword arguments for the model constructor (e.g. dropout_rate, cifar_stem).
    c.model.options = ml_collections.ConfigDict()

    c.dataset = ml_collections.ConfigDict()
    c.dataset.name = "digits"
    c.dataset.data_dir = ""  # "" means TFDS_DATA_DIR or the tfds default
    c.dataset.train_split = ""  # "" means the dataset's own train split
    c.dataset.eval_split = ""  # "" means the dataset's own test split
    c.dataset.feeder = "auto"  # auto | device | streaming
    c.dataset.image_size = 0  # resize to this square size; 0 keeps the native size
    c.dataset.crop_padding = 0  # random crop after zero-padding by this many pixels (train only)
    c.dataset.flip = False  # random horizontal flip (train only)
    c.dataset.classes = []  # keep only these class indices, relabelled 0..k-1 (e.g. CIFAR-4)
    c.dataset.synthetic_shape = [28, 28, 1]  # image shape of the `synthetic` dataset
    c.dataset.synthetic_classes = 10
    c.dataset.synthetic_size = 1024  # examples per split of the `synthetic` dataset

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 128  # global batch over all devices and hosts
    c.train.eval_batch_size = 512
    c.train.num_epochs = 10
    c.train.num_steps = 0  # > 0 overrides num_epochs
    c.train.backend = "jit"  # jit | pmap
    c.train.half_precision = False  # compute in bfloat16, keep float32 parameters
    c.train.grad_accum_steps = 1
    c.train.label_smoothing = 0.0
    c.train.log_every_steps = 50
    c.train.eval_every_epochs = 1
    # Device-resident steps per call: 1 = one asynchronous dispatch per step, N > 1 = a compiled
    # lax loop of up to N steps, 0 = auto (per-step dispatch on CPU, where XLA's loops are slower;
    # one loop up to the next log/eval/checkpoint boundary on GPU/TPU). How steps are grouped never
    # changes the result; the two modes agree to float32 rounding.
    c.train.steps_per_call = 0

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "adam"  # sgd | adam | adamw
    c.optimizer.learning_rate = 1e-3
    c.optimizer.momentum = 0.9
    c.optimizer.nesterov = False
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.weight_decay = 0.0
    c.optimizer.schedule = "constant"  # constant | cosine | step
    c.optimizer.warmup_epochs = 0.0
    c.optimizer.step_boundaries = []  # fractions of training for the step schedule, e.g. [0.5, 0.75]
    c.optimizer.step_factor = 0.1
    c.optimizer.grad_clip_norm = 0.0  # 0 disables clipping

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 0  # 0: at the end of every epoch
    c.checkpoint.keep = 3
    c.checkpoint.best_metric = "accuracy"
    c.checkpoint.best_mode = "max"
    c.checkpoint.async_save = True
    # A damaged newest checkpoint: False resumes from the newest readable one (the damaged one is
    # moved aside and reported); True stops with an error instead.
    c.checkpoint.strict_resume = False
    return c


def load_config(name_or_path: str) -> ml_collections.ConfigDict:
    """Loads `experiments/<name>.py` or a config file path and returns its `get_config()`."""
    path = Path(name_or_path)
    if path.suffix != ".py" or not path.exists():
        candidate = EXPERIMENTS_DIR / f"{name_or_path}.py"
        if candidate.exists():
            path = candidate
        elif path.suffix == ".py":
            raise ConfigError(f"config file {name_or_path!r} does not exist")
        else:
            known = ", ".join(available_experiments()) or "(none)"
            raise ConfigError(
                f"unknown experiment {name_or_path!r}; expected one of: {known}, "
                "or a path to a config .py file"
            )
    spec = importlib.util.spec_from_file_location(f"cnn_jax_experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # a broken config file is a user error, not a crash
        raise ConfigError(f"could not load config file {str(path)!r}: {type(e).__name__}: {e}") from e
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {str(path)!r} defines no get_config() function")
    try:
        config = module.get_config()
    except Exception as e:  # e.g. ml_collections' TypeError for a value of the wrong type
        raise ConfigError(f"get_config() in {str(path)!r} failed: {type(e).__name__}: {e}") from e
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"get_config() in {str(path)!r} must return an ml_collections.ConfigDict")
    return config


def available_experiments() -> list[str]:
    """Names of the config files in `experiments/` (those defining `get_config`)."""
    if not EXPERIMENTS_DIR.is_dir():
        return []
    return sorted(
        p.stem
        for p in EXPERIMENTS_DIR.glob("*.py")
        if not p.stem.startswith("_") and "def get_config" in p.read_text()
    )


def _flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in config.items():
        key = f"{prefix}{k}"
        keys.append(key)
        if isinstance(v, ml_collections.ConfigDict) and k != "options":
            keys.extend(_flat_keys(v, key + "."))
    return keys


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word is a string


def _coerce(key: str, value: Any, current: Any) -> Any:
    """Converts an override to the type of the default it replaces."""
    if current is None:
        return value
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
    elif isinstance(current, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif isinstance(current, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(current, str):
        return value if isinstance(value, str) else str(value)
    elif isinstance(current, (list, tuple)):
        if isinstance(value, (list, tuple)):
            return list(value)
        if isinstance(value, (int, float)):
            return [value]
    else:
        return value
    raise ConfigError(
        f"--set {key}: value {value!r} has the wrong type; expected {type(current).__name__} "
        f"(the default is {current!r})"
    )


def apply_overrides(
    config: ml_collections.ConfigDict, overrides: Iterable[str]
) -> ml_collections.ConfigDict:
    """Applies `key=value` overrides with dotted keys (`optimizer.learning_rate=0.1`).

    Values are parsed as Python literals where possible and converted to the type of the default.
    Keys under `model.options` may be new (they are model constructor arguments); any other
    unknown key raises a `ConfigError` with the closest known keys.
    """
    config = ml_collections.ConfigDict(config.to_dict())
    known = _flat_keys(config)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.batch_size=64")
        key, text = item.split("=", 1)
        key = key.strip()
        value = _parse_value(text.strip())
        parts = key.split(".")
        if key.startswith("model.options.") and len(parts) == 3:
            config.model.options[parts[2]] = value
            continue
        if key in known and isinstance(_get(config, parts), ml_collections.ConfigDict):
            subkeys = [f"{key}.{k}" for k, _ in _get(config, parts).items()][:3] or [f"{key}.NAME"]
            raise ConfigError(
                f"--set {item!r}: {key!r} is a section of the config, not a value; set its "
                f"keys one by one, e.g. {', '.join(repr(k + '=...') for k in subkeys)}"
            )
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise ConfigError(f"--set: unknown config key {key!r}{hint}")
        parent = _get(config, parts[:-1])
        parent[parts[-1]] = _coerce(key, value, parent[parts[-1]])
    return config


def _get(config: ml_collections.ConfigDict, parts: list[str]) -> Any:
    node = config
    for p in parts:
        node = node[p]
    return node


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"config key {key!r} has invalid value {value!r}; expected {expected}")


def _finite_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _type_problem(value: Any, default: Any) -> str | None:
    """What is wrong with the type of `value` given the type of its default, or None."""
    if isinstance(default, ml_collections.ConfigDict):
        ok, expected = isinstance(value, ml_collections.ConfigDict), "a section (ConfigDict)"
    elif isinstance(default, bool):
        ok, expected = isinstance(value, bool), "a bool"
    elif isinstance(default, int):
        ok, expected = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(default, float):
        ok, expected = _finite_number(value), "a finite number"
    elif isinstance(default, str):
        ok, expected = isinstance(value, str), "a string"
    elif isinstance(default, (list, tuple)):  # every list key holds numbers
        ok = isinstance(value, (list, tuple)) and all(_finite_number(v) for v in value)
        expected = "a list of finite numbers"
    else:
        return None
    return None if ok else expected


def validate_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Rejects invalid values with a message naming the key, before anything is compiled.

    Every key of `default_config()` must be present with the type of its default (a float key
    takes any finite number); `model.options` may hold any keys (the model checks them).
    """
    defaults = default_config()
    known = set(_flat_keys(defaults))
    for key in _flat_keys(config):
        if key not in known and not key.startswith("model.options."):
            close = difflib.get_close_matches(key, sorted(known), n=3)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise ConfigError(f"unknown config key {key!r}{hint}")
    for key in _flat_keys(defaults):  # every key present, with the type of its default
        parts = key.split(".")
        try:
            value = _get(config, parts)
        except (KeyError, AttributeError, TypeError):
            raise ConfigError(
                f"config key {key!r} is missing; start the config from "
                "cnn_jax.config.default_config(), which has every key"
            ) from None
        expected = _type_problem(value, _get(defaults, parts))
        if expected:
            raise ConfigError(
                f"config key {key!r} has invalid value {value!r}; expected {expected}"
            )
    t, o, d, ck = config.train, config.optimizer, config.dataset, config.checkpoint
    _check(isinstance(t.batch_size, int) and t.batch_size > 0, "train.batch_size", t.batch_size, "an integer > 0")
    _check(t.eval_batch_size > 0, "train.eval_batch_size", t.eval_batch_size, "an integer > 0")
    _check(t.num_epochs > 0 or t.num_steps > 0, "train.num_epochs", t.num_epochs, "> 0 (or train.num_steps > 0)")
    _check(t.num_steps >= 0, "train.num_steps", t.num_steps, ">= 0")
    _check(t.backend in BACKENDS, "train.backend", t.backend, f"one of {BACKENDS}")
    _check(t.grad_accum_steps >= 1, "train.grad_accum_steps", t.grad_accum_steps, "an integer >= 1")
    _check(
        t.batch_size % t.grad_accum_steps == 0,
        "train.grad_accum_steps",
        t.grad_accum_steps,
        f"a divisor of train.batch_size={t.batch_size}",
    )
    _check(0.0 <= t.label_smoothing < 1.0, "train.label_smoothing", t.label_smoothing, "a value in [0, 1)")
    _check(t.log_every_steps > 0, "train.log_every_steps", t.log_every_steps, "an integer > 0")
    _check(t.eval_every_epochs > 0, "train.eval_every_epochs", t.eval_every_epochs, "an integer > 0")
    _check(t.steps_per_call >= 0, "train.steps_per_call", t.steps_per_call, ">= 0")
    _check(o.name in OPTIMIZERS, "optimizer.name", o.name, f"one of {OPTIMIZERS}")
    _check(o.learning_rate > 0, "optimizer.learning_rate", o.learning_rate, "a number > 0")
    _check(0.0 <= o.momentum < 1.0, "optimizer.momentum", o.momentum, "a value in [0, 1)")
    _check(o.weight_decay >= 0, "optimizer.weight_decay", o.weight_decay, "a number >= 0")
    _check(o.schedule in SCHEDULES, "optimizer.schedule", o.schedule, f"one of {SCHEDULES}")
    _check(o.warmup_epochs >= 0, "optimizer.warmup_epochs", o.warmup_epochs, "a number >= 0")
    _check(
        all(0 < b < 1 for b in o.step_boundaries),
        "optimizer.step_boundaries",
        list(o.step_boundaries),
        "fractions of training strictly between 0 and 1",
    )
    _check(o.grad_clip_norm >= 0, "optimizer.grad_clip_norm", o.grad_clip_norm, "a number >= 0 (0 disables)")
    _check(d.feeder in FEEDERS, "dataset.feeder", d.feeder, f"one of {FEEDERS}")
    _check(d.image_size >= 0, "dataset.image_size", d.image_size, "an integer >= 0 (0 keeps the native size)")
    _check(d.crop_padding >= 0, "dataset.crop_padding", d.crop_padding, "an integer >= 0")
    _check(ck.every_steps >= 0, "checkpoint.every_steps", ck.every_steps, "an integer >= 0")
    _check(ck.keep >= 1, "checkpoint.keep", ck.keep, "an integer >= 1")
    _check(ck.best_mode in BEST_MODES, "checkpoint.best_mode", ck.best_mode, f"one of {BEST_MODES}")
    return config


def config_to_json(config: ml_collections.ConfigDict) -> str:
    """The config as indented JSON, for the workdir and the CLI's printout."""
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def config_from_json(text: str) -> ml_collections.ConfigDict:
    """Inverse of `config_to_json`, filling keys added since with their defaults."""
    config = default_config()
    config.update(ml_collections.ConfigDict(json.loads(text)))
    return config
