"""The `cnn-jax` command line: user errors, help, and the export/predict round trip."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cnn_jax import cli, inference

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
    assert err == "cnn-jax: error: first line second line\n"


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
]


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


def test_read_image_errors(tmp_path, monkeypatch):
    from PIL import Image

    from cnn_jax.errors import DataError

    with pytest.raises(DataError, match="does not exist"):
        inference.read_image(tmp_path / "missing.png", (28, 28, 1))
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(DataError, match="not a readable PNG or JPEG image"):
        inference.read_image(tmp_path / "empty.png", (28, 28, 1))
    (tmp_path / "text.jpg").write_text("hello")
    with pytest.raises(DataError, match="not a readable PNG or JPEG image"):
        inference.read_image(tmp_path / "text.jpg", (28, 28, 1))
    Image.new("L", (64, 64), 255).save(tmp_path / "big.png")
    head = (tmp_path / "big.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(head[: len(head) // 2])
    with pytest.raises(DataError, match="could not be decoded"):
        inference.read_image(tmp_path / "truncated.png", (28, 28, 1))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64x64 = 4096 > 1000: a "bomb"
    with pytest.raises(DataError, match="too large"):
        inference.read_image(tmp_path / "big.png", (28, 28, 1))


def test_read_image_converts_and_resizes(tmp_path):
    from PIL import Image

    Image.new("RGB", (40, 30), (255, 0, 0)).save(tmp_path / "red.jpg")
    gray = inference.read_image(tmp_path / "red.jpg", (28, 28, 1))
    assert gray.shape == (28, 28, 1) and gray.dtype.name == "uint8"
    rgb = inference.read_image(tmp_path / "red.jpg", (32, 32, 3))
    assert rgb.shape == (32, 32, 3) and rgb[..., 0].mean() > 200 and rgb[..., 1].mean() < 50
    assert inference.read_image(tmp_path / "red.jpg", (8, 8, 1), invert=True).max() < 255
