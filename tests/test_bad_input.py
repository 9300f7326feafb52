"""Issue 7, bad input: every mistake a user can make gets one clear message and exit status 2.

Tables of input -> expected message fragment, driven through the real command line in-process
(`cli.main`, exit status and stderr checked, never a traceback), plus the library calls a user
makes directly (`model.apply`, `load_split_arrays`) and a few runs of `python -m cnn_jax` in a
fresh interpreter. Covered: config files and `--set` overrides, model input, labels, `predict`
on bad image files, `data import` of bad IDX files, unsafe archives and code-running pickles,
and `--help` on every subcommand.
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
import pickle
import re
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from cnn_jax import cli
from cnn_jax.errors import DataError, ShapeError

REPO = Path(__file__).resolve().parent.parent


def run_cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(result: tuple[int, str, str], fragment: str) -> None:
    code, out, err = result
    assert "Traceback" not in out + err
    assert code == 2, f"exit status {code}, stderr: {err!r}"
    assert err.startswith("cnn-jax: error: "), err
    assert fragment in err, f"{fragment!r} not in {err!r}"


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Default workdirs (checkpoints/...) and the tfds data dir inside the test's tmp folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))


@pytest.fixture
def no_training(monkeypatch):
    """Makes any start of training fail the test: these errors must come before it."""

    def refuse(*args, **kwargs):
        raise AssertionError("training started; the error should have been reported before")

    import cnn_jax.train

    monkeypatch.setattr(cnn_jax.train, "train_and_evaluate", refuse)


# ----------------------------------------------------------------------------------------------
# Configs and --set overrides: reported before training starts (before data or compilation)
# ----------------------------------------------------------------------------------------------

CONFIG_FILES = {
    "typo.py": "c.train.batchsize = 32",
    "wrong_type.py": "c.train.batch_size = '64'",
    "none_value.py": "c.train.eval_batch_size = None",
    "infinite.py": "c.optimizer.weight_decay = float('inf')",
    "bad_list.py": "c.optimizer.step_boundaries = ['half']",
    "raises.py": "raise RuntimeError('no GPU quota')",
    "vgg.py": "c.model.name = 'vgg11'; c.dataset.image_size = 16",
    "exits.py": "import sys; sys.exit(0)",  # used to end the command silently with status 0
}
CONFIG_FILE_HEAD = (
    "from cnn_jax.config import default_config\n\ndef get_config():\n    c = default_config()\n"
)


def write_config_files(folder: Path) -> None:
    for name, line in CONFIG_FILES.items():
        (folder / name).write_text(f"{CONFIG_FILE_HEAD}    {line}\n    return c\n")
    (folder / "partial.py").write_text(
        "import ml_collections\n\ndef get_config():\n"
        "    return ml_collections.ConfigDict({'model': {'name': 'lenet5'}})\n"
    )
    (folder / "syntax.py").write_text("def get_config(:\n")
    (folder / "exits_on_import.py").write_text("import sys\nsys.exit(3)\n")


SET = "--set"
CONFIG_CASES = [
    # (id, arguments after `train`, expected fragment of the message)
    ("unknown-key", ["lenet5_digits", SET, "optimizer.learnig_rate=0.1"],
     "unknown config key 'optimizer.learnig_rate'; did you mean 'optimizer.learning_rate'"),
    ("unknown-section", ["lenet5_digits", SET, "trian.batch_size=8"],
     "did you mean 'train.batch_size'"),
    ("unknown-key-no-match", ["lenet5_digits", SET, "zzzz=1"], "unknown config key 'zzzz'"),
    ("section-as-value", ["lenet5_digits", SET, "train=3"],
     "--set 'train=3': 'train' is a section of the config, not a value; set its keys one by one"),
    ("options-as-value", ["lenet5_digits", SET, "model.options={}"],
     "'model.options' is a section of the config, not a value"),
    ("unknown-key-in-file", ["typo.py"],
     "unknown config key 'train.batchsize'; did you mean 'train.batch_size'"),
    ("not-key-value", ["lenet5_digits", SET, "train.batch_size"], "expected key=value"),
    ("wrong-type-int", ["lenet5_digits", SET, "train.batch_size=abc"],
     "--set train.batch_size: value 'abc' has the wrong type; expected int"),
    ("wrong-type-fraction", ["lenet5_digits", SET, "train.num_epochs=1.5"],
     "value 1.5 has the wrong type; expected int"),
    ("wrong-type-float", ["lenet5_digits", SET, "optimizer.learning_rate=fast"],
     "value 'fast' has the wrong type; expected float"),
    ("wrong-type-bool", ["lenet5_digits", SET, "dataset.flip=maybe"],
     "value 'maybe' has the wrong type; expected bool"),
    ("wrong-type-list", ["lenet5_digits", SET, "optimizer.step_boundaries=half"],
     "value 'half' has the wrong type; expected list"),
    ("wrong-type-in-file", ["wrong_type.py"],
     "line 5: config key 'train.batch_size' has invalid value '64'; expected an integer"),
    ("none-in-file", ["none_value.py"],
     "config key 'train.eval_batch_size' has invalid value None; expected an integer"),
    ("infinite-in-file", ["infinite.py"],
     "config key 'optimizer.weight_decay' has invalid value inf; expected a finite number"),
    ("bad-list-in-file", ["bad_list.py"],
     "'optimizer.step_boundaries' has invalid value ['half']; expected a list of finite numbers"),
    ("missing-keys", ["partial.py"], "is missing; start the config from"),
    ("get-config-raises", ["raises.py"], "failed: RuntimeError: no GPU quota"),
    ("syntax-error", ["syntax.py"], "could not load config file"),
    ("unknown-experiment", ["lenet5_digitz"], "unknown experiment 'lenet5_digitz'"),
    ("get-config-exits", ["exits.py"], "called sys.exit(0); a config file must return a config"),
    ("config-exits-on-import", ["exits_on_import.py"], "called sys.exit(3) while loading"),
    ("options-num-classes", ["lenet5_digits", SET, "model.options.num_classes=5"],
     "model.options.num_classes cannot be set: the number of classes comes from the dataset"),
    ("seed-beyond-int64", ["lenet5_digits", SET, "seed=1180591620717411303424"],
     "'seed' has invalid value 1180591620717411303424; expected an integer in [-2**63, 2**63)"),
    ("lr-zero", ["lenet5_digits", SET, "optimizer.learning_rate=0"],
     "'optimizer.learning_rate' has invalid value 0.0; expected a number > 0"),
    ("lr-negative", ["lenet5_digits", SET, "optimizer.learning_rate=-0.1"],
     "'optimizer.learning_rate' has invalid value -0.1; expected a number > 0"),
    ("lr-infinite", ["lenet5_digits", SET, "optimizer.learning_rate=1e999"],
     "'optimizer.learning_rate' has invalid value inf; expected a finite number"),
    ("batch-zero", ["lenet5_digits", SET, "train.batch_size=0"],
     "'train.batch_size' has invalid value 0; expected an integer > 0"),
    ("batch-negative", ["lenet5_digits", SET, "train.batch_size=-64"],
     "'train.batch_size' has invalid value -64"),
    ("eval-batch-zero", ["lenet5_digits", SET, "train.eval_batch_size=0"],
     "'train.eval_batch_size' has invalid value 0"),
    ("accumulation-not-dividing", ["lenet5_digits", SET, "train.grad_accum_steps=3"],
     "'train.grad_accum_steps' has invalid value 3; expected a divisor of train.batch_size=64"),
    ("label-smoothing", ["lenet5_digits", SET, "train.label_smoothing=1.0"],
     "'train.label_smoothing' has invalid value 1.0; expected a value in [0, 1)"),
    ("momentum", ["lenet5_digits", SET, "optimizer.momentum=1.5"], "'optimizer.momentum'"),
    ("epochs-and-steps-zero", ["lenet5_digits", SET, "train.num_epochs=0"], "'train.num_epochs'"),
    ("step-boundaries", ["lenet5_digits", SET, "optimizer.step_boundaries=[0.5,1.5]"],
     "fractions of training strictly between 0 and 1"),
    ("optimizer-name", ["lenet5_digits", SET, "optimizer.name=sgdd"], "'optimizer.name'"),
    ("backend", ["lenet5_digits", SET, "train.backend=tpu"], "'train.backend'"),
    ("image-size-negative", ["lenet5_digits", SET, "dataset.image_size=-3"],
     "'dataset.image_size' has invalid value -3"),
    ("unknown-dataset", ["lenet5_digits", SET, "dataset.name=minst"], "unknown dataset 'minst'"),
    ("unknown-model", ["lenet5_digits", SET, "model.name=resnet19"], "unknown model 'resnet19'"),
    ("unknown-model-option", ["lenet5_digits", SET, "model.options.colour=3"],
     "model 'lenet5' has no option(s) 'colour'"),
    ("bad-model-option", ["lenet5_digits", SET, "model.options.act=swishy"],
     "act='swishy' is not a known activation"),
    ("bogus-best-metric", ["lenet5_digits", SET, "checkpoint.best_metric=bogus"],
     "config key 'checkpoint.best_metric' has invalid value 'bogus'; expected one of"),
    ("synthetic-classes", ["lenet5_digits", SET, "dataset.name=synthetic",
                           "dataset.synthetic_classes=1"],
     "'dataset.synthetic_classes' has invalid value 1; expected >= 2"),
    # An image too small for the pooling stack: the message names the layer whose output
    # would be empty (found from shapes alone, jax.eval_shape of model.init).
    ("image-too-small-first-conv", ["lenet5_digits", SET, "dataset.image_size=4"],
     ("input too small: layer 'block1/conv1' (conv window 5x5, stride 1x1, padding 'VALID') "
     "would produce an empty 0x0 output from its 4x4 input")),
    ("image-too-small-second-block", ["lenet5_digits", SET, "dataset.image_size=8"],
     "input too small: layer 'block2/conv1'"),
    ("image-too-small-vgg", ["vgg.py"],
     ("input too small: layer 'block5/pool' (max pool window 2x2, stride 2x2, padding 'VALID') "
     "would produce an empty 0x0 output from its 1x1 input")),
    ("image-too-small-native", ["lenet5_digits", SET, "dataset.image_size=0"],
     "input too small: layer 'block2/conv1'"),  # digits are 8x8
]  # fmt: skip


@pytest.mark.parametrize(
    "args, fragment", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES]
)
def test_config_errors_before_training(capsys, tmp_path, no_training, args, fragment):
    write_config_files(tmp_path)
    workdir = tmp_path / "run"
    argv = ["train", *args, "--workdir", workdir, "--max-steps", "1", "--no-pictures"]
    assert_user_error(run_cli(capsys, argv), fragment)
    assert not workdir.exists()  # nothing was started


def test_set_overrides_are_checked_for_eval_too(capsys, tmp_path):
    result = run_cli(capsys, ["eval", "lenet5_digits", SET, "train.batch_size=0"])
    assert_user_error(result, "'train.batch_size' has invalid value 0")


def test_image_too_small_library_fails_before_training(tmp_path):
    """`train_and_evaluate` itself: a ShapeError naming the layer from shapes alone, before
    the reporter hears of a start and before anything is written."""
    from cnn_jax.config import apply_overrides, load_config
    from cnn_jax.train import Reporter, train_and_evaluate

    class Record(Reporter):
        started = False

        def on_start(self, info):
            Record.started = True

    config = apply_overrides(
        load_config("lenet5_digits"),
        [*SYNTHETIC[1:], "dataset.image_size=8", "train.batch_size=8", "train.eval_batch_size=8"],
    )
    with pytest.raises(ShapeError, match="input too small: layer 'block2/conv1'"):
        train_and_evaluate(config, tmp_path / "run", max_steps=1, reporter=Record())
    assert not Record.started
    assert (
        not list((tmp_path / "run").rglob("*.json*"))
        and not (tmp_path / "run/checkpoints").exists()
    )


# ----------------------------------------------------------------------------------------------
# Errors found when the run starts (devices, data): still before anything is compiled
# ----------------------------------------------------------------------------------------------

SYNTHETIC = [
    SET,
    "dataset.name=synthetic",
    "dataset.synthetic_size=16",
    "checkpoint.async_save=False",
]


def test_batch_size_not_divisible_by_device_count(capsys, tmp_path):
    n = jax.device_count()
    if n == 1:
        pytest.skip("one device: every batch size divides (run with 8 forced CPU devices)")
    for key in ("train.batch_size", "train.eval_batch_size"):
        argv = ["train", "lenet5_digits", "--workdir", tmp_path / key, "--no-pictures"]
        result = run_cli(capsys, [*argv, *SYNTHETIC, f"{key}={n + 1}"])
        assert_user_error(result, f"config key '{key}' has invalid value {n + 1}")
        assert f"it must be divisible by the number of devices ({n})" in result[2]
        assert not list((tmp_path / key).rglob("checkpoints/*"))


def test_class_subset_outside_the_dataset(capsys, tmp_path):
    argv = ["train", "lenet5_digits", "--workdir", tmp_path / "run", "--no-pictures", *SYNTHETIC]
    assert_user_error(
        run_cli(capsys, [*argv, "dataset.classes=[0,12]"]),
        "classes=[0, 12]: expected distinct class indices in [0, 10)",
    )


# ----------------------------------------------------------------------------------------------
# Labels outside [0, num_classes): checked when a split is loaded, naming dataset and label
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def bad_synthetic_labels(monkeypatch):
    """The synthetic dataset with label 10 at example 3 and -1 at example 5 (10 classes)."""
    from cnn_jax.data import loading

    real = loading.synthetic_arrays

    def with_bad_labels(*args, **kwargs):
        images, labels = real(*args, **kwargs)
        labels = labels.copy()
        labels[3], labels[5] = 10, -1
        return images, labels

    monkeypatch.setattr(loading, "synthetic_arrays", with_bad_labels)


def test_labels_outside_range_library(bad_synthetic_labels):
    from cnn_jax.data import load_split_arrays
    from cnn_jax.data.loading import check_labels

    with pytest.raises(DataError) as e:
        load_split_arrays("synthetic", "train")
    assert str(e.value).startswith(
        "dataset 'synthetic' split 'train': label 10 (example 3) is outside the valid range "
        "[0, 10) (2 of 1024 labels are)"
    )
    with pytest.raises(DataError, match=r"label -1 \(example 0\) is outside the valid range"):
        check_labels(np.array([-1, 0]), 2, dataset="d", split="test")
    check_labels(np.array([0, 1, 1]), 2, dataset="d", split="test")  # valid: no error
    check_labels(np.zeros(0, np.int32), 2, dataset="d", split="test")


def test_labels_outside_range_cli(capsys, tmp_path, bad_synthetic_labels):
    argv = ["train", "lenet5_digits", "--workdir", tmp_path / "run", "--no-pictures", *SYNTHETIC]
    result = run_cli(capsys, argv)
    assert_user_error(result, "label 10 (example 3) is outside the valid range [0, 10)")
    assert "cnn-jax: error: dataset 'synthetic' split " in result[2]


# ----------------------------------------------------------------------------------------------
# Model input of the wrong rank, channel count or size (library calls)
# ----------------------------------------------------------------------------------------------

MODEL_CASES = [
    # (id, model, options, shape the variables were made for (None: init with x), x shape, message)
    ("rank-3", "lenet5", {}, (28, 28, 1), (28, 28, 1),
     "LeNet5 expects images of shape [N, H, W, C]; got an input of shape (28, 28, 1)"),
    ("rank-5", "resnet18", {}, (32, 32, 3), (2, 1, 32, 32, 3),
     "ResNet expects images of shape [N, H, W, C]; got an input of shape (2, 1, 32, 32, 3)"),
    ("rank-1-mlp", "mlp", {}, (28, 28, 1), (784,), "MLP expects a batch [N, ...]"),
    ("channels", "lenet5", {}, (28, 28, 1), (2, 28, 28, 3),
     ("layer 'block1/conv1' expects 1 input channel (its kernel is 5x5x1x6); got 3 "
     "(layer input shape (2, 28, 28, 3))")),
    ("channels-nchw", "lenet5", {}, (28, 28, 1), (2, 1, 28, 28),
     "layer 'block1/conv1' expects 1 input channel (its kernel is 5x5x1x6); got 28"),
    ("channels-resnet", "resnet18", {"cifar_stem": True}, (32, 32, 3), (2, 32, 32, 1),
     "layer 'conv1' expects 3 input channels (its kernel is 3x3x3x64); got 1"),
    ("size-flatten-head", "lenet5", {}, (28, 28, 1), (2, 32, 32, 1),
     "layer 'head/hidden1' expects 400 input features (its kernel is 400x120); got 576"),
    ("size-simple-convnet", "simple_convnet", {}, (32, 32, 3), (2, 64, 64, 3),
     "layer 'head/hidden1' expects 2048 input features (its kernel is 2048x128); got 8192"),
    ("size-mlp", "mlp", {}, (28, 28, 1), (2, 32, 32, 1),
     "layer 'head/hidden1' expects 784 input features (its kernel is 784x512); got 1024"),
    ("too-small", "lenet5", {}, None, (1, 2, 2, 1),
     ("input too small: layer 'block2/conv1' (conv window 5x5, stride 1x1, padding 'VALID') "
     "would produce an empty -3x-3 output from its 1x1 input (layer input shape (1, 1, 1, 6))")),
    ("too-small-densenet", "densenet121", {}, None, (1, 16, 16, 3),
     "input too small: layer 'transition3/pool'"),
    ("too-small-given-variables", "simple_convnet", {}, (32, 32, 3), (2, 4, 4, 3),
     "input too small: layer 'block3/pool'"),
]  # fmt: skip


@pytest.mark.parametrize(
    "name, options, made_for, shape, message",
    [c[1:] for c in MODEL_CASES],
    ids=[c[0] for c in MODEL_CASES],
)
def test_model_input_errors(name, options, made_for, shape, message):
    """Shapes only (jax.eval_shape): nothing is computed, yet the error is a ShapeError."""
    from cnn_jax.models import get_model

    model = get_model(name, num_classes=10, **options)
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    with pytest.raises(ShapeError) as e:
        if made_for is None:
            jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), x)
        else:
            made = jax.ShapeDtypeStruct((1, *made_for), jnp.float32)
            variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), made)
            jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
    assert message in str(e.value)


def test_model_input_errors_eager_and_jitted():
    """The same errors from real arrays, under jit and called eagerly."""
    from cnn_jax.models import get_model

    model = get_model("lenet5", num_classes=10)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1))))
    variables = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    for x, fragment, eager in (
        (jnp.zeros((2, 28, 28, 3)), "expects 1 input channel", True),
        (jnp.zeros((28, 28)), "expects images of shape [N, H, W, C]", True),
        # eagerly, the convolutions before the head would run (and compile) first
        (jnp.zeros((2, 32, 32, 1)), "expects 400 input features", False),
    ):
        with pytest.raises(ShapeError, match=re.escape(fragment)):
            jax.jit(model.apply)(variables, x)
        if eager:
            with pytest.raises(ShapeError, match=re.escape(fragment)):
                model.apply(variables, x)


# ----------------------------------------------------------------------------------------------
# predict on missing, empty, non-image and huge (decompression-bomb) files
# ----------------------------------------------------------------------------------------------

TINY_CONFIG = """
from cnn_jax.config import default_config

