"""Keras' VGG-16 and VGG-19 in this zoo: the converter's checks (no Keras needed) and, with
Keras 3 on TensorFlow, parity with Keras' own outputs, both weight-file layouts, Keras' VGG
preprocessing and `cnn-jax predict` with a Keras file."""

from __future__ import annotations

import os

import numpy as np
import pytest

from cnn_jax.errors import ConfigError, DataError
from cnn_jax.pretrained import imagenet
from cnn_jax.pretrained import keras as keras_weights

h5py = pytest.importorskip("h5py")  # comes with TensorFlow (the 'full' extra)


def zero_keras_arrays(model_name: str):
    """Zero kernel and bias of every Keras VGG layer, in `get_weights()` order."""
    from cnn_jax.pretrained.keras import _expected_shapes

    shapes = _expected_shapes(model_name, 1000)
    return [
        np.zeros(shapes[(*path, leaf)], np.float32)
        for path in keras_weights.layer_map(model_name).values()
        for leaf in ("kernel", "bias")
    ]


def random_keras_arrays(model_name: str, seed: int = 0, logit_scale: float = 1.0):
    """Kernel and bias of every Keras VGG layer, in `get_weights()` order: He-scaled kernels (so
    the signal neither dies nor explodes through 16-19 ReLU layers) and small random biases."""
    from cnn_jax.pretrained.keras import _expected_shapes

    rng = np.random.default_rng(seed)
    shapes = _expected_shapes(model_name, 1000)
    arrays = []
    for layer, path in keras_weights.layer_map(model_name).items():
        kernel = shapes[(*path, "kernel")]
        scale = np.sqrt(2.0 / np.prod(kernel[:-1])) * (logit_scale if layer == "predictions" else 1)
        arrays.append((scale * rng.standard_normal(kernel)).astype(np.float32))
        arrays.append((0.1 * rng.standard_normal(shapes[(*path, "bias")])).astype(np.float32))
    return arrays


def test_converter_checks_the_weights(tmp_path):
    arrays = zero_keras_arrays("vgg16")
    arrays[26][:3, 0] = [1, 2, 3]  # fc1's kernel
    arrays[31][:] = np.arange(1000)  # the predictions' bias
    params = keras_weights.from_keras(arrays, "vgg16")["params"]
    assert params["block5"]["conv3"]["kernel"].shape == (3, 3, 512, 512)
    np.testing.assert_array_equal(params["classifier"]["hidden1"]["kernel"], arrays[26])
    np.testing.assert_array_equal(params["classifier"]["logits"]["bias"], arrays[31])
    with pytest.raises(DataError, match="has 32 weight arrays .* got 30"):
        keras_weights.from_keras(arrays[:30], "vgg16")
    by_layer = {name: arrays[2 * i : 2 * i + 2] for i, name in
                enumerate(keras_weights.layer_map("vgg16"))}  # fmt: skip
    notop = {k: v for k, v in by_layer.items() if not k.startswith(("fc", "predictions"))}
    with pytest.raises(DataError, match="missing layer.s. fc1, fc2, predictions"):
        keras_weights.from_keras(notop, "vgg16")
    with pytest.raises(DataError, match="missing layer.s. block3_conv4, block4_conv4, block5_"):
        keras_weights.from_keras(by_layer, "vgg19")
    by_layer["block1_conv1"] = [arrays[0].transpose(3, 2, 0, 1), arrays[1]]
    with pytest.raises(DataError, match=r"block1_conv1 kernel is \(64, 3, 3, 3\), expected"):
        keras_weights.from_keras(by_layer, "vgg16")
    with pytest.raises(ConfigError, match="Keras weights convert for: vgg16, vgg19"):
        keras_weights.from_keras(arrays, "resnet50")
    not_keras = tmp_path / "other.h5"
    with h5py.File(not_keras, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(DataError, match="is HDF5 but not a Keras weights file"):
        keras_weights.read_keras_weights(not_keras)
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(DataError, match="cannot read Keras weights file"):
        keras_weights.read_keras_weights(tmp_path / "text.h5")


@pytest.mark.heavy
def test_parity_with_keras_vgg16_and_vgg19(tmp_path, capsys):
    """Random weights in Keras' own VGGs (TensorFlow back end), the same 224x224 batch through
    Keras and through the converted zoo models: VGG-16 built without its softmax (logits),
    VGG-19 with it (probabilities), both within 1e-4 relative. Both file layouts Keras writes
    read back to the same arrays; Keras' `preprocess_input` is the "keras_vgg" preprocessing;
    `cnn-jax predict` with the VGG-16 file prints Keras' top-5."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    keras = pytest.importorskip("keras")
    from keras.src.legacy.saving import legacy_h5_format

    from cnn_jax import cli
    from cnn_jax.models import get_model
    from cnn_jax.pretrained import sources

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 224, 224, 3)).astype(np.uint8)
    x = imagenet.preprocess(images, "keras_vgg")
    keras_x = keras.applications.vgg16.preprocess_input(images.astype(np.float32))
    np.testing.assert_allclose(x, keras_x, rtol=1e-6, atol=1e-4)
    for name, activation in (("vgg16", None), ("vgg19", "softmax")):
        build = getattr(keras.applications, name.upper())
        net = build(weights=None, classifier_activation=activation)
        net.set_weights(random_keras_arrays(name, logit_scale=1e-3))  # spread probabilities
        want = np.asarray(net(keras_x, training=False))
        variables = keras_weights.from_keras(net.get_weights(), name)
        got = np.asarray(get_model(name, num_classes=1000).apply(variables, x, train=False))
        if activation == "softmax":
            got = np.exp(got - got.max(-1, keepdims=True))
            got /= got.sum(-1, keepdims=True)
            assert want.max() < 0.5  # the probabilities are spread, not one-hot
        relative = np.abs(got - want).max() / np.abs(want).max()
        assert relative < 1e-4, (name, relative)
        # the two HDF5 layouts: Keras 3's .weights.h5 and the older one of Keras' downloads
        net.save_weights(tmp_path / f"{name}.weights.h5")
        with h5py.File(tmp_path / f"{name}_legacy.h5", "w") as f:
            legacy_h5_format.save_weights_to_hdf5_group(f, net)
        for file in (f"{name}.weights.h5", f"{name}_legacy.h5"):
            from_file = keras_weights.from_keras(
                keras_weights.read_keras_weights(tmp_path / file), name
            )
            for a, b in zip(jax_leaves(from_file), jax_leaves(variables), strict=True):
                np.testing.assert_array_equal(a, b)
        if name == "vgg16":
            model, _, fmt = sources.load_model(tmp_path / f"{name}_legacy.h5", name)
            assert fmt == "keras" and model.num_classes == 1000
            image = tmp_path / "photo.jpg"
            from PIL import Image

            Image.fromarray(images[0, :200]).resize((300, 250)).save(image)
            argv = ["predict", "--model", name, "--weights", str(tmp_path / file), str(image)]
            assert cli.main(argv) == 0
            out = capsys.readouterr().out.strip()
            crop = imagenet.read_image(image)[None].astype(np.float32)
            logits = np.asarray(net(keras.applications.vgg16.preprocess_input(crop)))[0]
            probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
            top = np.argsort(-probs)[:5]
            names = [imagenet.short_name(n) for n in imagenet.class_names()]
            assert out == f"{image}: " + ", ".join(f"{names[i]} {100 * probs[i]:.2f}%" for i in top)
        del net


def jax_leaves(tree):
    import jax

    return jax.tree.leaves(tree)
