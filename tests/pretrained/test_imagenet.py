"""ImageNet prediction: the class names read from tensorflow-datasets' files without TensorFlow,
torchvision's eval transform reproduced on real JPEG and PNG files, and `cnn-jax predict
--weights` end to end against torchvision's own top-5."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnn_jax import cli
from cnn_jax.errors import ConfigError, ShapeError
from cnn_jax.pretrained import imagenet, torch_compat


def torchvision_or_skip():
    if torch_compat.missing_reason():
        pytest.skip(torch_compat.missing_reason())
    return torch_compat.import_torchvision()


def photo(width, height, seed=0):
    """A smooth colour picture with edges (gradients, a disc, noise), uint8 [H, W, 3]."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    disc = ((x - 0.5) ** 2 + (y - 0.4) ** 2 < 0.05) * 90.0
    image = np.stack([200 * x + disc, 180 * y, 120 + 60 * np.sin(12 * x * y)], axis=-1)
    image += rng.normal(0, 12, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    """JPEG and PNG files: landscape, portrait, odd sizes, greyscale."""
    folder = tmp_path_factory.mktemp("images")
    files = {}
    for name, (w, h), mode, fmt in [
        ("landscape.jpg", (500, 375), "RGB", "JPEG"),
        ("portrait.png", (299, 457), "RGB", "PNG"),
        ("small.jpg", (260, 231), "RGB", "JPEG"),
        ("grey.png", (333, 300), "L", "PNG"),
    ]:
        image = Image.fromarray(photo(w, h, seed=len(files)))
        image.convert(mode).save(folder / name, fmt, quality=90)
        files[name] = folder / name
    return files


def test_class_names_and_wordnet_ids_without_tensorflow():
    code = (
        "import sys; from cnn_jax.pretrained import imagenet; names = imagenet.class_names(); "
        "ids = imagenet.wordnet_ids(); print(len(names), len(ids), names[0], '|', ids[0], '|', "
        "names[281], '|', 'tensorflow' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "1000 1000 tench, Tinca tinca | n01440764 | tabby, tabby cat | False"
    names = imagenet.class_names()
    assert len(set(names)) == 1000
    assert imagenet.wordnet_ids()[-1] == "n15075141" and names[-1].startswith("toilet tissue")
    assert imagenet.short_name(names[1]) == "goldfish"


def test_eval_transform_matches_torchvision_on_jpeg_and_png(image_files):
    """uint8 crops and normalised inputs against torchvision's `ResNet50_Weights.IMAGENET1K_V1
    .transforms()` (resize 256 antialiased, centre crop 224, mean/std) on PIL images."""
    torchvision = torchvision_or_skip()
    from torchvision import transforms

    geometry = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224)])
    weights_transform = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.transforms()
    std = np.float32(imagenet.TORCHVISION_STD) * 255
    for name, path in image_files.items():
        ours = imagenet.read_image(path)
        assert ours.shape == (224, 224, 3) and ours.dtype == np.uint8
        with Image.open(path) as im:
            rgb = im.convert("RGB")
            theirs = np.asarray(geometry(rgb))
            tensor = weights_transform(rgb).numpy().transpose(1, 2, 0)
        assert np.abs(ours.astype(int) - theirs).max() <= 1, name
        x = imagenet.preprocess(ours, "torchvision")
        grey_levels = np.abs(np.round((x - tensor) * std))
        assert grey_levels.max() <= 1, name


def test_resize_and_crop_arithmetic():
    assert imagenet.resized_size(500, 375) == (341, 256)
    assert imagenet.resized_size(299, 457) == (256, 391)
    crop = imagenet.center_crop(np.arange(5 * 6).reshape(5, 6, 1), 2)
    np.testing.assert_array_equal(
        crop[..., 0], [[14, 15], [20, 21]]
    )  # round(1.5) = 2, round(2) = 2
    with pytest.raises(ShapeError, match="cannot crop 9x9"):
        imagenet.center_crop(np.zeros((5, 6, 3)), 9)


