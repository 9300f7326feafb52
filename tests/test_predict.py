"""`cnn-jax predict` on images of the other polarity (issue 12 item 18): a dark digit on white
paper given to a model trained on light-on-dark digits (MNIST style) is inverted to match, with
a note, instead of being silently misclassified ('9 67.86%' for a black-on-white 3)."""

import numpy as np
import pytest
from PIL import Image

from cnn_jax import cli, predict

TINY = ["train.batch_size=8", "train.eval_batch_size=64", "checkpoint.async_save=False"]


def run(capsys, argv):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(workdir, its config) of LeNet-5 trained for 3 steps on the digits (light on dark)."""
    root = tmp_path_factory.mktemp("polarity")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TFDS_DATA_DIR", str(root / "tfds"))
        argv = ["train", "lenet5_digits", "--workdir", str(root / "run"), "--max-steps", "3"]
        assert cli.main([*argv, "--no-pictures", "--set", *TINY]) == 0
        from cnn_jax.train import load

        yield root / "run", load(root / "run")[2]


def results(out):
    """'path: 3 40.00%, ...' lines -> the part after the path, in order."""
    return [line.split(": ", 1)[1] for line in out.strip().splitlines()]


def test_dark_on_light_digit_is_inverted_to_match_training(trained, tmp_path, capsys):
    workdir, config = trained
    image, _, _ = predict.sample_test_image(config, "3")  # a real test image: 8x8 uint8
    light_on_dark, dark_on_light = tmp_path / "three.png", tmp_path / "three_on_paper.png"
    Image.fromarray(image[..., 0]).save(light_on_dark)
    Image.fromarray(255 - image[..., 0]).save(dark_on_light)
    # the same on "paper": scanned larger, RGB, and its light-on-dark twin
    big = Image.fromarray(image[..., 0]).resize((64, 64), Image.Resampling.NEAREST)
    big.convert("RGB").save(tmp_path / "big.png")
    Image.fromarray(255 - np.asarray(big)).convert("RGB").save(tmp_path / "big_on_paper.png")

    files = [light_on_dark, dark_on_light, tmp_path / "big.png", tmp_path / "big_on_paper.png"]
    code, out, err = run(capsys, ["predict", "--workdir", workdir, *files, "--top-k", "10"])
    assert code == 0, err
    original, on_paper, big_original, big_on_paper = results(out)
    assert on_paper == original  # the same input after inverting: the same class and numbers
    assert big_on_paper.split()[0] == big_original.split()[0]
    assert err.count("\n") == 1 and "note: inverted" in err  # one line, naming what it inverted
    assert str(dark_on_light) in err and str(tmp_path / "big_on_paper.png") in err
    assert f"{light_on_dark}," not in err and f"{light_on_dark} " not in err
    assert "--polarity as-is" in err

    # overrides: as-is (or --no-invert) keeps the paper image as it is; --invert always inverts
    for flags in (["--polarity", "as-is"], ["--no-invert"]):
        argv = ["predict", "--workdir", workdir, dark_on_light, "--top-k", "10", *flags]
        code, out, err = run(capsys, argv)
        assert code == 0 and err == "" and results(out) != [original]
    for flags in (["--polarity", "invert"], ["--invert"]):
        argv = ["predict", "--workdir", workdir, dark_on_light, "--top-k", "10", *flags]
        code, out, err = run(capsys, argv)
        assert code == 0 and err == "" and results(out) == [original]  # asked for: no note
    argv = ["predict", "--workdir", workdir, light_on_dark, "--invert", "--no-invert"]
    code, _, err = run(capsys, argv)
    assert code == 2 and "not allowed with" in err


def test_training_background(trained, monkeypatch):
    """The built-in table agrees with a scan of the data; imported datasets are scanned."""
    _, config = trained
    assert predict.scan_background(config) == predict.KNOWN_BACKGROUNDS["digits"] == "dark"
    assert predict.training_background(config) == "dark"

    import cnn_jax.data

    rng = np.random.default_rng(0)
    photos = rng.integers(0, 256, (20, 16, 16, 3), dtype=np.uint8)
    paper = np.full((20, 16, 16, 1), 240, np.uint8)
    paper[:, 4:12, 6:10] = 20  # dark strokes on light paper
    for images, expected in ((photos, None), (paper, "light"), (255 - paper, "dark")):
        monkeypatch.setattr(
            cnn_jax.data, "load_split_arrays", lambda *a, images=images, **k: (images, None)
        )
        assert predict.scan_background(config) == expected
    # a dataset not in the table (an imported image folder) is scanned
    monkeypatch.setattr(cnn_jax.data, "load_split_arrays", lambda *a, **k: (paper, None))
    monkeypatch.delitem(predict.KNOWN_BACKGROUNDS, "digits")
    assert predict.training_background(config) == "light"


def test_opposite_polarity():
    paper = np.full((28, 28, 1), 250, np.uint8)
    paper[6:22, 12:16] = 10  # a dark stroke on white
    assert predict.opposite_polarity(paper, "dark")
    assert not predict.opposite_polarity(paper, "light")
    assert predict.opposite_polarity(255 - paper, "light")
    assert not predict.opposite_polarity(255 - paper, "dark")
    assert not predict.opposite_polarity(paper, None)  # photos: never inverted
    assert not predict.opposite_polarity(np.full((28, 28, 1), 255, np.uint8), "dark")  # blank
    grey = np.full((28, 28, 3), 128, np.uint8)
    grey[10:18, 10:18] = 255
    assert not predict.opposite_polarity(grey, "dark")  # a light shape: the border is the dark


def test_feature_pictures_say_which_layers_they_show(tmp_path, monkeypatch):
    """Of a deep model's conv and pooling layers only the first 8 are drawn: the title says so
    ('first 8 of 12 ...'); it did not."""
    from cnn_jax import viz
    from cnn_jax.config import load_config

    config = load_config("lenet5_digits")
    acts = {f"block{i}/conv": np.ones((4, 4, 2), np.float32) for i in range(12)}
    monkeypatch.setattr(predict, "layer_activations", lambda *a: acts)
    monkeypatch.setattr(predict, "predict_probs", lambda *a: np.full((1, 10), 0.1, np.float32))
    titles = []
    real = viz.plot_feature_maps
    monkeypatch.setattr(
        viz, "plot_feature_maps", lambda maps, path, title: titles.append((list(maps), title))
        or real(maps, path, title=title)
    )  # fmt: skip
    variables = {"params": {"conv": {"kernel": np.ones((3, 3, 1, 4), np.float32)}}}
    image = np.zeros((8, 8, 1), np.uint8)
    predict.save_feature_pictures(config, None, variables, tmp_path, image, "my image")
    ((shown, title),) = titles
    assert shown == ["input", *list(acts)[:8]]
    assert title == "my image (first 8 of 12 conv and pooling layers)"


def test_feature_maps_script_inverts_too(trained, tmp_path, capsys):
    """experiments/feature_maps.py --image: the same automatic inversion, with a note."""
    import importlib.util

    from cnn_jax.config import experiments_dir

    workdir, config = trained
    image, _, _ = predict.sample_test_image(config, "3")
    Image.fromarray(image[..., 0]).save(tmp_path / "three.png")
    Image.fromarray(255 - image[..., 0]).save(tmp_path / "paper.png")
    spec = importlib.util.spec_from_file_location("fm", experiments_dir() / "feature_maps.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    printed = []
    for name in ("three.png", "paper.png"):
        assert script.main(["--workdir", str(workdir), "--image", str(tmp_path / name)]) == 0
        printed.append(capsys.readouterr().out)
    assert "note: inverted" not in printed[0] and "note: inverted" in printed[1]
    probs = [[line.split(": ", 1)[1] for line in out.splitlines() if "png" in line and ": 0 " in line]
             for out in printed]  # fmt: skip
    assert probs[0] == probs[1] and len(probs[0]) == 1


def test_visualize_feature_maps_inverts_a_paper_image_too(trained, tmp_path, capsys):
    """`visualize feature-maps --image` had only --invert, so a dark-on-light digit was shown
    to the network as it is."""
    workdir, config = trained
    image, _, _ = predict.sample_test_image(config, "3")
    Image.fromarray(255 - image[..., 0]).save(tmp_path / "paper.png")
    argv = ["visualize", "feature-maps", "--workdir", workdir, "--image", tmp_path / "paper.png"]
    code, _, err = run(capsys, [*argv, "--out", tmp_path / "maps"])
    assert code == 0 and "note: inverted" in err and "paper.png" in err
    code, _, err = run(capsys, [*argv, "--out", tmp_path / "maps2", "--polarity", "as-is"])
    assert code == 0 and err == ""
