"""The `cnn-jax` command line: user errors, help, and the export/predict round trip."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnn_jax import cli, predict

REPO = Path(__file__).resolve().parent.parent
MISSING = "no/such/dir"


def run(capsys, argv):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


ERROR_CASES = [
    # argv, expected fragment of stderr
    ([], "required"),
    (["train"], "EXPERIMENT"),
    (["frobnicate"], "invalid choice"),
    (["train", "nope"], "unknown experiment 'nope'; expected one of: lenet5_digits"),
    (["train", "missing_config.py"], "config file 'missing_config.py' does not exist"),
    (["train", "lenet5_digits", "--set", "train.batchsize=3"], "did you mean 'train.batch_size'"),
    (["train", "lenet5_digits", "--set", "train.batch_size=abc"], "wrong type"),
    (["train", "lenet5_digits", "--set", "optimizer.learning_rate=-1"], "optimizer.learning_rate"),
    (["train", "lenet5_digits", "--set", "optimizer.name=sgdd"], "optimizer.name"),
    (["train", "lenet5_digits", "--set", "justakey"], "expected key=value"),
    (["train", "lenet5_digits", "--max-steps", "0"], "positive integer"),
    (["train", "lenet5_digits", "--set", "dataset.name=nope"], "unknown dataset 'nope'"),
    (["train", "lenet5_digits", "--set", "model.name=nope"], "unknown model 'nope'"),
    (["train", "lenet5_digits", "--set", "model.options.colour=3"], "has no option(s) 'colour'"),
    (["train", "lenet5_digits", "--set", "dataset.image_size=4"], "input too small"),
    (["eval", "lenet5_digits", "--workdir", MISSING], f"workdir '{MISSING}' does not exist"),
    (["eval", "lenet5_digits", "--checkpoint", "newest"], "'latest', 'best' or a step"),
    (["export", "--workdir", MISSING, "--out", "x.npz"], "does not exist"),
    (["export", "--workdir", MISSING], "--out"),
    (["predict", "--workdir", MISSING, "a.png"], "does not exist"),
    (["predict", "--workdir", MISSING, "a.png", "--top-k", "-1"], "positive integer"),
    (["summary", "lenet5", "--input-shape", "28,28"], "H,W,C"),
    (["data", "import", "mnist", "--from", MISSING], "does not exist"),
    (["data", "frob"], "invalid choice"),
    (["visualize", "curves", "--workdir", MISSING], "does not exist"),
    (["visualize", "filters"], "--workdir"),
    (["run", "nope"], "unknown script experiment 'nope'; expected one of: feature_maps, filters"),
    (["run", "lenet5_digits"], "unknown script experiment"),
    (["run", "filters", "--bogus"], "unrecognized arguments: --bogus"),
]


@pytest.mark.parametrize("argv, fragment", ERROR_CASES, ids=[" ".join(a) for a, _ in ERROR_CASES])
def test_user_errors_exit_2_with_message(capsys, argv, fragment):
    code, out, err = run(capsys, argv)
    assert code == 2
    assert fragment in err
    assert "error:" in err
    assert "Traceback" not in out + err


def test_broken_config_file(capsys, tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config(:\n")
    code, _, err = run(capsys, ["train", str(bad)])
    assert code == 2 and err.startswith("cnn-jax: error: could not load config file")
    (tmp_path / "none.py").write_text("x = 1\n")
    code, _, err = run(capsys, ["train", str(tmp_path / "none.py")])
    assert code == 2 and "defines no get_config()" in err


def test_error_message_is_one_paragraph(capsys, monkeypatch):
    from cnn_jax.errors import DataError

    def fail(args):
        raise DataError("first line\n\n  second line\n")

    monkeypatch.setattr(cli, "cmd_data_list", fail)
    code, _, err = run(capsys, ["data", "list"])
    assert code == 2
    assert err == "cnn-jax: error: first line; second line\n"


def test_missing_user_file_is_a_user_error(capsys, monkeypatch):
    def fail(args):
        Path("/no/such/file.txt").read_text()

    monkeypatch.setattr(cli, "cmd_data_list", fail)
    code, _, err = run(capsys, ["data", "list"])
    assert code == 2 and err == "cnn-jax: error: No such file or directory: /no/such/file.txt\n"


HELP_COMMANDS = [
    [],
    ["train"],
    ["eval"],
    ["export"],
    ["predict"],
    ["summary"],
    ["data"],
    ["data", "list"],
    ["data", "import"],
    ["visualize"],
    ["visualize", "filters"],
    ["visualize", "feature-maps"],
    ["visualize", "curves"],
    ["run"],
]


if importlib.util.find_spec("cnn_jax.bench") is not None:
    HELP_COMMANDS.append(["bench"])


@pytest.mark.parametrize("command", HELP_COMMANDS, ids=lambda c: " ".join(c) or "top")
def test_help_on_every_subcommand(capsys, command):
    code, out, _ = run(capsys, [*command, "--help"])
    assert code == 0
    assert out.startswith(f"usage: cnn-jax {' '.join(command)}".rstrip())


def test_parsing_is_light():
    """Building the parser and loading a config imports no numeric or ML library."""
    code = (
        "import sys; from cnn_jax import cli, config; cli.build_parser(); "
        "config.load_config('lenet5_digits'); "
        "print(sorted(m for m in ('jax', 'tensorflow', 'orbax', 'flax', 'matplotlib') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_python_dash_m_subprocess():
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    ok = subprocess.run(
        [sys.executable, "-m", "cnn_jax", "--help"],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert ok.returncode == 0 and "train" in ok.stdout and "predict" in ok.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "cnn_jax", "train", "nope"],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert bad.returncode == 2
    assert bad.stderr.startswith("cnn-jax: error: unknown experiment 'nope'")
    assert "Traceback" not in bad.stderr


@pytest.mark.skipif(importlib.util.find_spec("cnn_jax.bench") is None, reason="no bench module")
@pytest.mark.parametrize("flag", [[], ["--no-fast-paths"]], ids=["fast-paths", "no-fast-paths"])
def test_bench_json(capsys, flag):
    import json

    code, out, _ = run(
        capsys, ["bench", "lenet5", "--batch-size", "8", "--steps", "2", "--json", *flag]
    )
    assert code == 0
    result = json.loads(out)
    assert result["model"] == "lenet5" and result["batch_size"] == 8
    assert result["images_per_sec"] > 0 and result["compile_seconds"] >= 0 and result["device"]
    assert result["fast_paths"] is (not flag)


def test_read_image_errors(tmp_path, monkeypatch):
    from cnn_jax.errors import DataError

    with pytest.raises(DataError, match="does not exist"):
        predict.read_image(tmp_path / "missing.png", (28, 28, 1))
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(DataError, match="not a readable PNG or JPEG image"):
        predict.read_image(tmp_path / "empty.png", (28, 28, 1))
    (tmp_path / "text.jpg").write_text("hello")
    with pytest.raises(DataError, match="not a readable PNG or JPEG image"):
        predict.read_image(tmp_path / "text.jpg", (28, 28, 1))
    Image.new("L", (64, 64), 255).save(tmp_path / "big.png")
    head = (tmp_path / "big.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(head[: len(head) // 2])
    with pytest.raises(DataError, match="could not be decoded"):
        predict.read_image(tmp_path / "truncated.png", (28, 28, 1))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64x64 = 4096 > 1000: a "bomb"
    with pytest.raises(DataError, match="too large"):
        predict.read_image(tmp_path / "big.png", (28, 28, 1))


def test_read_image_converts_and_resizes(tmp_path):
    Image.new("RGB", (40, 30), (255, 0, 0)).save(tmp_path / "red.jpg")
    gray = predict.read_image(tmp_path / "red.jpg", (28, 28, 1))
    assert gray.shape == (28, 28, 1) and gray.dtype.name == "uint8"
    rgb = predict.read_image(tmp_path / "red.jpg", (32, 32, 3))
    assert rgb.shape == (32, 32, 3) and rgb[..., 0].mean() > 200 and rgb[..., 1].mean() < 50
    assert predict.read_image(tmp_path / "red.jpg", (8, 8, 1), invert=True).max() < 255


# ----------------------------------------------------------------------------------------------
# A tiny trained workdir: eval, export, predict, visualize, data
# ----------------------------------------------------------------------------------------------

TINY = ["train.batch_size=8", "train.eval_batch_size=8", "checkpoint.async_save=False"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(workdir, data dir) of lenet5_digits trained for 2 steps."""
    root = tmp_path_factory.mktemp("cli")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TFDS_DATA_DIR", str(root / "tfds"))
        argv = ["train", "lenet5_digits", "--workdir", str(root / "run"), "--max-steps", "2"]
        assert cli.main([*argv, "--no-pictures", "--set", *TINY]) == 0
        yield root / "run"