def test_preprocessings():
    pixels = np.array([[[255, 128, 0]]], np.uint8)
    x = imagenet.preprocess(pixels, "torchvision")[0, 0]
    want = (np.array([1.0, 128 / 255, 0.0]) - imagenet.TORCHVISION_MEAN) / imagenet.TORCHVISION_STD
    np.testing.assert_allclose(x, want, rtol=1e-6)
    bgr = imagenet.preprocess(pixels, "keras_vgg")[0, 0]
    np.testing.assert_allclose(bgr, [0 - 103.939, 128 - 116.779, 255 - 123.68], rtol=1e-6)
    with pytest.raises(ConfigError, match="preprocessing 'caffe2' is not known"):
        imagenet.preprocess(pixels, "caffe2")


def readme_python(title: str) -> str:
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = text.index(f"### {title}")
    section = text[start : text.index("\n### ", start + 1)]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    return code


def test_predict_with_torchvision_weights_prints_torchvisions_top5(
    tmp_path, image_files, capsys, monkeypatch
):
    """`cnn-jax predict --model resnet18 --weights FILE` with random torchvision weights saved as
    .safetensors (ResNet-18: the README's resnet50 command at a quarter of the cost): the printed
    top-5 are torchvision's top-5 for the same files; the README's Python example gives the same
    probabilities."""
    torchvision = torchvision_or_skip()
    import safetensors.torch
    import torch

    torch.manual_seed(0)
    net = torchvision.models.resnet18().eval()
    with torch.no_grad():  # spread the logits: random BatchNorm statistics and a larger fc
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
        net.fc.weight.mul_(20.0)
    path = tmp_path / "resnet18.safetensors"
    safetensors.torch.save_file(net.state_dict(), str(path))
    files = [image_files["landscape.jpg"], image_files["portrait.png"]]
    code = cli.main(["predict", "--model", "resnet18", "--weights", str(path), *map(str, files)])
    out, err = capsys.readouterr()
    assert code == 0, err
    lines = out.strip().splitlines()
    transform = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.transforms()
    names = imagenet.class_names()
    for file, line in zip(files, lines, strict=True):
        with Image.open(file) as im:
            batch = transform(im.convert("RGB"))[None]
        with torch.no_grad():
            probs = torch.softmax(net(batch), dim=-1)[0]
        top = torch.topk(probs, 5)
        want = ", ".join(
            f"{imagenet.short_name(names[i])} {100 * float(p):.2f}%"
            for p, i in zip(top.values, top.indices)
        )
        assert line == f"{file}: {want}"
        assert len(re.findall(r"\d+\.\d\d%", line)) == 5
    monkeypatch.chdir(tmp_path)
    shutil.copy(files[0], tmp_path / "cat.jpg")
    namespace: dict = {}
    exec(compile(readme_python("ImageNet prediction"), "README.md", "exec"), namespace)  # noqa: S102
    assert namespace["fmt"] == "torchvision" and namespace["probs"].shape == (1, 1000)
    top = imagenet.top_k(namespace["probs"][0], 5)
    assert lines[0].endswith(
        ", ".join(f"{imagenet.short_name(names[i])} {100 * p:.2f}%" for i, p in top)
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--weights", "w.safetensors", "a.jpg"], "--weights needs --model NAME"),
        (["a.jpg"], "needs either --workdir DIR"),
        (["--workdir", ".", "--weights", "w.safetensors", "a.jpg"], "needs either --workdir"),
        (["--model", "resnet50", "--weights", "missing.safetensors", "a.jpg"], "does not exist"),
        (["--model", "resnet50", "--weights", "w.onnx", "a.jpg"], "set --weights-format to one"),
    ],
)
def test_predict_with_weights_user_errors(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w.onnx").write_bytes(b"0")
    assert cli.main(["predict", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cnn-jax: error: ") and message in err and "Traceback" not in err
