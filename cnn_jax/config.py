"""Experiment configuration: defaults, loading from Python files, `--set` overrides, validation.

A config is a locked, type-safe `ml_collections.ConfigDict` (`default_config()`): ml_collections
itself refuses a key that does not exist and a value of the wrong type (a string for an integer
key, 1.5 for an integer key) the moment it is assigned, in an experiment file as on the command
line; this module turns those refusals into `ConfigError`s naming the dotted key, with the
closest known keys. `model.options` alone is unlocked: free-form keyword arguments of the model
constructor, checked by `cnn_jax.models.get_model`. `validate_config` adds what types cannot
say: ranges, choices, finiteness and rules between keys.

Named experiments (`experiments/NAME.py` in the source tree, shipped in the wheel as the package
`cnn_jax.experiments`) define `get_config()`, which starts from `default_config()` and changes
fields, as in the Flax examples.
"""

from __future__ import annotations

import ast
import copy
import difflib
import importlib.util
import json
import math
import numbers
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import ml_collections

from cnn_jax.errors import ConfigError

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "step")
BACKENDS = ("jit", "pmap")
FEEDERS = ("auto", "device", "streaming")
BEST_MODES = ("max", "min")
BEST_METRICS = ("accuracy", "top5_accuracy", "loss")  # what an evaluation reports
FAST_PATHS = ("auto", "on", "off")
PRETRAINED_FORMATS = ("auto", "torchvision", "keras", "cnn_jax")
EXPERIMENTS_PACKAGE = "cnn_jax.experiments"

ConfigDict = ml_collections.ConfigDict


def default_config() -> ml_collections.ConfigDict:
    """Every configurable key with its default value, locked (no new keys) and type-safe.

    `model.options` is left unlocked: it takes any model constructor argument.
    """
    c = ConfigDict()
    c.experiment = "default"
    c.seed = 0

    c.model = ConfigDict()
    c.model.name = "lenet5"
    # Extra keyword arguments for the model constructor (e.g. dropout_rate, cifar_stem); free-form
    # (not locked, any type), checked by cnn_jax.models.get_model.
    c.model.options = ConfigDict(type_safe=False)
    # Build the model with the CPU fast implementations of cnn_jax.fast_paths (planar/im2col
    # convolutions, reshape max pooling, Eigen instead of YNNPACK): "on" | "off" | "auto" (on
    # when training on CPU devices; GPUs and TPUs keep XLA's own paths). The results agree to
    # float32 rounding.
    c.model.fast_paths = "auto"
    # Start a new run from a weights file (a resumed run ignores it): torchvision's .safetensors
    # / .pth of a twin, Keras' VGG .h5, or a `cnn-jax export` .npz. The head (the layers whose
    # shape depends on num_classes) is re-initialised for the dataset's classes.
    c.model.pretrained = ""
    c.model.pretrained_format = "auto"  # auto (by file name) | torchvision | keras | cnn_jax

    c.dataset = ConfigDict()
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

    c.train = ConfigDict()
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
    # Steps per compiled call: 1 = one asynchronous dispatch per step, N > 1 = groups of N steps in
    # one compiled lax loop, 0 = auto (1 on CPU, where XLA's loops are slower; 16 on GPU/TPU). How
    # steps are grouped never changes the result; the two modes agree to float32 rounding.
    c.train.steps_per_call = 0

    c.optimizer = ConfigDict()
    c.optimizer.name = "adam"  # sgd | adam | adamw
    c.optimizer.learning_rate = 1e-3
    c.optimizer.momentum = 0.9
    c.optimizer.nesterov = False
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.999
    c.optimizer.weight_decay = 0.0
    c.optimizer.schedule = "constant"  # constant | cosine | step
    c.optimizer.warmup_epochs = 0.0
    # fractions of training for the step schedule, e.g. [0.5, 0.75]
    c.optimizer.step_boundaries = []
    c.optimizer.step_factor = 0.1
    c.optimizer.grad_clip_norm = 0.0  # 0 disables clipping
    # Fine-tuning: train only the head (every other parameter stays as loaded, BatchNorm uses its
    # running averages), or scale the backbone's learning rate by this factor (1: no change).
    c.optimizer.freeze_backbone = False
    c.optimizer.backbone_lr_scale = 1.0

    c.checkpoint = ConfigDict()
    c.checkpoint.every_steps = 0  # 0: at the end of every epoch
    c.checkpoint.keep = 3
    c.checkpoint.best_metric = "accuracy"
    c.checkpoint.best_mode = "max"
    c.checkpoint.async_save = True
    # A damaged newest checkpoint: False resumes from the newest readable one (the damaged one is
    # moved aside and reported); True stops with an error instead.
    c.checkpoint.strict_resume = False

    c.lock()
    c.model.options.unlock()
    return c