def get_config():
    c = default_config()
    c.model.name = "mlp"
    c.model.options.hidden_features = (8,)
    c.dataset.name = "synthetic"
    c.dataset.synthetic_shape = [8, 8, 1]
    c.dataset.synthetic_size = 16
    c.train.batch_size = 8
    c.train.eval_batch_size = 8
    c.checkpoint.async_save = False
    return c
"""


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["train", "lenet5_digits", SET, "dataset.image_size=1000000000000"],
         "dataset.image_size: one batch of 64 float32 images of 1000000000000x1000000000000x1"),
        (["train", "lenet5_digits", SET, "dataset.image_size=100000"], "GiB, more than this machine"),
        (["bench", "lenet5", "--batch-size", "100000000"],
         "batch_size: one batch of 100,000,000 float32 images of 28x28x1 needs"),
    ],
    ids=["image-size-1e12", "image-size-1e5", "bench-batch-1e8"],
)  # fmt: skip
def test_batches_beyond_this_machines_memory_are_refused_up_front(capsys, tmp_path, argv, fragment):
    """Used to end in an XLA or numpy allocation traceback (or a MemoryError)."""
    workdir = ["--workdir", tmp_path / "run", "--no-pictures"] if argv[0] == "train" else []
    assert_user_error(run_cli(capsys, [*argv, *workdir]), fragment)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["export", "--out", "{file}/params.npz"], "is a file, not a folder"),
        (["visualize", "curves", "--out", "{file}/curves.png"], "is a file, not a folder"),
        (["visualize", "feature-maps", "--out", "{file}"], "is a file, not a folder"),
    ],
    ids=["export-out", "visualize-out", "feature-maps-out"],
)
def test_outputs_under_a_regular_file(capsys, tmp_path, trained, argv, fragment):
    """Used to end in a FileExistsError traceback."""
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    argv = [a.replace("{file}", str(blocker)) for a in argv]
    assert_user_error(run_cli(capsys, [*argv, "--workdir", trained]), fragment)


def test_workdir_under_a_regular_file(capsys, tmp_path):
    (tmp_path / "a_file").write_text("x")
    argv = ["train", "lenet5_digits", "--workdir", tmp_path / "a_file" / "run", "--no-pictures"]
    assert_user_error(run_cli(capsys, argv), "a_file' is a file, not a folder")


def test_eval_batch_far_beyond_the_test_split_just_evaluates(capsys, trained):
    """train.eval_batch_size=1e9 used to train, then die allocating the padded eval batch; a
    batch beyond the split only adds padding, so it is capped at the split's size."""
    config = trained.parent / "tiny.py"
    assert cli.main(["eval", str(config), "--workdir", str(trained)]) == 0
    normal = capsys.readouterr().out
    argv = ["eval", config, "--workdir", trained, SET, "train.eval_batch_size=1000000000"]
    assert cli.main([str(a) for a in argv]) == 0
    huge = capsys.readouterr().out
    accuracy = lambda text: re.search(r"accuracy \S+", text).group(0)
    assert accuracy(huge) == accuracy(normal)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A workdir of a tiny MLP trained for 2 steps on 8x8 synthetic images."""
    root = tmp_path_factory.mktemp("bad_input_trained")
    (root / "tiny.py").write_text(TINY_CONFIG)
    argv = ["train", str(root / "tiny.py"), "--workdir", str(root / "run"), "--max-steps", "2"]
    assert cli.main([*argv, "--no-pictures"]) == 0
    return root / "run"


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header declares width x height 8-bit grey pixels, with no pixel data: a
    few dozen bytes that a decoder without a size limit would expand to width*height bytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def predict_inputs(folder: Path) -> dict[str, Path]:
    Image.new("L", (20, 20), 200).save(folder / "ok.png")
    noise = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "noise.png")
    whole = (folder / "noise.png").read_bytes()  # ~4 kB, mostly pixel data
    (folder / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.png").write_text("these are my notes, not a picture\n")
    (folder / "a_folder.png").mkdir()
    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(folder / "float.tif")
    return {
        "ok": folder / "ok.png",
        "missing": folder / "missing.png",
        "folder": folder / "a_folder.png",
        "empty": folder / "empty.png",
        "text": folder / "notes.png",
        "truncated": folder / "truncated.png",
        # 2.5e9 pixels: above 2 x Image.MAX_IMAGE_PIXELS, Pillow's DecompressionBombError
        "bomb": png_header_only(folder / "bomb.png", 50_000, 50_000),
        # 1e8 pixels: above MAX_IMAGE_PIXELS only, Pillow's DecompressionBombWarning
        "bomb_warning": png_header_only(folder / "bomb_warning.png", 10_000, 10_000),
        # 32-bit float pixels: no defined range (16-bit ones are scaled, tests/data/test_images)
        "float32": folder / "float.tif",
    }


PREDICT_CASES = [
    ("missing", "does not exist or is not a file"),
    ("folder", "does not exist or is not a file"),
    ("empty", "is not a readable PNG or JPEG image (0 bytes)"),
    ("text", "is not a readable PNG or JPEG image (34 bytes)"),
    ("truncated", "could not be decoded"),
    ("bomb", "is too large to decode safely"),
    ("bomb_warning", "is too large to decode safely"),
    ("float32", "32-bit floating-point pixels (Pillow mode 'F') have no defined range"),
]


@pytest.mark.parametrize("case, fragment", PREDICT_CASES, ids=[c for c, _ in PREDICT_CASES])
def test_predict_bad_image(capsys, tmp_path, trained, case, fragment):
    assert Image.MAX_IMAGE_PIXELS  # Pillow's decompression-bomb limit is on
    files = predict_inputs(tmp_path)
    code, out, err = run_cli(capsys, ["predict", "--workdir", trained, files["ok"], files[case]])
    assert_user_error((code, out, err), fragment)
    assert f"image {str(files[case])!r}" in err  # names the file
    assert out == ""  # every image is read before any result is printed


def test_predict_good_image(capsys, tmp_path, trained):
    files = predict_inputs(tmp_path)
    code, out, err = run_cli(capsys, ["predict", "--workdir", trained, files["ok"], "--top-k", "2"])
    assert code == 0, err
    assert out.startswith(f"{files['ok']}: ") and out.count("%") == 2


# ----------------------------------------------------------------------------------------------
# data import: truncated IDX files, wrong magic numbers, unsafe archives, code-running pickles
# ----------------------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    magic = (0x0800 | array.ndim) if magic is None else magic
    head = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return head + array.astype(np.uint8).tobytes()


class Raw(bytes):
    """File content written byte for byte (not gzip-compressed)."""


def write_mnist(folder: Path, change=None) -> Path:
    """The four MNIST IDX files (tiny: 12 train, 5 test images), gzip-compressed; `change(files)`
    edits the {file name: bytes} first (a `Raw` value is written as it is)."""
    rng = np.random.default_rng(0)
    files = {}
    for prefix, n in (("train", 12), ("t10k", 5)):
        files[f"{prefix}-images-idx3-ubyte.gz"] = idx_bytes(rng.integers(0, 256, (n, 28, 28)))
        files[f"{prefix}-labels-idx1-ubyte.gz"] = idx_bytes(rng.integers(0, 10, n))
    if change:
        change(files)
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data if isinstance(data, Raw) else gzip.compress(data))
    return folder


def _set(name, data):
    return lambda files: files.__setitem__(name, data)


def _cut(name, keep):
    return lambda files: files.__setitem__(name, files[name][:keep])


def _gzip_cut(files):  # a gzip stream cut in half
    data = gzip.compress(files["train-images-idx3-ubyte.gz"])
    files["train-images-idx3-ubyte.gz"] = Raw(data[: len(data) // 2])


def _gzip_corrupt_block(files):  # the first deflate block header: final, reserved type 3
    data = bytearray(gzip.compress(files["train-images-idx3-ubyte.gz"]))
    data[10] = 0xFF
    files["train-images-idx3-ubyte.gz"] = Raw(data)


def _gzip_bomb(files):  # valid images, then 32 MiB of zeros: a 32 kB file
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    body = packer.compress(files["train-images-idx3-ubyte.gz"])
    body += b"".join(packer.compress(bytes(1 << 20)) for _ in range(32)) + packer.flush()
    files["train-images-idx3-ubyte.gz"] = Raw(body)


def idx_header(*dims: int) -> bytes:
    return (0x0800 | len(dims)).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)


TRAIN_IMAGES = "train-images-idx3-ubyte.gz"
IDX_CASES = [
    ("truncated-data", _cut(TRAIN_IMAGES, 16 + 100),
     ("train-images-idx3-ubyte.gz: truncated: the header says 12x28x28 = 9408 bytes of data, "
     "the file holds 100")),
    ("truncated-header", _cut(TRAIN_IMAGES, 6),
     "train-images-idx3-ubyte.gz: truncated IDX file: 6 bytes, shorter than its header"),
    ("empty-file", _cut("t10k-labels-idx1-ubyte.gz", 0), "truncated IDX file: 0 bytes"),
    ("trailing-data", lambda f: f.__setitem__(TRAIN_IMAGES, f[TRAIN_IMAGES] + b"\0"),
     "has trailing data"),
    ("magic-of-labels", _set(TRAIN_IMAGES, idx_bytes(np.zeros((12, 28, 28)), magic=0x0801)),
     "train-images-idx3-ubyte.gz: wrong magic number 0x00000801; expected 0x00000803"),
    ("magic-of-a-zip", _set(TRAIN_IMAGES, b"PK\x03\x04" + bytes(12 + 9408)),
     "wrong magic number 0x504b0304; expected 0x00000803"),
    ("magic-float-idx", _set(TRAIN_IMAGES, idx_bytes(np.zeros((12, 28, 28)), magic=0x0D03)),
     "wrong magic number 0x00000d03"),
    ("gzip-cut", _gzip_cut, "train-images-idx3-ubyte.gz: cannot read IDX file (EOFError"),
    ("image-size", _set(TRAIN_IMAGES, idx_bytes(np.zeros((12, 32, 32)))),
     "images are (32, 32), expected 28x28"),
    ("label-count", _set("train-labels-idx1-ubyte.gz", idx_bytes(np.zeros(11))),
     "11 labels for the 12 images"),
    ("label-range", _set("train-labels-idx1-ubyte.gz", idx_bytes(np.full(12, 12))),
     "label 12 outside 0..9"),
    ("missing-file", lambda f: f.pop("t10k-labels-idx1-ubyte.gz"),
     "t10k-labels-idx1-ubyte.gz: missing (expected the IDX file t10k-labels-idx1-ubyte[.gz])"),
    # issue 12: corrupt gzip data, sizes that overflow or exceed the limit, bombs, no images
    ("gzip-corrupt-block", _gzip_corrupt_block,
     ("train-images-idx3-ubyte.gz: cannot read IDX file (corrupt gzip data: Error -3 while "
      "decompressing data: invalid block type)")),
    ("dims-overflow-int64", _set(TRAIN_IMAGES, idx_header(2**31, 2**31, 4)),
     ("train-images-idx3-ubyte.gz: the header declares 2147483648x2147483648x4 = "
      "18446744073709551616 bytes of data, more than the 1073741824 bytes")),
    ("dims-huge", _set("t10k-labels-idx1-ubyte.gz", idx_header(2**32 - 1)),
     "t10k-labels-idx1-ubyte.gz: the header declares 4294967295 = 4294967295 bytes of data"),
    ("gzip-bomb", _gzip_bomb,
     ("train-images-idx3-ubyte.gz: has trailing data: the header says 12x28x28 = 9408 bytes "
      "of data, the file holds more")),
    ("zero-images", lambda f: f.update({"t10k-images-idx3-ubyte.gz": idx_header(0, 28, 28),
                                        "t10k-labels-idx1-ubyte.gz": idx_header(0)}),
     ("t10k-images-idx3-ubyte.gz: holds 0 images (the header says 0x28x28); expected at least "
      "one")),
]  # fmt: skip


@pytest.mark.parametrize(
    "change, fragment", [c[1:] for c in IDX_CASES], ids=[c[0] for c in IDX_CASES]
)
def test_data_import_bad_idx(capsys, tmp_path, change, fragment):
    source = write_mnist(tmp_path / "src", change)
    data_dir = tmp_path / "tfds_out"
    argv = ["data", "import", "mnist", "--from", source, "--data-dir", data_dir]
    assert_user_error(run_cli(capsys, argv), fragment)
    assert not (data_dir / "mnist").exists()  # nothing half-written


class RunsCode:
    """Pickles to a call of `func(*args)`: what a malicious "CIFAR batch" would hold."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def evil_pickles(marker: Path) -> dict[str, bytes]:
    """Pickles that would create `marker` if they were loaded with pickle.load."""
    return {
        "os.system": pickle.dumps(RunsCode(os.system, f"touch {marker}")),
        "io.open": pickle.dumps(RunsCode(open, str(marker), "w")),
        # the call hidden inside an otherwise valid-looking batch dict, protocol 2 as CIFAR's
        "nested": pickle.dumps(
            {b"batch_label": b"x", b"data": RunsCode(os.system, f"touch {marker}")}, protocol=2
        ),
    }


