"""The guides' figures for trained CNNs in one command: LeNet-5 on the digits (and on MNIST when
it is imported) and a VGG-16: first-layer filters, feature maps before and after the ReLU,
receptive fields, Zeiler & Fergus' top patches with their guided-backprop projections, inputs
optimised to excite a channel, and why a test "8" is an 8 (saliency, Grad-CAM, occlusion).

    cnn-jax run gallery [--out checkpoints/gallery] [--models lenet5_digits,lenet5_mnist,
        vgg16_digits] [--vgg-epochs 3]

Each model is taken from its workdir (checkpoints/<model>) and trained there first when it holds
no checkpoint: lenet5_digits as `cnn-jax train lenet5_digits` (about 15 s on 2 CPU cores),
lenet5_mnist as `cnn-jax train lenet5_mnist` (about a minute; skipped, with a note, while MNIST
is not imported), vgg16_digits as VGG-16-BN with the small CIFAR head on the digits at 32x32
(--vgg-epochs epochs, about 35 s each on 2 CPU cores). Writes OUT/<model>/*.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

from cnn_jax import explain, predict, viz
from cnn_jax.config import default_config, load_config, validate_config
from cnn_jax.data import get_dataset_info, load_split_arrays
from cnn_jax.errors import DataError
from cnn_jax.train import load, train_and_evaluate

MODELS = ("lenet5_digits", "lenet5_mnist", "vgg16_digits")


def vgg16_digits_config(epochs: int):
    """VGG-16-BN with the CIFAR head (14.7 M parameters) on the digits resized to 32x32."""
    config = default_config()
    config.experiment = "vgg16_digits"
    config.model.name = "vgg16_bn"
    config.model.options.head = "cifar"
    config.dataset.name = "digits"
    config.dataset.image_size = 32
    config.dataset.crop_padding = 2
    config.train.batch_size = 64
    config.train.num_epochs = epochs
    config.train.log_every_steps = 11
    config.optimizer.name = "adam"
    config.optimizer.learning_rate = 1e-3
    config.optimizer.schedule = "cosine"
    return validate_config(config)


# What to draw for each model: the layers of the feature maps (drawn before and after the ReLU),
# of the top patches (with the channels shown), of the activation maximisation (with the channels
# optimised; None: the classes) and of Grad-CAM (None: the last rectified conv map).
LENET = {
    "maps": ["block1/conv1", "block2/conv1", "head/hidden1", "head/hidden2", "head/logits"],
    "patches": [("block1/conv1:act", None), ("block2/conv1:act", None)],
    "maximize": [("block1/conv1", range(6)), ("block2/conv1", range(16)), (None, range(10))],
    "cam": None,
}
VGG = {  # at 32x32, block5's maps are 2x2: Grad-CAM at block3's 8x8 resolves more
    "maps": ["block1/norm1", "block3/norm3", "classifier/logits"],
    "patches": [("block1/norm2:act", range(16)), ("block3/norm3:act", range(16))],
    "maximize": [(None, range(10))],
    "cam": "block3/norm3:act",
}


def trained(name: str, workdir: Path, vgg_epochs: int):
    """(model, variables, config) of `name`'s run in `workdir`, training it first if needed."""
    if not (workdir / "checkpoints").is_dir():
        if name == "vgg16_digits":
            config = vgg16_digits_config(vgg_epochs)
        else:
            config = validate_config(load_config(name))
        predict.sample_test_image(config)  # an unprepared dataset fails here, before training
        print(f"{name}: no checkpoint in {workdir}: training it first", flush=True)
        results = train_and_evaluate(config, workdir)
        print(f"{name}: final test accuracy {results['final_test_accuracy']:.4f}", flush=True)
    return load(workdir, "latest")


