"""The `cnn-jax` command line (also `python -m cnn_jax`): a thin layer over the library.

Every subcommand parses its arguments, calls library functions and prints the results; nothing
else in the package prints. Heavy modules (the training engine, tensorflow, orbax) are imported
inside the subcommands, so `cnn-jax --help` and `cnn-jax summary` start quickly.

Errors a user can cause (`CnnJaxError`, a missing or unreadable file) are printed as one
paragraph prefixed `cnn-jax: error:` and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import errno
import importlib.util
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from cnn_jax.errors import CheckpointError, CnnJaxError, ConfigError, DataError
from cnn_jax.train.signals import Terminated, raise_on_sigterm

PROG = "cnn-jax"
# summary's defaults (input shape, classes): the setting each model is usually shown with.
SUMMARY_DEFAULTS = {
    "lenet5": ((28, 28, 1), 10),
    "mlp": ((28, 28, 1), 10),
    "simple_convnet": ((32, 32, 3), 4),
}
USER_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EEXIST}


# ----------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------


def _out(*lines: str) -> None:
    for line in lines:
        print(line, flush=True)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _shape(text: str) -> tuple[int, int, int]:
    parts = text.replace("x", ",").split(",")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected H,W,C as three positive integers, got {text!r}")
    return shape


def _checkpoint(text: str) -> str | int:
    if text in ("latest", "best"):
        return text
    try:
        step = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected 'latest', 'best' or a step number, got {text!r}"
        ) from None
    if step < 0:
        raise argparse.ArgumentTypeError(f"a checkpoint step must be >= 0, got {text!r}")
    return step


def _existing_workdir(workdir: str | Path, experiment: str | None = None) -> Path:
    path = Path(workdir)
    if not path.is_dir():
        hint = f"; train one with: {PROG} train {experiment or 'EXPERIMENT'} --workdir {path}"
        raise CheckpointError(f"workdir {str(path)!r} does not exist{hint}")
    return path


def _resolve_config(experiment: str, overrides: list[str]):
    from cnn_jax import config as config_lib

    config = config_lib.load_config(experiment)
    config = config_lib.apply_overrides(config, overrides)
    return config_lib.validate_config(config)


def _default_workdir(experiment: str) -> Path:
    return Path("checkpoints") / Path(experiment).stem


def _format_config(config) -> list[str]:
    """One line per section: `train: batch_size=32 num_epochs=30 ...`."""
    lines, scalars = [], []
    for key, value in sorted(config.to_dict().items()):
        if isinstance(value, dict):
            items = " ".join(f"{k}={_compact(v)}" for k, v in sorted(_flatten(value).items()))
            lines.append(f"  {key}: {items}")
        else:
            scalars.append(f"{key}={_compact(value)}")
    return ["config: " + " ".join(scalars), *lines]


def _flatten(d: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def _compact(value: Any) -> str:
    if isinstance(value, str):
        return repr(value) if value == "" or " " in value else value
    if isinstance(value, float):
        return f"{value:g}"
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def _percent(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * float(x):.2f}%"


# ----------------------------------------------------------------------------------------------
# train
# ----------------------------------------------------------------------------------------------


def _make_reporter():
    """A `Reporter` that draws a tqdm progress bar and prints evaluation results."""
    from tqdm import tqdm

    from cnn_jax.train.reporting import Reporter

    class TqdmReporter(Reporter):
        def __init__(self):
            self.bar = None

        def on_start(self, info: dict) -> None:
            for damaged in info.get("damaged_checkpoints") or []:
                print(f"{PROG}: warning: skipped a damaged checkpoint: {damaged}", file=sys.stderr)
            if info.get("previous_run"):
                _out(f"started over: the earlier run was moved to {info['previous_run']}")
            if info.get("resumed_from") is not None:
                _out(f"resuming from the checkpoint of step {info['resumed_from']}")
            for key, (old, new) in (info.get("config_changes") or {}).items():
                _out(f"  config changed since the checkpoint: {key}: {old!r} -> {new!r}")
            self.bar = tqdm(
                total=info.get("total_steps"),
                initial=info.get("start_step", 0) or 0,
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
            )

        def on_train_step(self, step: int, total_steps: int, metrics: dict) -> None:
            if self.bar is None:
                return
            if self.bar.total != total_steps:
                self.bar.total = total_steps
            self.bar.update(max(0, step - self.bar.n))
            shown = {k: f"{float(v):.4f}" for k, v in metrics.items() if k in ("loss", "accuracy")}
            if shown:
                self.bar.set_postfix(shown, refresh=False)

        def on_eval(self, step: int, metrics: dict) -> None:
            epoch = metrics.get("epoch")
            where = f"epoch {epoch:.3g} (step {step})" if epoch is not None else f"step {step}"
            loss, acc = metrics.get("loss"), metrics.get("accuracy")
            text = f"test loss {loss:.4f}, accuracy {_percent(acc)}" if loss is not None else ""
            if self.bar is not None:
                self.bar.clear()
            _out(f"{where}: {text}")
            if self.bar is not None:
                self.bar.refresh()

        def on_end(self, results: dict) -> None:
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return TqdmReporter()


def _model_line(config) -> str:
    """`model lenet5: 61,706 parameters, input 32x32x1, 10 classes`, from shapes only (no
    compute, no data loading), so an unknown model, dataset or option, or an input too small
    for the model, fails in a second rather than after the data is loaded."""
    import jax
    import jax.numpy as jnp

    from cnn_jax.data import get_dataset_info
    from cnn_jax.models.summary import count_params
    from cnn_jax.train.feeders import model_image_shape
    from cnn_jax.train.restore import build_model

    info = get_dataset_info(config.dataset.name, config, data_dir=config.dataset.data_dir or None)
    h, w, c = model_image_shape(config, info)
    classes = len(config.dataset.classes) or info.num_classes
    model = build_model(config, classes)
    variables = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, h, w, c)), train=False)
    )
    return (
        f"model {config.model.name}: {count_params(variables['params']):,} parameters, "
        f"input {h}x{w}x{c}, {classes} classes"
    )


def cmd_train(args: argparse.Namespace) -> int:
    strict = ["checkpoint.strict_resume=True"] if args.strict else []
    config = _resolve_config(args.experiment, [*args.overrides, *strict])
    workdir = Path(args.workdir) if args.workdir else _default_workdir(args.experiment)
    _out(*_format_config(config), f"workdir: {workdir}", _model_line(config))

    import jax

    from cnn_jax.train import Reporter, train_and_evaluate

    main_process = jax.process_index() == 0  # in a multi-host job, only process 0 reports
    reporter = _make_reporter() if main_process else Reporter()
    try:
        results = train_and_evaluate(
            config,
            workdir,
            max_steps=args.max_steps,
            reporter=reporter,
            start_over=args.start_over,
            resume_with_changed_config=args.resume_with_changed_config,
        )
    finally:
        reporter.on_end({})
    if not main_process:
        return 0
    r = results
    _out(
        f"results: best test accuracy {_percent(r.get('best_test_accuracy'))} "
        f"(step {r.get('best_step')}), final {_percent(r.get('final_test_accuracy'))}, "
        f"{r.get('steps')} steps ({r.get('epochs', 0):.3g} epochs) in {r.get('wall_time_s', 0):.1f} s, "
        f"{r.get('images_per_sec', 0):,.0f} images/s"
    )
    if r.get("interrupted"):
        by = r.get("interrupted_by") or "a signal"
        print(
            f"{PROG}: interrupted by {by} at step {r.get('steps')}, checkpoint saved: run the same "
            "command again to resume",
            file=sys.stderr,
        )
        return 128 + int(getattr(signal.Signals, by, signal.SIGINT))
    outputs = [
        ("checkpoints", workdir / "checkpoints"),
        ("metrics", workdir / "metrics.jsonl"),
        ("config", workdir / "config.json"),
    ]
    if not args.no_pictures:
        try:
            outputs += _training_pictures(workdir)
        except (CnnJaxError, ValueError, OSError) as e:  # training itself succeeded
            print(f"{PROG}: warning: could not draw the pictures: {_paragraph(e)}", file=sys.stderr)
    if importlib.util.find_spec("tensorboard") is not None:
        outputs.append(("TensorBoard", f"tensorboard --logdir {workdir}"))
    else:  # the event files are written either way; the viewer is a separate install
        outputs.append(
            ("TensorBoard", f"{workdir / 'tensorboard'} (view: pip install tensorboard)")
        )
    width = max(len(name) for name, _ in outputs) + 2
    _out("outputs:", *(f"  {name + ':':{width}s}{path}" for name, path in outputs))
    return 0


def _training_pictures(workdir: Path) -> list[tuple[str, Any]]:
    """Training curves for every run; filters and feature maps when the test set is small."""
    from cnn_jax import viz

    pictures = []
    metrics = workdir / "metrics.jsonl"
    if metrics.exists():
        try:
            pictures.append(("curves", viz.plot_training_curves(metrics, workdir / "curves.png")))
        except ValueError:
            pass  # no complete epoch yet (e.g. --max-steps below one epoch)
    from cnn_jax.data import get_dataset_info
    from cnn_jax.predict import save_feature_pictures
    from cnn_jax.train import load

    model, variables, config = load(workdir, "latest")
    if get_dataset_info(config.dataset.name, config).device_resident:
        written = save_feature_pictures(config, model, variables, workdir / "pictures")
        pictures += [(name.replace("_", " "), path) for name, path in written.items()]
    else:
        pictures.append(("feature maps", f"{PROG} visualize feature-maps --workdir {workdir}"))
    return pictures


# ----------------------------------------------------------------------------------------------
# eval, export, predict
# ----------------------------------------------------------------------------------------------


def cmd_eval(args: argparse.Namespace) -> int:
    from cnn_jax import config as config_lib

    _resolve_config(args.experiment, args.overrides)  # a bad name or --set fails before loading
    workdir = _existing_workdir(args.workdir or _default_workdir(args.experiment), args.experiment)
    from cnn_jax.train.restore import evaluate, read_config

    config = None  # evaluate with the config the run was trained with
    if args.overrides:
        config = config_lib.apply_overrides(read_config(workdir), args.overrides)
    m = evaluate(workdir, args.checkpoint, config)
    top5 = f", top-5 {_percent(m['top5_accuracy'])}" if "top5_accuracy" in m else ""
    _out(
        f"eval {workdir} (checkpoint {args.checkpoint}, step {m.get('step')}): test loss "
        f"{m['loss']:.4f}, accuracy {_percent(m['accuracy'])}{top5} on {int(m['count'])} images"
    )
    return 0


def _check_output_folder(argument: str, path: Path, *, is_folder: bool = False) -> None:
    """`ConfigError` if `path` (a folder when `is_folder`) cannot be made because a folder
    above it, or the folder itself, exists as a regular file (mkdir's bare 'File exists')."""
    from cnn_jax.train.workdir import file_in_the_way

    blocker = file_in_the_way(path / "x" if is_folder else path)
    if blocker is not None:
        raise ConfigError(f"{argument} {str(path)!r}: {str(blocker)!r} is a file, not a folder")


def cmd_export(args: argparse.Namespace) -> int:
    workdir = _existing_workdir(args.workdir)
    from cnn_jax.models.summary import count_params
    from cnn_jax.train import export_npz, load

    out = Path(args.out)
    if out.suffix != f".{args.format}":
        raise ConfigError(
            f"--out {str(out)!r}: expected a file name ending in .{args.format} (--format "
            f"{args.format})"
        )
    _check_output_folder("--out", out)
    _, variables, config = load(workdir, args.checkpoint)
    out.parent.mkdir(parents=True, exist_ok=True)
    naming = ""
    if args.format == "safetensors":
        naming = f", {_export_safetensors(variables, config.model.name, out)}"
    else:
        export_npz(variables, out)
    _out(f"wrote {out} ({count_params(variables.get('params', variables)):,} parameters{naming})")
    return 0


def _export_safetensors(variables: dict, model_name: str, out: Path) -> str:
    """Writes `variables` to `out` with torchvision's tensor names when the model is a twin of a
    torchvision model with its tensors (else the .npz names, 'params/conv1/kernel'); says which."""
    import jax
    import numpy as np
    from flax.core import unfreeze
    from flax.traverse_util import flatten_dict

    from cnn_jax import pretrained
    from cnn_jax.pretrained.files import write_safetensors

    if model_name in pretrained.TWINS:
        twin = pretrained.TWINS[model_name]
        try:
            tensors = pretrained.to_torchvision(variables, model_name)
        except DataError:  # e.g. cifar_stem=True: another conv1, so not torchvision's tensors
            why = f"its options change torchvision's {twin} tensors"
        else:
            write_safetensors(tensors, out, {"format": "pt", "cnn_jax_model": model_name})
            return f"torchvision's {twin} names"
    else:
        why = f"{model_name} has no torchvision twin"
    flat = {
        key: np.asarray(jax.device_get(leaf))
        for key, leaf in flatten_dict(unfreeze(variables), sep="/").items()
    }
    write_safetensors(flat, out, {"format": "np", "cnn_jax_model": model_name})
    return f"cnn_jax's names ({why})"


def _read_matching_images(config, paths, shape, polarity: str):
    """uint8 [N, H, W, C] images of `paths`; `polarity` 'auto' inverts those whose background is
    the opposite of the training images' (a dark digit on white paper for an MNIST model) and
    says so, 'invert' inverts all, 'as-is' none."""
    import numpy as np

    from cnn_jax import predict

    images = np.stack([predict.read_image(p, shape, invert=polarity == "invert") for p in paths])
    if polarity == "auto":  # match the training images' background (MNIST: dark)
        background = predict.training_background(config)
        flip = [predict.opposite_polarity(image, background) for image in images]
        if any(flip):
            images = np.stack([255 - im if f else im for im, f in zip(images, flip)])
            shape_, ground = ("dark", "light") if background == "dark" else ("light", "dark")
            names = ", ".join(str(p) for p, f in zip(paths, flip) if f)
            print(
                f"{PROG}: note: inverted {names} ({shape_} on {ground}) to match the training "
                f"images ({ground} on {shape_}); --polarity as-is keeps images as they are",
                file=sys.stderr,
            )
    return images


def cmd_predict(args: argparse.Namespace) -> int:
    if (args.workdir is None) == (args.weights is None):
        raise ConfigError(
            "predict needs either --workdir DIR (a run trained here) or --weights FILE with "
            "--model NAME (e.g. torchvision's ImageNet weights)"
        )
    if args.weights is not None:
        return _predict_with_weights(args)
    workdir = _existing_workdir(args.workdir)
    import numpy as np

    from cnn_jax import predict
    from cnn_jax.train import load

    model, variables, config = load(workdir, args.checkpoint)
    spec = predict.model_input(config)
    shape = spec["native_shape"]
    images = _read_matching_images(config, args.images, shape, args.polarity)
    probs = predict.predict_probs(config, model, variables, images)
    k = min(args.top_k or 3, probs.shape[-1])
    for path, p in zip(args.images, probs):
        top = np.argsort(-p)[:k]
        _out(f"{path}: " + ", ".join(f"{spec['class_names'][i]} {_percent(p[i])}" for i in top))
    return 0


def _predict_with_weights(args: argparse.Namespace) -> int:
    """`predict --weights FILE --model NAME`: ImageNet's evaluation crop of each image, the
    file's preprocessing (torchvision's, or Keras' VGG's for a Keras file), the top-k classes."""
    if not args.model:
        raise ConfigError("--weights needs --model NAME: the network the file holds, e.g. resnet50")
    import numpy as np

    from cnn_jax.pretrained import imagenet, sources

    model, variables, fmt = sources.load_model(
        args.weights, args.model, args.weights_format, "--weights-format"
    )
    preprocessing = args.preprocessing
    if preprocessing == "auto":
        preprocessing = "keras_vgg" if fmt == "keras" else "torchvision"
    images = np.stack([imagenet.read_image(path) for path in args.images])
    if args.polarity == "invert":
        images = 255 - images
    probs = imagenet.predict_probs(model, variables, images, preprocessing)
    names = [f"class {i}" for i in range(probs.shape[-1])]
    if probs.shape[-1] == imagenet.NUM_CLASSES:
        names = [imagenet.short_name(name) for name in imagenet.class_names()]
    k = min(args.top_k or 5, probs.shape[-1])
    for path, p in zip(args.images, probs):
        top = imagenet.top_k(p, k)
        _out(f"{path}: " + ", ".join(f"{names[i]} {_percent(q)}" for i, q in top))
    return 0


# ----------------------------------------------------------------------------------------------
# summary, data, visualize, bench
# ----------------------------------------------------------------------------------------------


def _model_option(text: str) -> tuple[str, Any]:
    """KEY=VALUE -> (key, value), the value read like a --set value: a Python literal (120,100 is a
    tuple, None is None) or else the text itself (VALID, relu)."""
    import ast

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(
            f"expected KEY=VALUE, e.g. first_padding=VALID; got {text!r}"
        )
    try:
        return key.strip(), ast.literal_eval(value.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return key.strip(), value.strip()


def cmd_summary(args: argparse.Namespace) -> int:
    from cnn_jax.models import get_model
    from cnn_jax.models.summary import model_summary

    shape, classes = SUMMARY_DEFAULTS.get(args.model, ((224, 224, 3), 1000))
    model = get_model(args.model, num_classes=args.num_classes or classes, **dict(args.options))
    _out(model_summary(model, args.input_shape or shape))
    return 0


def cmd_data_list(args: argparse.Namespace) -> int:
    from cnn_jax.data import available_datasets, get_dataset_info, resolve_data_dir
    from cnn_jax.data.registry import imported_datasets

    data_dir = Path(resolve_data_dir(args.data_dir))
    rows = [("name", "tfds name", "image shape", "classes", "status")]
    for name in [*available_datasets(), *imported_datasets(data_dir)]:
        info = get_dataset_info(name, data_dir=args.data_dir)
        if name == "synthetic":
            status = "generated"
        elif any((data_dir / info.tfds_name.split(":")[0]).glob("**/dataset_info.json")):
            status = "prepared"
        else:
            status = "built on first use" if name == "digits" else "not prepared"
        shape = "x".join(map(str, info.image_shape))
        rows.append((name, info.tfds_name or "-", shape, str(info.num_classes), status))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    _out(f"data dir: {data_dir}")
    _out(*("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows))
    return 0


def cmd_data_import(args: argparse.Namespace) -> int:
    from cnn_jax import data

    source = Path(args.source)
    if not source.exists():
        raise DataError(f"--from {str(source)!r} does not exist")
    where = data.import_dataset(args.name, source, data_dir=args.data_dir)
    _out(f"imported {args.name} from {source} into {where}")
    if args.data_dir:
        _out(f"use it with TFDS_DATA_DIR={args.data_dir} or --set dataset.data_dir={args.data_dir}")
    return 0


def cmd_visualize(args: argparse.Namespace) -> int:
    from cnn_jax import viz

    workdir = _existing_workdir(args.workdir)
    if args.out:
        folder = args.what in ("feature-maps", "activations", "top-patches")
        _check_output_folder("--out", Path(args.out), is_folder=folder)
    if args.what in EXPLAIN_VIEWS:
        return _cmd_explain(args, workdir)
    if args.what == "curves":
        metrics = workdir / "metrics.jsonl"
        if not metrics.exists():
            raise DataError(f"{str(metrics)!r} does not exist; has this workdir been trained?")
        try:
            path = viz.plot_training_curves(metrics, args.out or workdir / "curves.png")
        except ValueError as e:
            raise DataError(str(e)) from None
        _out(f"wrote {path}")
        return 0

    from cnn_jax import predict
    from cnn_jax.train import load

    model, variables, config = load(workdir, args.checkpoint)
    if args.what == "filters":
        name, kernel = predict.first_conv_kernel(variables["params"])
        out = args.out or workdir / "pictures" / "filters.png"
        _out(f"wrote {viz.plot_filters(kernel, out, title=f'{name} {kernel.shape}')}")
        return 0

    outdir = Path(args.out) if args.out else workdir / "pictures"
    image, title = _chosen_image(args, config)
    written = predict.save_feature_pictures(config, model, variables, outdir, image, title)
    _out(*(f"wrote {p}" for p in written.values()))
    return 0


EXPLAIN_VIEWS = {
    "activations": "every channel of every layer for one image, before and after the "
    "activation (paginated), and the fully connected layers as bars",
    "saliency": "why this prediction: the input gradient and SmoothGrad over the image",
    "grad-cam": "why this prediction: Grad-CAM at a conv layer and Guided Grad-CAM",
    "occlusion": "why this prediction: the class probability as a grey square is swept over "
    "the image",
    "top-patches": "what a channel responds to: its top-k dataset patches (cropped to the "
    "receptive field) and their projections to pixel space",
    "maximize": "what a channel responds to: inputs optimised to excite it",
}


def _explain_parsers(vis_sub, checkpoint_arg, polarity_args) -> None:
    """The `visualize` subcommands of `_cmd_explain` (cnn_jax.explain)."""
    for what, help in EXPLAIN_VIEWS.items():
        q = vis_sub.add_parser(what, help=help, description=help)
        q.set_defaults(func=cmd_visualize)
        q.add_argument("--workdir", required=True, help="the training folder")
        folder = what in ("activations", "top-patches")
        q.add_argument(
            "--out",
            help=f"output {'folder' if folder else 'PNG'} (default: WORKDIR/pictures/"
            f"{what.replace('-', '_')}{'' if folder else '.png'})",
        )
        checkpoint_arg(q)
        if what in ("activations", "saliency", "grad-cam", "occlusion"):
            q.add_argument("--image", help="a PNG/JPEG file (default: a test image)")
            polarity_args(q)
            q.add_argument("--index", type=int, help="test image index (default: the first '8')")
            q.add_argument("--label", default="8", help="class name of the test image (default: 8)")
        if what in ("saliency", "grad-cam", "occlusion"):
            q.add_argument(
                "--class",
                dest="target",
                metavar="CLASS",
                help="the class to explain, a name or index (default: the predicted class)",
            )
        layer_help = {
            "activations": "a layer to draw (repeatable; default: every layer)",
            "grad-cam": "the layer (default: the last rectified conv map)",
            "top-patches": "the layer (default: the last rectified conv map)",
            "maximize": "the layer (default: the output, one image per class); pre-activation "
            "layers ('block1/conv1') work best",
        }
        if what in layer_help:
            q.add_argument(
                "--layer",
                action="append" if what == "activations" else "store",
                metavar="NAME",
                help=f"{layer_help[what]}; an unknown name lists the model's layers",
            )
        if what == "activations":
            q.add_argument("--per-page", type=_positive_int, default=64, metavar="N",
                           help="channels per page (default: 64)")  # fmt: skip
        if what == "saliency":
            q.add_argument("--samples", type=_positive_int, default=32, metavar="N",
                           help="SmoothGrad's noisy copies (default: 32)")  # fmt: skip
        if what == "occlusion":
            q.add_argument("--size", type=_positive_int, metavar="PIXELS",
                           help="the square's side (default: a quarter of the image)")  # fmt: skip
            q.add_argument("--stride", type=_positive_int, metavar="PIXELS",
                           help="its step (default: a quarter of the size)")  # fmt: skip
        if what in ("top-patches", "maximize"):
            q.add_argument(
                "--channels",
                type=_index_list,
                metavar="I,J,...",
                help="channels to draw (default: all for top-patches, the first 10 for maximize)",
            )
        if what == "top-patches":
            q.add_argument("-k", type=_positive_int, default=9, metavar="K",
                           help="patches per channel (default: 9)")  # fmt: skip
            q.add_argument("--rule", choices=("guided", "deconvnet"), default="guided",
                           help="projection to pixel space (default: guided backprop)")  # fmt: skip
            q.add_argument("--split", help="dataset split (default: the test split)")
            q.add_argument("--max-images", type=_positive_int, default=10000, metavar="N",
                           help="the first N images of the split (default: 10000)")  # fmt: skip
        if what == "maximize":
            q.add_argument("--steps", type=_positive_int, default=200, metavar="N",
                           help="optimisation steps (default: 200)")  # fmt: skip


def _index_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected indices like 0,1,5, got {text!r}")
    return values


def _class_index(text: str | None, names: list[str]) -> int | None:
    """--class as a class index: a class name, or an index into the classes."""
    if text is None:
        return None
    if text in names:
        return names.index(text)
    if text.isdigit() and int(text) < len(names):
        return int(text)
    shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
    raise ConfigError(
        f"--class {text!r} is not a class of this model; expected a name ({shown}) or an index "
        f"0..{len(names) - 1}"
    )


def _chosen_image(args: argparse.Namespace, config) -> tuple[Any, str]:
    """The uint8 [H, W, C] image `visualize` draws (--image, else test image --index / --label)
    and its title."""
    from cnn_jax import predict

    if args.image:
        shape = predict.model_input(config)["native_shape"]
        return _read_matching_images(config, [args.image], shape, args.polarity)[0], args.image
    image, label, index = predict.sample_test_image(config, args.label, args.index)
    names = predict.model_input(config)["class_names"]
    return image, f"test image {index} (label {names[label]})"


def _cmd_explain(args: argparse.Namespace, workdir: Path) -> int:
    """visualize activations | saliency | grad-cam | occlusion | top-patches | maximize."""
    import numpy as np

    from cnn_jax import explain, predict
    from cnn_jax.train import load

    model, variables, config = load(workdir, args.checkpoint)
    names = predict.model_input(config)["class_names"]
    name = args.what.replace("-", "_")
    out = Path(args.out) if args.out else workdir / "pictures" / name
    if args.what in ("top-patches", "maximize"):
        from cnn_jax.data import get_dataset_info, load_split_arrays

        info = get_dataset_info(config.dataset.name, config)
        split = args.split if args.what == "top-patches" and args.split else None
        split = split or config.dataset.eval_split or info.test_split
        classes = list(config.dataset.classes) or None
        images, _ = load_split_arrays(config.dataset.name, split, config=config, classes=classes)
        if args.what == "top-patches":
            images = images[: args.max_images]
        x = np.concatenate([
            np.asarray(predict.preprocess_for_model(config, images[i : i + 512]))
            for i in range(0, len(images), 512)
        ])  # fmt: skip
        run = f"{config.model.name} on {config.dataset.name}"
        if args.what == "top-patches":
            shapes = explain.layer_shapes(model, variables, x[:1])
            layer = args.layer or explain.default_cam_layer(shapes)
            paths, _ = explain.save_top_patches(
                model, variables, x, out / f"{explain.layer_file_name(layer)}.png", layer=layer,
                k=args.k, channels=args.channels, rule=args.rule, title=f"{run}, {split} split",
            )  # fmt: skip
            _out(*(f"wrote {p}" for p in paths))
            return 0
        if args.layer is None:
            channels = args.channels or list(range(min(10, len(names))))
            labels = [names[c] if c < len(names) else str(c) for c in channels]
        else:
            channels, labels = args.channels or list(range(10)), None
        # the range of real inputs (per channel), so the optimised image stays a possible input
        value_range = (x.min(axis=(0, 1, 2)), x.max(axis=(0, 1, 2)))
        path = explain.save_maximized(
            model, variables, x.shape[1:], out.with_suffix(".png") if not args.out else out,
            layer=args.layer, channels=channels, names=labels, title=run, steps=args.steps,
            value_range=value_range,
        )  # fmt: skip
        _out(f"wrote {path}")
        return 0

    image, title = _chosen_image(args, config)
    x = predict.preprocess_for_model(config, np.asarray(image)[None])
    if args.what == "activations":
        paths = explain.save_activations(
            model, variables, x, out, layers=args.layer, per_page=args.per_page, title=title,
            class_names=names,
        )  # fmt: skip
        _out(*(f"wrote {p}" for p in paths))
        return 0
    target = _class_index(args.target, names)
    if target is None:
        target = int(explain.logits(model, variables, x)[0].argmax())
    path = out if args.out else out.with_suffix(".png")
    common = {"target": target, "class_name": names[target], "title": title}
    if args.what == "saliency":
        path = explain.save_saliency(model, variables, x, path, samples=args.samples, **common)
    elif args.what == "grad-cam":
        path = explain.save_grad_cam(model, variables, x, path, layer=args.layer, **common)
    else:
        path, occ = explain.save_occlusion(
            model, variables, x, path, size=args.size, stride=args.stride, **common
        )
        _out(
            f"p({names[target]}) = {occ.base:.3f} unoccluded, {float(occ.probs.min()):.3f} with "
            f"the {occ.size}x{occ.size} square at its worst place"
        )
    _out(f"wrote {path}")
    return 0


def cmd_explore(args: argparse.Namespace) -> int:
    workdir = _existing_workdir(args.workdir)
    from cnn_jax.explore import Explorer, ExplorerServer
    from cnn_jax.train.signals import Terminated

    with ExplorerServer(None, args.port) as server:  # the port first: refused before compiling
        explorer = Explorer.from_workdir(workdir, args.checkpoint)
        server.attach(explorer)
        _out(
            f"explore: {explorer.config.model.name} from {workdir} "
            f"(compiled in {explorer.compile_seconds:.1f} s)",
            f"open {server.url} in a browser (this machine only); Ctrl-C stops",
        )
        try:
            server.serve_forever(poll_interval=0.2)
        except KeyboardInterrupt as e:
            if isinstance(e, Terminated):
                raise
        finally:
            stats = server.timings.summary()
            if stats["requests"]:
                _out(
                    f"{stats['requests']} predictions: model {stats['model']['median']:.1f} ms "
                    f"median (p90 {stats['model']['p90']:.1f}), whole request "
                    f"{stats['total']['median']:.1f} ms median (p90 {stats['total']['p90']:.1f})"
                )
    return 0


def _scripts() -> dict[str, Path]:
    """The script experiments (files of cnn_jax.experiments defining main, not get_config)."""
    from cnn_jax.config import experiments_dir

    return {
        p.stem: p
        for p in sorted(experiments_dir().glob("*.py"))
        if not p.stem.startswith("_")
        and "def main(" in p.read_text()
        and "def get_config(" not in p.read_text()
    }


def cmd_run(args: argparse.Namespace) -> int:
    import importlib.util

    scripts = _scripts()
    if args.script not in scripts:
        raise ConfigError(
            f"unknown script experiment {args.script!r}; expected one of: "
            f"{', '.join(scripts) or '(none)'} (config experiments run with '{PROG} train')"
        )
    spec = importlib.util.spec_from_file_location(
        f"cnn_jax_script_{args.script}", scripts[args.script]
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv0, sys.argv[0] = sys.argv[0], f"{PROG} run {args.script}"  # the script's usage line
    try:
        return int(module.main(args.args) or 0)
    finally:
        sys.argv[0] = argv0


def cmd_bench(args: argparse.Namespace) -> int:
    from cnn_jax.bench import run_benchmark

    result = run_benchmark(
        args.model,
        args.batch_size,
        args.steps,
        input_shape=args.input_shape,
        dtype=args.dtype,
        backend=args.backend,
        fast_paths=False if args.no_fast_paths else None,
    )
    if args.json:
        _out(json.dumps(result, indent=2, default=str))
        return 0
    mfu = result.get("mfu")
    _out(
        f"{result['model']} on {result.get('device')}: {result['images_per_sec']:,.0f} images/s "
        f"(batch {result['batch_size']}, {result.get('dtype')}, {result.get('backend')}"
        + ("" if result.get("fast_paths") else ", fast paths off")
        + "), "
        f"compile {result.get('compile_seconds', 0):.1f} s"
        + (f", MFU {100 * mfu:.1f}%" if mfu else "")
    )
    return 0


# ----------------------------------------------------------------------------------------------
# Parser and entry point
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Train, evaluate, inspect and visualise convolutional networks in JAX/Flax.",
        epilog=f"Run '{PROG} COMMAND --help' for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, help: str, func, **kw) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, **kw)
        p.set_defaults(func=func)
        return p

    def experiment_args(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "experiment",
            metavar="EXPERIMENT",
            help="a config name from experiments/ (e.g. lenet5_digits) or a .py path",
        )
        p.add_argument(
            "--set",
            dest="overrides",
            action="extend",
            nargs="+",
            default=[],
            metavar="KEY=VALUE",
            help="override config values, e.g. train.batch_size=64",
        )

    def polarity_args(p: argparse.ArgumentParser) -> None:
        polarity = p.add_mutually_exclusive_group()
        polarity.add_argument(
            "--polarity",
            choices=("auto", "as-is", "invert"),
            default="auto",
            help="auto (default): invert an image whose background is the opposite of the training "
            "images' (a dark digit on white paper for a model trained on MNIST) and say so; as-is: "
            "never invert; invert: always invert the grey levels",
        )
        polarity.add_argument(
            "--invert",
            dest="polarity",
            action="store_const",
            const="invert",
            default=argparse.SUPPRESS,
            help="same as --polarity invert",
        )
        polarity.add_argument(
            "--no-invert",
            dest="polarity",
            action="store_const",
            const="as-is",
            default=argparse.SUPPRESS,
            help="same as --polarity as-is",
        )

    def checkpoint_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--checkpoint",
            type=_checkpoint,
            default="latest",
            metavar="latest|best|STEP",
            help="which checkpoint (default: latest)",
        )

    p = add("train", "train an experiment (re-running on the same workdir resumes)", cmd_train)
    experiment_args(p)
    p.add_argument("--workdir", help="output folder (default: checkpoints/EXPERIMENT)")
    p.add_argument(
        "--max-steps",
        type=_positive_int,
        metavar="N",
        help="stop after N total steps (checkpointing at the end)",
    )
    p.add_argument(
        "--no-pictures",
        action="store_true",
        help="skip the training-curve, filter and feature-map PNGs",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="stop if the newest checkpoint is damaged, instead of resuming from an older one",
    )
    p.add_argument(
        "--start-over",
        action="store_true",
        help="train from step 0 even though the workdir holds an earlier run: its files are "
        "moved into WORKDIR/previous-runs/<time>/ first (nothing is deleted)",
    )
    p.add_argument(
        "--resume-with-changed-config",
        action="store_true",
        help="resume the workdir's checkpoints even though the config differs in keys that "
        "change the run (model, data, batch size, optimizer, seed, ...); the changes are "
        "recorded in the checkpoints' meta",
    )

    p = add("eval", "evaluate a trained checkpoint on the test split", cmd_eval)
    experiment_args(p)
    p.add_argument("--workdir", help="the training folder (default: checkpoints/EXPERIMENT)")
    checkpoint_arg(p)

    p = add(
        "export",
        "write trained parameters and batch statistics to one .npz or .safetensors file",
        cmd_export,
    )
    p.add_argument("--workdir", required=True, help="the training folder")
    p.add_argument("--out", required=True, metavar="FILE", help="output file (.npz, .safetensors)")
    p.add_argument(
        "--format",
        choices=("npz", "safetensors"),
        default="npz",
        help="npz (default; keys 'params/conv1/kernel') or safetensors (torchvision's tensor "
        "names and layouts for the models with a torchvision twin, loadable into "
        "torchvision.models; the npz keys for the others)",
    )
    checkpoint_arg(p)

    p = add("predict", "classify PNG/JPEG images with a trained model (softmax top-k)", cmd_predict)
    p.add_argument("--workdir", help="the training folder (or --weights and --model)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="PNG or JPEG files")
    p.add_argument(
        "--top-k",
        type=_positive_int,
        metavar="K",
        help="classes to show per image (default: 3; 5 with --weights)",
    )
    p.add_argument(
        "--weights",
        metavar="FILE",
        help="predict with a weights file instead of a trained run: torchvision's .safetensors "
        "or .pth of a twin, Keras' VGG .h5, or a cnn-jax export; each image is read as "
        "ImageNet's evaluation does (shorter side 256, centre 224x224 crop)",
    )
    p.add_argument("--model", metavar="NAME", help="the network the --weights file holds")
    p.add_argument(
        "--weights-format",
        choices=("auto", "torchvision", "keras", "cnn_jax"),
        default="auto",
        help="the --weights file's kind (default: from its name)",
    )
    p.add_argument(
        "--preprocessing",
        choices=("auto", "torchvision", "keras_vgg"),
        default="auto",
        help="with --weights: torchvision (mean/std normalisation) or keras_vgg (BGR, mean "
        "subtracted); default: keras_vgg for Keras files, else torchvision",
    )
    polarity_args(p)
    checkpoint_arg(p)

    p = add(
        "summary",
        "print a model's layers (output shape, parameters, receptive field) and total",
        cmd_summary,
    )
    p.add_argument("model", metavar="MODEL", help="a model name (see the error for the list)")
    p.add_argument(
        "--input-shape",
        type=_shape,
        metavar="H,W,C",
        help="input image shape (default: the model's usual input: 28,28,1 for lenet5 and mlp, "
        "32,32,3 for simple_convnet, else 224,224,3)",
    )
    p.add_argument(
        "--num-classes",
        type=_positive_int,
        metavar="N",
        help="output classes (default: 10 for lenet5 and mlp, 4 for simple_convnet, else 1000)",
    )
    p.add_argument(
        "--option",
        dest="options",
        type=_model_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a model option, as in the config's model.options (repeatable), e.g. "
        "--option first_padding=VALID --option hidden_features=120,100",
    )

    p = add("data", "list datasets or import local dataset files for offline use", None)
    data_sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    q = data_sub.add_parser(
        "list", help="list the known datasets", description="list the known datasets"
    )
    q.set_defaults(func=cmd_data_list)
    q.add_argument(
        "--data-dir", help="tfds data folder (default: TFDS_DATA_DIR or ~/tensorflow_datasets)"
    )
    q = data_sub.add_parser(
        "import",
        help="prepare a dataset from local files (no network)",
        description="prepare a dataset from local files (no network)",
    )
    q.set_defaults(func=cmd_data_import)
    q.add_argument("name", metavar="NAME", help="dataset name, e.g. mnist")
    q.add_argument(
        "--from",
        dest="source",
        required=True,
        metavar="PATH",
        help="folder or archive holding the original files",
    )
    q.add_argument(
        "--data-dir", help="tfds data folder (default: TFDS_DATA_DIR or ~/tensorflow_datasets)"
    )

    p = add("visualize", "write pictures of a trained model as PNG files", None)
    vis_sub = p.add_subparsers(dest="what", metavar="WHAT", required=True)
    for what, help in (
        ("filters", "first-layer convolution filters"),
        ("feature-maps", "activations of each layer for one image, filters and probabilities"),
        ("curves", "loss and accuracy over training, train vs test"),
    ):
        q = vis_sub.add_parser(what, help=help, description=help)
        q.set_defaults(func=cmd_visualize)
        q.add_argument("--workdir", required=True, help="the training folder")
        q.add_argument(
            "--out", help="output PNG (a folder for feature-maps; default: in the workdir)"
        )
        if what != "curves":
            checkpoint_arg(q)
        if what == "feature-maps":
            q.add_argument("--image", help="a PNG/JPEG file (default: a test image)")
            polarity_args(q)
            q.add_argument("--index", type=int, help="test image index (default: the first '8')")
            q.add_argument("--label", default="8", help="class name of the test image (default: 8)")
    _explain_parsers(vis_sub, checkpoint_arg, polarity_args)

    p = add(
        "explore",
        "serve an interactive page on 127.0.0.1: draw a digit and watch every layer respond",
        cmd_explore,
    )
    p.add_argument("--workdir", required=True, help="the training folder")
    p.add_argument(
        "--port", type=int, default=8765, help="TCP port (default: 8765; 0: any free port)"
    )
    checkpoint_arg(p)

    p = add("run", "run a script experiment from experiments/ (e.g. filters, mlp_vs_cnn)", cmd_run)
    p.add_argument("script", metavar="SCRIPT", help="filters, feature_maps, mlp_vs_cnn or gallery")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the script's own options (see --help)")

    if importlib.util.find_spec("cnn_jax.bench") is not None:
        p = add("bench", "measure the training throughput of a model (synthetic data)", cmd_bench)
        p.add_argument("model", metavar="MODEL", help="a model name, e.g. resnet50")
        p.add_argument("--batch-size", type=_positive_int, default=128, metavar="B")
        p.add_argument(
            "--steps",
            type=_positive_int,
            default=50,
            metavar="N",
            help="steps per timed window (default: 50)",
        )
        p.add_argument(
            "--input-shape",
            type=_shape,
            metavar="H,W,C",
            help="input shape (default: the model's benchmark setting)",
        )
        p.add_argument(
            "--dtype",
            choices=["float32", "bfloat16"],
            default="float32",
            help="compute dtype; parameters stay float32",
        )
        p.add_argument("--backend", choices=["jit", "pmap"], default="jit")
        p.add_argument(
            "--no-fast-paths",
            action="store_true",
            help="build the model without the CPU fast implementations (cnn_jax.fast_paths), "
            "to compare",
        )
        p.add_argument("--json", action="store_true", help="print every measured value as JSON")
    return parser


def _paragraph(message: str) -> str:
    """Joins the lines of a message into one paragraph, with '; ' between list-like lines."""
    text = ""
    for line in (part.strip() for part in str(message).splitlines()):
        if line:
            text += (" " if not text or text[-1] in ".:;,!?" else "; ") + line
    return text.strip()


def _error(message: str) -> int:
    print(f"{PROG}: error: {_paragraph(message)}", file=sys.stderr)
    return 2


def _without_closed_loop_noise(hook):
    """`hook` (sys.excepthook / sys.unraisablehook) minus one message: after a failed
    checkpoint write, TensorStore's callbacks into Orbax's finished asyncio loop report
    'Event loop is closed' (the failure itself is reported once, as an error)."""

    if getattr(hook, "cnn_jax_filtered", False):
        return hook

    def filtered(*args):
        exc = args[1] if len(args) > 1 else getattr(args[0], "exc_value", None)
        if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
            return
        hook(*args)

    filtered.cnn_jax_filtered = True
    return filtered


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit status (0 ok, 2 user error, 130 interrupted)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter
    # Orbax/tfds notices are not user news, and their errors reach the user as one message.
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    # A failed checkpoint write also leaves Orbax's asyncio tasks with "exception never retrieved".
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    parser = build_parser()
    # Not restored on return: the noise comes from background threads, also after `main`.
    sys.excepthook = _without_closed_loop_noise(sys.excepthook)
    sys.unraisablehook = _without_closed_loop_noise(sys.unraisablehook)
    try:
        args = parser.parse_args(argv)
        with raise_on_sigterm():
            return int(args.func(args) or 0)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return e.code if isinstance(e.code, int) else 2
    except CnnJaxError as e:
        return _error(str(e))
    except ModuleNotFoundError as e:  # a core-only install (no extras) running a full command
        full_extra = (
            "tensorflow", "tensorflow_datasets", "orbax", "matplotlib", "ml_collections", "tqdm",
            "tensorboardX", "PIL", "sklearn", "importlib_resources",
        )  # fmt: skip
        module = (e.name or "").split(".")[0]
        if module not in full_extra:
            raise
        return _error(
            f"this command needs {module} from the 'full' extra: pip install 'cnn_jax[full]'"
        )
    except OSError as e:  # the user's environment: no space, no permission, a missing path
        if not isinstance(e, USER_OS_ERRORS) and e.errno not in USER_ERRNOS:
            raise
        where = f": {e.filename}" if e.filename else ""
        return _error(f"{e.strerror or e}{where}")
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (`Terminated`) outside training steps
        if isinstance(e, Terminated):
            print(f"{PROG}: terminated (SIGTERM)", file=sys.stderr)
            return 128 + signal.SIGTERM
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