def tar_with(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


ARCHIVE_CASES = [
    # (id, members, message)
    ("dot-dot", [("cifar-10-batches-py/../../evil.txt", tarfile.REGTYPE, "")],
     ("refusing archive member 'cifar-10-batches-py/../../evil.txt', which escapes the target "
     "folder ('..')")),
    ("leading-dot-dot", [("../evil.txt", tarfile.REGTYPE, "")], "which escapes the target folder"),
    ("absolute", [("{tmp}/evil.txt", tarfile.REGTYPE, "")],
     "refusing archive member '{tmp}/evil.txt', which has an absolute path"),
    ("windows-absolute", [("C:\\evil.txt", tarfile.REGTYPE, "")], "which has an absolute path"),
    ("symlink", [("cifar-10-batches-py/batches.meta", tarfile.SYMTYPE, "/etc/passwd")],
     ("refusing archive member 'cifar-10-batches-py/batches.meta', which is a link (to "
     "'/etc/passwd')")),
    ("symlink-dir", [("cifar-10-batches-py", tarfile.SYMTYPE, "../..")], "which is a link"),
    ("hardlink", [("cifar-10-batches-py/batches.meta", tarfile.LNKTYPE, "/etc/passwd")],
     "which is a link"),
    ("device", [("cifar-10-batches-py/batches.meta", tarfile.CHRTYPE, "")],
     "which is not a regular file or folder"),
    ("fifo", [("cifar-10-batches-py/batches.meta", tarfile.FIFOTYPE, "")],
     "which is not a regular file or folder"),
]  # fmt: skip


@pytest.mark.parametrize(
    "members, fragment", [c[1:] for c in ARCHIVE_CASES], ids=[c[0] for c in ARCHIVE_CASES]
)
def test_data_import_unsafe_archive(capsys, tmp_path, members, fragment):
    (tmp_path / "inner").mkdir()
    entries = [(member("cifar-10-batches-py", tarfile.DIRTYPE), None)]
    for name, kind, link in members:
        data = b"pwned\n" if kind == tarfile.REGTYPE else None
        entries.append((member(name.format(tmp=tmp_path), kind, link), data))
    archive = tar_with(tmp_path / "inner" / "cifar-10-python.tar.gz", entries)
    data_dir = tmp_path / "inner" / "tfds"
    argv = ["data", "import", "cifar10", "--from", archive, "--data-dir", data_dir]
    assert_user_error(run_cli(capsys, argv), fragment.format(tmp=tmp_path))
    assert not list(tmp_path.rglob("evil.txt"))  # nothing was extracted anywhere
    assert not (data_dir / "cifar10").exists()


def test_data_import_not_an_archive(capsys, tmp_path):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b" + b"not really gzip")
    argv = ["data", "import", "cifar10", "--from", tmp_path / "cifar-10-python.tar.gz"]
    assert_user_error(run_cli(capsys, argv), "not a readable tar archive")


@pytest.mark.parametrize("how", ["os.system", "io.open", "nested"])
@pytest.mark.parametrize("source", ["tarball", "folder"])
def test_data_import_pickle_that_runs_code(capsys, tmp_path, how, source):
    marker = tmp_path / "pwned"
    payload = evil_pickles(marker)[how]
    name = "batches.meta" if how != "nested" else "data_batch_1"
    meta = pickle.dumps({b"label_names": [b"cat", b"dog"]}, protocol=2)
    files = {"batches.meta": meta, name: payload}
    if source == "tarball":
        entries = [(member(f"cifar-10-batches-py/{n}"), d) for n, d in files.items()]
        where = tar_with(tmp_path / "cifar-10-python.tar.gz", entries)
    else:
        where = tmp_path / "cifar-10-batches-py"
        where.mkdir()
        for n, d in files.items():
            (where / n).write_bytes(d)
    argv = ["data", "import", "cifar10", "--from", where, "--data-dir", tmp_path / "tfds"]
    refused = {"os.system": "posix.system", "io.open": "io.open", "nested": "posix.system"}[how]
    assert_user_error(run_cli(capsys, argv), f"{name}: refusing to unpickle {refused}")
    assert not marker.exists()  # the code did not run


def test_data_import_not_a_pickle(capsys, tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "batches.meta").write_bytes(b"\x80\x02}q\x00(X")  # cut off
    argv = ["data", "import", "cifar10", "--from", folder, "--data-dir", tmp_path / "tfds"]
    assert_user_error(run_cli(capsys, argv), "batches.meta: not a readable pickle file")


def test_data_import_bad_image_folder(capsys, tmp_path):
    tree = tmp_path / "tree"
    for label in ("cat", "dog"):
        (tree / label).mkdir(parents=True)
        Image.new("L", (8, 8), 100).save(tree / label / "a.png")
    base = ["data", "import", "my_pets", "--from", tree, "--data-dir", tmp_path / "tfds"]
    (tree / "dog" / "b.png").write_text("not an image")
    assert_user_error(run_cli(capsys, base), f"{tree / 'dog' / 'b.png'}: not a readable image")
    png_header_only(tree / "dog" / "b.png", 50_000, 50_000)
    assert_user_error(run_cli(capsys, base), "DecompressionBombError")
    (tree / "dog" / "b.png").unlink()
    (tree / "bird").mkdir()
    assert_user_error(run_cli(capsys, base), f"{tree / 'bird'}: no image files")
    (tree / "bird").rmdir()
    assert_user_error(
        run_cli(capsys, ["data", "import", "Pets!", "--from", tree]),
        "dataset name 'Pets!': expected lowercase letters",
    )
    assert_user_error(
        run_cli(capsys, ["data", "import", "mnist", "--from", tree / "cat" / "a.png"]),
        "expected a folder holding the four IDX files",
    )
    assert_user_error(
        run_cli(capsys, ["data", "import", "mnist", "--from", tmp_path / "nowhere"]),
        "does not exist",
    )
    assert not (tmp_path / "tfds" / "my_pets").exists()


@pytest.mark.parametrize(
    "where, problem",
    [("a_file", "is a file, not a folder"),
     ("a_file/sub", "cannot be created: '{tmp}/a_file' is a file, not a folder")],
)  # fmt: skip
def test_data_import_data_dir_is_or_lies_under_a_file(capsys, tmp_path, where, problem):
    (tmp_path / "a_file").write_text("")
    source = write_mnist(tmp_path / "src")
    argv = ["data", "import", "mnist", "--from", source, "--data-dir", tmp_path / where]
    fragment = f"data dir '{tmp_path / where}' {problem.format(tmp=tmp_path)}"
    assert_user_error(run_cli(capsys, argv), fragment)


# ----------------------------------------------------------------------------------------------
# A dataset that is not prepared, on the streaming input path too (issue 12 item 13)
# ----------------------------------------------------------------------------------------------

NOT_PREPARED_CASES = [
    ("streaming-mnist", ["lenet5_mnist", SET, "dataset.feeder=streaming"],
     ("dataset 'mnist' (tfds 'mnist') is not prepared in data dir '{tfds}', and nothing is "
      "downloaded at run time. Prepare it from files you already have with `cnn-jax data import "
      "mnist --from PATH [--data-dir DIR]`")),
    ("device-mnist", ["lenet5_mnist"], "dataset 'mnist' (tfds 'mnist') is not prepared"),
    # `data import` cannot prepare ImageNet: the message says how to instead
    ("imagenet", ["resnet50_imagenet"],
     ("dataset 'imagenet2012' (tfds 'imagenet2012') is not prepared in data dir '{tfds}', and "
      "nothing is downloaded at run time. `cnn-jax data import` does not read 'imagenet2012': "
      "prepare it with tensorflow-datasets (`tfds build imagenet2012 --data_dir DIR` with its "
      "archives in DIR/downloads/manual)")),
]  # fmt: skip


@pytest.mark.parametrize(
    "args, fragment", [c[1:] for c in NOT_PREPARED_CASES], ids=[c[0] for c in NOT_PREPARED_CASES]
)
def test_dataset_not_prepared(capsys, tmp_path, args, fragment):
    argv = ["train", *args, "--workdir", tmp_path / "run", "--max-steps", "1", "--no-pictures"]
    assert_user_error(run_cli(capsys, argv), fragment.format(tfds=tmp_path / "tfds"))


# ----------------------------------------------------------------------------------------------
# --help exits 0 on every subcommand (found from the parser, so new ones are covered)
# ----------------------------------------------------------------------------------------------


def all_commands(parser: argparse.ArgumentParser, prefix=()) -> list[tuple[str, ...]]:
    commands = [tuple(prefix)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                commands += all_commands(sub, (*prefix, name))
    return commands


COMMANDS = all_commands(cli.build_parser())


def test_every_command_is_listed():
    assert {"train", "eval", "predict", "export", "summary", "run"} <= {c[0] for c in COMMANDS[1:]}
    assert ("data", "import") in COMMANDS and ("visualize", "curves") in COMMANDS


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "cnn-jax")
def test_help_exits_0(capsys, command):
    code, out, err = run_cli(capsys, [*command, "--help"])
    assert code == 0, err
    assert out.startswith(f"usage: cnn-jax {' '.join(command)}".rstrip())
    assert err == ""


# ----------------------------------------------------------------------------------------------
# In a fresh interpreter: `python -m cnn_jax` exits 2 with one line and no traceback
# ----------------------------------------------------------------------------------------------


def python_m(args: list, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "cnn_jax", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        check=False,
        timeout=120,
    )


def test_subprocess_config_errors(tmp_path):
    write_config_files(tmp_path)
    for args, fragment in (
        (["train", "lenet5_digits", SET, "optimizer.learnig_rate=0.1"],
         "did you mean 'optimizer.learning_rate'"),
        (["train", "wrong_type.py"], "config key 'train.batch_size' has invalid value '64'"),
    ):  # fmt: skip
        done = python_m(args, tmp_path)
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith("cnn-jax: error: ") and fragment in done.stderr
        assert "Traceback" not in done.stdout + done.stderr
        assert len(done.stderr.strip().splitlines()) == 1


def test_subprocess_predict_bomb_and_evil_pickle(tmp_path, trained):
    bomb = png_header_only(tmp_path / "bomb.png", 50_000, 50_000)
    done = python_m(["predict", "--workdir", trained, bomb], tmp_path)
    assert done.returncode == 2, done.stderr
    assert "too large to decode safely" in done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    marker = tmp_path / "pwned"
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "batches.meta").write_bytes(evil_pickles(marker)["os.system"])
    done = python_m(["data", "import", "cifar10", "--from", folder, "--data-dir", "tfds"], tmp_path)
    assert done.returncode == 2, done.stderr
    assert "refusing to unpickle posix.system" in done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert not marker.exists()