@pytest.mark.parametrize("viewer_installed", [False, True])
def test_tensorboard_hint_only_when_the_viewer_is_installed(trained, capsys, monkeypatch,
                                                            viewer_installed):  # fmt: skip
    """The printed `tensorboard --logdir` command failed with 'command not found' (TensorBoard is
    not a dependency): without it, the output names the event folder and how to get a viewer."""
    real = cli.importlib.util.find_spec
    fake = lambda name, *a: (
        (real("json") if viewer_installed else None) if name == "tensorboard" else real(name, *a)
    )
    monkeypatch.setattr(cli.importlib.util, "find_spec", fake)
    monkeypatch.setenv("TFDS_DATA_DIR", str(trained.parent / "tfds"))
    argv = [
        "train",
        "lenet5_digits",
        "--workdir",
        str(trained),
        "--max-steps",
        "2",
        "--no-pictures",
    ]
    code, out, _ = run(capsys, [*argv, "--set", *TINY])  # finished already: outputs only
    assert code == 0
    assert ("tensorboard --logdir" in out) is viewer_installed
    assert ("(view: pip install tensorboard)" in out) is not viewer_installed


def digit_png(path, label=8):
    """A digits test image of `label` as an 8x8 grayscale PNG."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    image = digits.images[np.flatnonzero(digits.target == label)[0]] * (255 / 16)
    Image.fromarray(image.astype(np.uint8), mode="L").save(path)
    return path


def test_eval(trained, capsys):
    code, out, _ = run(capsys, ["eval", "lenet5_digits", "--workdir", str(trained)])
    assert code == 0 and "accuracy" in out and "step 2" in out
    code, _, err = run(
        capsys, ["eval", "lenet5_digits", "--workdir", str(trained), "--checkpoint", "999"]
    )
    assert code == 2 and "999" in err and "Traceback" not in err


def test_export_round_trip(trained, tmp_path, capsys):
    import jax

    from cnn_jax.train import load, load_npz

    out_file = tmp_path / "lenet.npz"
    code, out, _ = run(capsys, ["export", "--workdir", str(trained), "--out", str(out_file)])
    assert code == 0 and "61,706 parameters" in out
    with np.load(out_file) as npz:
        assert "params/block1/conv1/kernel" in npz.files
    _, variables, _ = load(trained)
    restored = load_npz(out_file)
    assert jax.tree.structure(restored) == jax.tree.structure(variables)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(variables)):
        np.testing.assert_array_equal(a, b)
    code, _, err = run(capsys, ["export", "--workdir", str(trained), "--out", str(tmp_path / "x")])
    assert code == 2 and "ending in .npz" in err


def test_predict(trained, tmp_path, capsys):
    image = digit_png(tmp_path / "eight.png")
    Image.open(image).convert("RGB").resize((50, 40)).save(tmp_path / "eight.jpg")
    argv = ["predict", "--workdir", str(trained), str(image), str(tmp_path / "eight.jpg")]
    code, out, _ = run(capsys, [*argv, "--top-k", "2"])
    assert code == 0
    lines = out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(str(image))
    assert lines[0].count("%") == 2
    (tmp_path / "notes.txt").write_text("not an image")
    for bad, fragment in (
        (tmp_path / "missing.png", "does not exist"),
        (tmp_path / "notes.txt", "not a readable PNG or JPEG"),
    ):
        code, _, err = run(capsys, ["predict", "--workdir", str(trained), str(bad)])
        assert code == 2 and fragment in err and "Traceback" not in err


def test_visualize(trained, tmp_path, capsys):
    base = ["--workdir", str(trained)]
    for what in ("filters", "curves"):
        out_file = tmp_path / f"{what}.png"
        code, out, _ = run(capsys, ["visualize", what, *base, "--out", str(out_file)])
        assert code == 0 and out.strip() == f"wrote {out_file}"
        assert Image.open(out_file).format == "PNG"
    image = digit_png(tmp_path / "three.png", label=3)
    code, _, _ = run(
        capsys,
        ["visualize", "feature-maps", *base, "--image", str(image), "--out", str(tmp_path / "m")],
    )
    assert code == 0
    for name in ("filters.png", "feature_maps.png", "probabilities.png"):
        assert Image.open(tmp_path / "m" / name).format == "PNG"


def test_summary(capsys):
    code, out, _ = run(capsys, ["summary", "lenet5"])
    assert code == 0 and "Total params: 61,706" in out and "[1, 28, 28, 6]" in out
    code, out, _ = run(
        capsys, ["summary", "lenet5", "--input-shape", "32,32,1", "--num-classes", "4"]
    )
    assert code == 0 and "[1, 4]" in out
    code, _, err = run(capsys, ["summary", "nope"])
    assert code == 2 and "unknown model 'nope'" in err
    code, _, err = run(capsys, ["summary", "lenet5", "--input-shape", "4,4,1"])
    assert code == 2 and "input too small" in err and "Traceback" not in err


def test_data_list_and_import(tmp_path, capsys):
    import gzip

    code, out, _ = run(capsys, ["data", "list"])
    assert code == 0 and "digits" in out and "mnist" in out and "28x28x1" in out
    rng = np.random.default_rng(0)
    src = tmp_path / "idx"
    src.mkdir()
    for prefix, n in (("train", 12), ("t10k", 5)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            head = (0x0800 | array.ndim).to_bytes(4, "big")
            head += b"".join(d.to_bytes(4, "big") for d in array.shape)
            (src / f"{prefix}-{kind}-ubyte.gz").write_bytes(gzip.compress(head + array.tobytes()))
    data_dir = tmp_path / "tfds"
    argv = ["data", "import", "mnist", "--from", str(src), "--data-dir", str(data_dir)]
    code, out, err = run(capsys, argv)
    assert code == 0, err
    assert "imported mnist" in out
    code, _, err = run(capsys, argv)  # already there
    assert code == 2 and "Traceback" not in err