# ----------------------------------------------------------------------------------------------
# Named experiments
# ----------------------------------------------------------------------------------------------


def experiments_dir() -> Path:
    """The folder of the named experiments: the package `cnn_jax.experiments`.

    In the wheel it is `site-packages/cnn_jax/experiments`; an editable install maps it to the
    source tree's top-level `experiments/` folder. A source checkout used without installing
    (only the repository root on sys.path) falls back to that folder next to `cnn_jax/`.
    """
    try:
        spec = importlib.util.find_spec(EXPERIMENTS_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(__file__).resolve().parent.parent / "experiments"


def available_experiments() -> list[str]:
    """Names of the config experiments (the files of `experiments_dir()` defining `get_config`)."""
    folder = experiments_dir()
    if not folder.is_dir():
        return []
    return sorted(
        p.stem
        for p in folder.glob("*.py")
        if not p.stem.startswith("_") and "def get_config" in p.read_text()
    )


def load_config(name_or_path: str) -> ml_collections.ConfigDict:
    """Loads the named experiment or a config file path and returns its `get_config()`.

    A key the config does not have (`c.train.batchsize = 32`) or a value of the wrong type
    (`c.train.batch_size = '64'`) in the file raises a `ConfigError` naming the dotted key and
    the line.
    """
    path = Path(name_or_path)
    if path.suffix != ".py" or not path.exists():
        candidate = experiments_dir() / f"{name_or_path}.py"
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
    except SystemExit as e:
        raise ConfigError(
            f"config file {str(path)!r} called sys.exit({e.code!r}) while loading; a config "
            "file must define get_config(), not end the program"
        ) from None
    except Exception as e:  # a broken config file is a user error, not a crash
        raise _file_error(e, path, spec.origin, "could not load config file {where}") from e
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {str(path)!r} defines no get_config() function")
    try:
        config = module.get_config()
    except SystemExit as e:  # would end the command silently, with the file's exit status
        raise ConfigError(
            f"get_config() in {str(path)!r} called sys.exit({e.code!r}); a config file must "
            "return a config, not end the program"
        ) from None
    except Exception as e:
        raise _file_error(e, path, spec.origin, "get_config() in {where} failed") from e
    if not isinstance(config, ConfigDict):
        raise ConfigError(f"get_config() in {str(path)!r} must return an ml_collections.ConfigDict")
    return config


def _file_error(e: Exception, path: Path, origin: str, failed: str) -> ConfigError:
    """A ConfigError for an exception raised by a config file (run from `origin`).
    ml_collections' refusals of an unknown key or a wrong type name the dotted key and the
    file's line."""
    line = _line_in(e.__traceback__, origin)
    where = repr(str(path)) + (f", line {line}" if line else "")
    problem = _config_dict_problem(e)
    if problem:
        return ConfigError(f"config file {where}: {problem}")
    return ConfigError(failed.format(where=where) + f": {type(e).__name__}: {e}")


def _line_in(tb: TracebackType | None, filename: str) -> int | None:
    """The line of the innermost traceback frame running `filename`."""
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == filename:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


_ACCESSORS = {"__setattr__", "__setitem__", "__getattr__", "__getitem__"}


def _config_dict_problem(e: BaseException) -> str | None:
    """What ml_collections refused, as 'unknown config key ...' or 'config key ... has invalid
    value ...', found from the ConfigDict method frame that raised `e`; None for other errors."""
    if not isinstance(e, (KeyError, AttributeError, TypeError)):
        return None
    node = key = None
    frames = []
    tb = e.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        frames.append(frame)
        names = frame.f_locals
        if frame.f_code.co_name in _ACCESSORS and isinstance(names.get("self"), ConfigDict):
            node, key = names["self"], names.get("key", names.get("attribute"))
            setting = frame.f_code.co_name.startswith("__set")
            value = names.get("value")
        tb = tb.tb_next
    if node is None or not isinstance(key, str):
        return None
    prefix = _path_of(node, frames)
    dotted = f"{prefix}{key}"
    if key not in node:
        return _unknown_key(dotted, _flat_keys(default_config()))
    if setting and isinstance(e, TypeError):
        return _invalid_value(dotted, value, node[key])
    return None


def _path_of(node: ConfigDict, frames: list) -> str:
    """The dotted prefix ('train.') of `node` in the config the failing code was building: found
    by identity from the ConfigDicts in the frames' variables, else by its keys among the
    sections of `default_config()`."""
    found = [
        _find(value, node, "")
        for frame in frames
        for value in list(frame.f_locals.values())
        if isinstance(value, ConfigDict) and value is not node
    ]
    found = [f for f in found if f]
    if found:
        return max(found, key=len)
    defaults = default_config()
    for section in _flat_keys(defaults):
        sub = _get(defaults, section.split("."))
        if isinstance(sub, ConfigDict) and set(sub.keys()) == set(node.keys()):
            return section + "."
    return ""


def _find(root: ConfigDict, node: ConfigDict, prefix: str) -> str | None:
    if root is node:
        return prefix
    for k, v in root.items():
        if isinstance(v, ConfigDict):
            found = _find(v, node, f"{prefix}{k}.")
            if found is not None:
                return found
    return None


# ----------------------------------------------------------------------------------------------
# Messages
# ----------------------------------------------------------------------------------------------

# What a key holds, by the type of its default ("expected ...").
_EXPECTED = {
    bool: "a bool",
    int: "an integer",
    float: "a finite number",
    str: "a string",
    list: "a list of finite numbers",  # every list key holds numbers
}


def _expected(default: Any) -> str:
    if isinstance(default, ConfigDict):
        return "a section (ConfigDict)"
    return _EXPECTED.get(type(default), type(default).__name__)


def _unknown_key(key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=3)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return f"unknown config key {key!r}{hint}"


def _section_message(key: str, section: ConfigDict) -> str:
    subkeys = [f"{key}.{k}" for k in list(section.keys())[:3]] or [f"{key}.NAME"]
    return (
        f"{key!r} is a section of the config, not a value; set its keys one by one, e.g. "
        + ", ".join(repr(k + "=...") for k in subkeys)
    )


def _invalid_value(key: str, value: Any, default: Any) -> str:
    if isinstance(default, ConfigDict):
        return _section_message(key, default)
    return f"config key {key!r} has invalid value {value!r}; expected {_expected(default)}"


def _flat_keys(config: ConfigDict, prefix: str = "") -> list[str]:
    """Dotted keys of every value and section (not the free-form keys under model.options)."""
    keys = []
    for k, v in config.items():
        key = f"{prefix}{k}"
        keys.append(key)
        if isinstance(v, ConfigDict) and key != "model.options":
            keys.extend(_flat_keys(v, key + "."))
    return keys


def _get(config: Any, parts: list[str]) -> Any:
    node = config
    for p in parts:
        node = node[p]
    return node


# ----------------------------------------------------------------------------------------------
# --set overrides
# ----------------------------------------------------------------------------------------------

_TRUE, _FALSE = ("true", "yes", "1"), ("false", "no", "0")


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text  # a bare word is a string


def _from_text(value: Any, text: str, current: Any) -> Any:
    """Reads command-line text for a key whose value is `current`: bool words (true/false,
    yes/no, 1/0), whole numbers such as 1e3 for integer keys, one number for a list key, and
    the text itself for string keys. Whether the result fits is ml_collections' business."""
    if isinstance(current, bool):
        word = str(value).lower()
        if not isinstance(value, float) and word in _TRUE + _FALSE:
            return word in _TRUE
    elif isinstance(current, int) and isinstance(value, float) and value.is_integer():
        return int(value)
    elif isinstance(current, str) and not isinstance(value, str):
        return text
    elif isinstance(current, list) and _finite_number(value):
        return [value]
    return value


def apply_overrides(
    config: ml_collections.ConfigDict, overrides: Iterable[str]
) -> ml_collections.ConfigDict:
    """Applies `key=value` overrides with dotted keys (`optimizer.learning_rate=0.1`) to a copy.

    Values are parsed as Python literals where possible (else taken as a string) and must fit
    the type of the value they replace (ml_collections' type safety). Keys under
    `model.options` may be new and of any type (they are model constructor arguments); any
    other unknown key raises a `ConfigError` with the closest known keys. Returns a locked copy.
    """
    config = copy.deepcopy(config).lock()
    options = _options_of(config)
    if options is not None:
        options.unlock()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. train.batch_size=64")
        key, text = item.split("=", 1)
        key, text = key.strip(), text.strip()
        value = _parse_value(text)
        parts = key.split(".")
        parent_key, leaf = ".".join(parts[:-1]), parts[-1]
        try:
            parent = _get(config, parts[:-1])
        except (KeyError, AttributeError, TypeError):
            parent = None
        if parent_key == "model.options" and parent is options and options is not None:
            with options.ignore_type():  # free-form: the model checks its options
                options[leaf] = value
            continue
        if not isinstance(parent, ConfigDict) or leaf not in parent:
            raise ConfigError(f"--set: {_unknown_key(key, _flat_keys(config))}")
        current = parent[leaf]
        if isinstance(current, ConfigDict):
            raise ConfigError(f"--set {item!r}: {_section_message(key, current)}")
        value = _from_text(value, text, current)
        try:
            if isinstance(value, bool) and not isinstance(current, bool) and current is not None:
                raise TypeError("a bool is not a number")  # ml_collections takes True for 1
            parent[leaf] = value
        except TypeError:
            raise ConfigError(
                f"--set {key}: value {value!r} has the wrong type; expected "
                f"{type(current).__name__} (the current value is {current!r})"
            ) from None
    return config


def _options_of(config: ConfigDict) -> ConfigDict | None:
    model = config.get("model") if isinstance(config, ConfigDict) else None
    options = model.get("options") if isinstance(model, ConfigDict) else None
    return options if isinstance(options, ConfigDict) else None


# ----------------------------------------------------------------------------------------------
# Validation and JSON
# ----------------------------------------------------------------------------------------------


def _copy_into(target: ConfigDict, source: Any, prefix: str = "") -> None:
    """Assigns every value of `source` (a ConfigDict or dict) to the locked `target` section by
    section, so ml_collections refuses unknown keys and values of the wrong type."""
    for key, value in source.items():
        dotted = f"{prefix}{key}"
        if isinstance(key, str) and key in target and isinstance(target[key], ConfigDict):
            if not isinstance(value, (ConfigDict, Mapping)):
                raise ConfigError(_section_message(dotted, target[key]))
            if dotted == "model.options":  # free-form, unlocked: a copy of what was given
                given = value.to_dict() if isinstance(value, ConfigDict) else dict(value)
                target[key] = ConfigDict(given, type_safe=False)
            else:
                _copy_into(target[key], value, dotted + ".")
            continue
        try:
            if isinstance(value, bool) and key in target and not isinstance(target[key], bool):
                raise TypeError("a bool is not a number")  # ml_collections takes True for 1
            target[key] = value
        except (KeyError, AttributeError, ValueError):  # locked: no such key (or a dotted name)
            raise ConfigError(_unknown_key(dotted, _flat_keys(default_config()))) from None
        except TypeError:
            raise ConfigError(_invalid_value(dotted, value, target[key])) from None


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigError(f"config key {key!r} has invalid value {value!r}; expected {expected}")


def _finite_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def validate_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks a config before anything is compiled; returns it as a new locked config.

    Its values are copied into `default_config()`, so ml_collections refuses unknown keys and
    values of the wrong type (any `ConfigDict` is accepted, locked or not); every key must be
    present (start from `default_config()`). Then what types cannot say: no None, finite
    numbers, ranges, choices and rules between keys. Raises a `ConfigError` naming the key.
    """
    checked = default_config()
    _copy_into(checked, config)
    for key in _flat_keys(checked):
        try:
            _get(config, key.split("."))
        except (KeyError, AttributeError, TypeError):
            raise ConfigError(
                f"config key {key!r} is missing; start the config from "
                "cnn_jax.config.default_config(), which has every key"
            ) from None
    defaults = default_config()
    for key in _flat_keys(defaults):  # what ml_collections' types let through
        default, value = _get(defaults, key.split(".")), _get(checked, key.split("."))
        if isinstance(default, float):
            ok = _finite_number(value)
        elif isinstance(default, list):
            ok = isinstance(value, list) and all(_finite_number(v) for v in value)
        else:
            ok = value is not None
        _check(ok, key, value, _expected(default))
    c, t, o, d, ck = checked, checked.train, checked.optimizer, checked.dataset, checked.checkpoint
    _check(-(2**63) <= c.seed < 2**63, "seed", c.seed, "an integer in [-2**63, 2**63)")
    if "num_classes" in c.model.options:
        raise ConfigError(
            "model.options.num_classes cannot be set: the number of classes comes from the "
            "dataset (choose classes with dataset.classes, or dataset.synthetic_classes)"
        )
    fast = c.model.fast_paths
    _check(fast in FAST_PATHS, "model.fast_paths", fast, f"one of {FAST_PATHS}")
    fmt = c.model.pretrained_format
    _check(
        fmt in PRETRAINED_FORMATS, "model.pretrained_format", fmt, f"one of {PRETRAINED_FORMATS}"
    )
    _check(t.batch_size > 0, "train.batch_size", t.batch_size, "an integer > 0")
    _check(t.eval_batch_size > 0, "train.eval_batch_size", t.eval_batch_size, "an integer > 0")
    _check(
        t.num_epochs > 0 or t.num_steps > 0,
        "train.num_epochs",
        t.num_epochs,
        "> 0 (or train.num_steps > 0)",
    )
    _check(t.num_steps >= 0, "train.num_steps", t.num_steps, ">= 0")
    _check(t.backend in BACKENDS, "train.backend", t.backend, f"one of {BACKENDS}")
    _check(t.grad_accum_steps >= 1, "train.grad_accum_steps", t.grad_accum_steps, "an integer >= 1")
    _check(
        t.batch_size % t.grad_accum_steps == 0,
        "train.grad_accum_steps",
        t.grad_accum_steps,
        f"a divisor of train.batch_size={t.batch_size}",
    )
    _check(
        0.0 <= t.label_smoothing < 1.0,
        "train.label_smoothing",
        t.label_smoothing,
        "a value in [0, 1)",
    )
    _check(t.log_every_steps > 0, "train.log_every_steps", t.log_every_steps, "an integer > 0")
    _check(
        t.eval_every_epochs > 0, "train.eval_every_epochs", t.eval_every_epochs, "an integer > 0"
    )
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
    _check(
        o.grad_clip_norm >= 0,
        "optimizer.grad_clip_norm",
        o.grad_clip_norm,
        "a number >= 0 (0 disables)",
    )
    _check(
        0 < o.backbone_lr_scale <= 1,
        "optimizer.backbone_lr_scale",
        o.backbone_lr_scale,
        "a number in (0, 1] (optimizer.freeze_backbone=True freezes the backbone)",
    )
    _check(
        not (o.freeze_backbone and o.backbone_lr_scale != 1),
        "optimizer.backbone_lr_scale",
        o.backbone_lr_scale,
        "1 when optimizer.freeze_backbone is True (a frozen backbone has no learning rate)",
    )
    _check(d.feeder in FEEDERS, "dataset.feeder", d.feeder, f"one of {FEEDERS}")
    _check(
        d.image_size >= 0,
        "dataset.image_size",
        d.image_size,
        "an integer >= 0 (0 keeps the native size)",
    )
    _check(d.crop_padding >= 0, "dataset.crop_padding", d.crop_padding, "an integer >= 0")
    _check(ck.every_steps >= 0, "checkpoint.every_steps", ck.every_steps, "an integer >= 0")
    _check(ck.keep >= 1, "checkpoint.keep", ck.keep, "an integer >= 1")
    _check(ck.best_mode in BEST_MODES, "checkpoint.best_mode", ck.best_mode, f"one of {BEST_MODES}")
    _check(
        ck.best_metric in BEST_METRICS, "checkpoint.best_metric", ck.best_metric,
        f"one of {BEST_METRICS}",
    )  # fmt: skip
    return checked


def config_to_json(config: ml_collections.ConfigDict) -> str:
    """The config as indented JSON, for the workdir and the CLI's printout."""
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def config_from_json(text: str, source: str = "saved config") -> ml_collections.ConfigDict:
    """Inverse of `config_to_json`: a locked config, keys added since filled with their defaults.

    A key this version does not have, or a value of the wrong type, raises a `ConfigError`
    prefixed with `source` (e.g. the file's path).
    """
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{source}: not valid JSON: {e}") from None
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise ConfigError(f"{source}: expected a JSON object of config keys, got {kind}")
    config = default_config()
    try:
        _copy_into(config, data)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return config