def draw(name, model, variables, config, out: Path, plan: dict, k: int, steps: int) -> list[Path]:
    """Every picture of one model; returns the written paths."""
    names = predict.model_input(config)["class_names"]
    image, label, index = predict.sample_test_image(config, "8")
    title = f"{name}, test image {index} (label {names[label]})"
    x = np.asarray(predict.preprocess_for_model(config, image[None]))
    split = config.dataset.eval_split or get_dataset_info(config.dataset.name, config).test_split
    images, test_labels = load_split_arrays(config.dataset.name, split, config=config)
    data = np.concatenate([  # the model inputs of (up to 10,000 of) the test split
        np.asarray(predict.preprocess_for_model(config, images[i : i + 500]))
        for i in range(0, min(len(images), 10000), 500)
    ])  # fmt: skip
    written = []
    layer, kernel = predict.first_conv_kernel(variables["params"])
    written.append(
        viz.plot_filters(kernel, out / "filters.png", title=f"{name}: {layer} {kernel.shape}")
    )
    written += explain.save_activations(
        model, variables, x, out / "maps", layers=plan["maps"], title=title, class_names=names
    )
    boxes = {
        f"{path} ({size[0]}x{size[1]})": box
        for path, (box, size) in explain.centre_unit_boxes(model, x.shape[1:]).items()
        if path.startswith("block1/") or path.endswith("pool")
    }
    written.append(
        viz.plot_receptive_fields(
            x[0], boxes, out / "receptive_fields.png",
            title=f"{name}: what the centre unit of each layer sees",
        )
    )  # fmt: skip
    for layer, channels in plan["patches"]:
        paths, _ = explain.save_top_patches(
            model, variables, data, out / "top_patches" / f"{explain.layer_file_name(layer)}.png",
            layer=layer, k=k, channels=None if channels is None else list(channels),
            title=f"{name} on {config.dataset.name} {split}",
        )  # fmt: skip
        written += paths
    value_range = (data.min(axis=(0, 1, 2)), data.max(axis=(0, 1, 2)))
    for layer, channels in plan["maximize"]:
        file = f"maximize_{explain.layer_file_name(layer) if layer else 'classes'}.png"
        written.append(
            explain.save_maximized(
                model, variables, x.shape[1:], out / file, layer=layer, channels=list(channels),
                names=None if layer else names, title=name, value_range=value_range, steps=steps,
            )
        )  # fmt: skip
    if predict.training_background(config) == "dark":  # digits: light strokes on black
        evidence = stroke_evidence(model, variables, config, data, test_labels, plan["cam"])
        (out / "stroke_evidence.json").write_text(json.dumps(evidence, indent=1) + "\n")
        print(f"{name}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in evidence.items()))  # fmt: skip
    common = {"target": label, "class_name": names[label], "title": title}
    written.append(explain.save_saliency(model, variables, x, out / "saliency.png", **common))
    written.append(
        explain.save_grad_cam(
            model, variables, x, out / "grad_cam.png", layer=plan["cam"], **common
        )
    )
    written.append(explain.save_occlusion(model, variables, x, out / "occlusion.png", **common)[0])
    return written


def stroke_evidence(model, variables, config, data, labels, layer=None, n: int = 100) -> dict:
    """Where the explanations of the first `n` test digits put their evidence, against the
    strokes (pixels brighter than mid-range): the strokes' share of the image; the share of
    Grad-CAM's mass, and of Guided Grad-CAM's positive mass, on them; how often Grad-CAM's peak
    is on one (the pointing game); and the true class's mean probability with Grad-CAM's top
    quarter of pixels set to the background, against a random quarter."""
    x, labels = data[:n], np.asarray(labels[:n])
    strokes = x[..., 0] > (x.min() + x.max()) / 2
    cam, layer = explain.grad_cam(model, variables, x, labels, layer=layer)
    guided = np.maximum(explain.project(model, variables, x, channel=labels)[..., 0], 0) * cam

    def share(m):
        return float(np.mean((m * strokes).sum((1, 2)) / np.maximum(m.sum((1, 2)), 1e-12)))

    def p_true(blank):
        probs = np.asarray(
            jax.nn.softmax(explain.logits(model, variables, np.where(blank[..., None], x.min(), x)))
        )
        return float(probs[np.arange(len(x)), labels].mean())

    top = cam >= np.quantile(cam.reshape(len(x), -1), 0.75, axis=1)[:, None, None]
    peaks = cam.reshape(len(x), -1).argmax(1)
    return {
        "images": len(x), "grad_cam_layer": layer, "stroke_area": float(strokes.mean()),
        "grad_cam_on_strokes": share(cam), "guided_grad_cam_on_strokes": share(guided),
        "grad_cam_peak_on_a_stroke": float(strokes.reshape(len(x), -1)[np.arange(len(x)), peaks].mean()),
        "p_true": p_true(np.zeros_like(top)), "p_true_without_grad_cam_top_quarter": p_true(top),
        "p_true_without_a_random_quarter": p_true(np.random.default_rng(0).random(cam.shape) < 0.25),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="checkpoints/gallery", help="output folder")
    parser.add_argument(
        "--models",
        default=",".join(MODELS),
        help=f"comma-separated, from {', '.join(MODELS)} (default: all)",
    )
    parser.add_argument(
        "--workdir-root", default="checkpoints", help="where the models' workdirs are"
    )
    parser.add_argument("--vgg-epochs", type=int, default=3, help="when training VGG-16")
    parser.add_argument("-k", type=int, default=9, help="top patches per channel (default: 9)")
    parser.add_argument(
        "--steps", type=int, default=200, help="activation maximisation steps (default: 200)"
    )
    args = parser.parse_args(argv)
    chosen = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in chosen if m not in MODELS]
    if unknown or not chosen:
        parser.error(f"--models: unknown {unknown}; expected some of {', '.join(MODELS)}")

    for name in chosen:
        start = time.perf_counter()
        try:
            model, variables, config = trained(
                name, Path(args.workdir_root) / name, args.vgg_epochs
            )
        except DataError as e:
            if name != "lenet5_mnist":
                raise
            print(f"{name}: skipped: {e}", flush=True)
            continue
        plan = VGG if name.startswith("vgg") else LENET
        out = Path(args.out) / name
        written = draw(name, model, variables, config, out, plan, args.k, args.steps)
        print(*(f"wrote {p}" for p in written), sep="\n")
        print(f"{name}: {len(written)} pictures in {time.perf_counter() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
