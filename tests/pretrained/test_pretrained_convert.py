"""cnn_jax.pretrained without torch: the torchvision name and layout rules, round trips through
.safetensors files, and the errors for tensors that do not fit (tests/pretrained/
test_torchvision_parity.py checks the rules against torchvision itself)."""

from __future__ import annotations

import builtins
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from cnn_jax import pretrained
from cnn_jax.errors import ConfigError, DataError
from cnn_jax.models import available, get_model

safetensors_numpy = pytest.importorskip("safetensors.numpy")


@functools.cache
def variable_shapes(name: str, num_classes: int = 1000, **options) -> dict:
    model = get_model(name, num_classes=num_classes, **options)
    images = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), images)


def random_variables(name: str, seed: int = 0, **options) -> dict:
    """Variables of the twin with random values (no model computation: shapes only)."""
    rng = np.random.default_rng(seed)
    shapes = variable_shapes(name, **options)
    return jax.tree.map(lambda s: rng.random(s.shape, np.float32) - 0.5, dict(shapes))


def assert_trees_identical(a: dict, b: dict) -> None:
    flat_a, flat_b = flatten_dict(a), flatten_dict(b)
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        x, y = np.asarray(flat_a[key]), np.asarray(flat_b[key])
        assert x.dtype == y.dtype == np.float32 and x.shape == y.shape, key
        # Bit for bit, NaN payloads and -0.0 included.
        assert np.array_equal(x.view(np.uint32), y.view(np.uint32)), key


def test_twins_are_zoo_models():
    assert set(pretrained.TWINS) <= set(available())
    assert len(pretrained.TWINS) == 16
    for name in ("alexnet", "vgg11", "resnet18", "densenet121", "googlenet"):  # one per family
        head = variable_shapes(name)["params"]
        for part in pretrained.HEADS[name]:
            head = head[part]
        assert head["kernel"].shape[-1] == 1000, name


# Names and shapes torchvision gives these tensors (torchvision.models.<name>().state_dict()).
TORCHVISION_TENSORS = {
    "alexnet": {"features.0.weight": (64, 3, 11, 11), "features.10.bias": (256,),
                "classifier.1.weight": (4096, 9216), "classifier.6.bias": (1000,)},
    "vgg16_bn": {"features.1.running_var": (64,), "features.41.weight": (512,),
                 "features.40.weight": (512, 512, 3, 3), "classifier.0.weight": (4096, 25088),
                 "classifier.3.weight": (4096, 4096)},
    "resnet50": {"layer1.0.downsample.0.weight": (256, 64, 1, 1), "layer4.2.bn3.bias": (2048,),
                 "layer3.5.conv2.weight": (256, 256, 3, 3), "fc.weight": (1000, 2048)},
    "densenet121": {"features.denseblock4.denselayer16.conv2.weight": (32, 128, 3, 3),
                    "features.transition3.norm.running_mean": (1024,),
                    "features.norm5.weight": (1024,), "classifier.weight": (1000, 1024)},
    "googlenet": {"conv1.conv.weight": (64, 3, 7, 7), "inception3a.branch2.0.bn.weight": (96,),
                  "inception5b.branch4.1.conv.weight": (128, 832, 1, 1),
                  "fc.weight": (1000, 1024)},
}  # fmt: skip
# Tensor counts of torchvision's state dicts (num_batches_tracked included; GoogLeNet without
# its aux heads).
TORCHVISION_COUNTS = {"alexnet": 16, "vgg16_bn": 97, "resnet50": 320,
                      "densenet121": 727, "googlenet": 344}  # fmt: skip


@pytest.mark.parametrize("name", sorted(TORCHVISION_TENSORS))
def test_torchvision_names_shapes_and_round_trip(name):
    variables = random_variables(name)
    state = pretrained.to_torchvision(variables, name)
    assert len(state) == TORCHVISION_COUNTS[name]
    for key, shape in TORCHVISION_TENSORS[name].items():
        assert state[key].shape == shape, key
        assert state[key].flags.c_contiguous
    counters = [k for k in state if k.endswith("num_batches_tracked")]
    assert all(state[k].dtype == np.int64 and state[k].shape == () for k in counters)
    assert_trees_identical(pretrained.from_torchvision(state, name), variables)


def test_layout_rules():
    variables = random_variables("alexnet")
    state = pretrained.to_torchvision(variables, "alexnet")
    conv = variables["params"]["conv2"]["kernel"]  # HWIO
    np.testing.assert_array_equal(state["features.3.weight"][7, 5, 1, 4], conv[1, 4, 5, 7])
    dense = variables["params"]["classifier"]["hidden2"]["kernel"]  # (in, out)
    np.testing.assert_array_equal(state["classifier.4.weight"], dense.T)
    # The first FC layer reads a 256x6x6 map: flattened C, H, W by PyTorch, H, W, C here.
    feature_map = np.random.default_rng(1).standard_normal((256, 6, 6), np.float32)
    torch_out = state["classifier.1.weight"] @ feature_map.reshape(-1)
    flax_out = (
        feature_map.transpose(1, 2, 0).reshape(-1)
        @ variables["params"]["classifier"]["hidden1"]["kernel"]
    )
    np.testing.assert_allclose(torch_out, flax_out, rtol=1e-4, atol=1e-3)
    bn = pretrained.to_torchvision(random_variables("resnet18"), "resnet18")
    assert {"bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var"} <= set(bn)


def test_safetensors_file_round_trip_is_bit_identical(tmp_path):
    variables = random_variables("googlenet", seed=3)
    # Values a careless conversion would change: -0.0, a NaN payload, a denormal.
    variables["params"]["fc"]["bias"][:3] = [-0.0, np.float32("nan"), 1e-45]
    path = pretrained.save_safetensors(variables, "googlenet", tmp_path / "g.safetensors")
    state = pretrained.read_state_dict(path)
    assert state.keys() == pretrained.to_torchvision(variables, "googlenet").keys()
    assert_trees_identical(pretrained.from_torchvision(state, "googlenet"), variables)
    with open(path, "rb") as f:  # torchvision's metadata, so safetensors.torch users see "pt"
        assert b'"format":"pt"' in f.read(4096)


def test_load_weights_builds_the_twin_with_the_file(tmp_path):
    variables = random_variables("resnet18", seed=4)
    variables["params"]["fc"] = {
        "kernel": np.ones((512, 7), np.float32),
        "bias": np.arange(7, dtype=np.float32),
    }
    path = tmp_path / "r.safetensors"
    safetensors_numpy.save_file(pretrained.to_torchvision(variables, "resnet18"), path)
    model, loaded = pretrained.load_weights(path, "resnet18")
    assert model.num_classes == 7
    assert_trees_identical(jax.tree.map(np.asarray, loaded), variables)
    logits = model.apply(loaded, jnp.zeros((1, 32, 32, 3)), train=False)
    assert logits.shape == (1, 7)
    with pytest.raises(DataError, match=r"num_classes=10 .* 7 classes"):
        pretrained.load_weights(path, "resnet18", num_classes=10)
    with pytest.raises(ConfigError, match="cifar_stem"):
        pretrained.load_weights(path, "resnet18", cifar_stem=True)
    model, _ = pretrained.load_weights(path, "resnet18", act="tanh")  # same tensors: accepted
    assert model.act == "tanh"


def test_googlenet_loads_with_transform_input(tmp_path):
    variables = random_variables("googlenet", seed=5)
    path = pretrained.save_safetensors(variables, "googlenet", tmp_path / "g.safetensors")
    model, _ = pretrained.load_weights(path, "googlenet")
    assert model.transform_input
    assert not pretrained.load_weights(path, "googlenet", transform_input=False)[0].transform_input


def test_googlenet_transform_input_matches_torchvisions_formula():
    from cnn_jax.models.googlenet import imagenet_to_half_range

    image = np.random.default_rng(0).uniform(size=(2, 5, 4, 3)).astype(np.float32)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    normalised = ((image - mean) / std).astype(np.float32)
    np.testing.assert_allclose(imagenet_to_half_range(normalised), (image - 0.5) / 0.5, atol=1e-6)


def test_googlenet_aux_heads_and_counters_are_dropped():
    variables = random_variables("googlenet")
    state = pretrained.to_torchvision(variables, "googlenet")
    state["aux1.conv.conv.weight"] = np.zeros((128, 512, 1, 1), np.float32)
    state["aux2.fc2.bias"] = np.zeros(1000, np.float32)
    assert_trees_identical(pretrained.from_torchvision(state, "googlenet"), variables)


def test_legacy_densenet_names_are_read():
    variables = random_variables("densenet121")
    state = pretrained.to_torchvision(variables, "densenet121")
    legacy = {
        k.replace(".norm1.", ".norm.1.").replace(".conv2.", ".conv.2."): v for k, v in state.items()
    }
    assert "features.denseblock1.denselayer1.norm.1.running_var" in legacy
    assert_trees_identical(pretrained.from_torchvision(legacy, "densenet121"), variables)


def test_every_tensor_is_accounted_for():
    state = pretrained.to_torchvision(random_variables("resnet18"), "resnet18")
    extra = {**state, "layer5.0.conv1.weight": np.zeros((1, 1, 1, 1), np.float32)}
    with pytest.raises(DataError, match=r"1 unmapped tensor\(s\) 'layer5.0.conv1.weight'"):
        pretrained.from_torchvision(extra, "resnet18")
    missing = {k: v for k, v in state.items() if k != "layer2.1.bn2.running_var"}
    with pytest.raises(DataError, match=r"1 missing tensor\(s\) 'layer2.1.bn2.running_var'"):
        pretrained.from_torchvision(missing, "resnet18")
    wrong = {**state, "conv1.weight": np.zeros((64, 3, 3, 3), np.float32)}
    with pytest.raises(
        DataError, match=r"'conv1.weight' is \(64, 3, 3, 3\), expected \(64, 3, 7, 7\)"
    ):
        pretrained.from_torchvision(wrong, "resnet18")
    ints = {**state, "fc.bias": np.zeros(1000, np.int64)}
    with pytest.raises(DataError, match="'fc.bias' are not floating point"):
        pretrained.from_torchvision(ints, "resnet18")
    stray = {**state, "fc.num_batches_tracked": np.zeros((), np.int64)}  # fc is no BatchNorm
    with pytest.raises(DataError, match="'fc.num_batches_tracked'"):
        pretrained.from_torchvision(stray, "resnet18")
    with pytest.raises(DataError, match="resnet34"):  # another model's file
        pretrained.from_torchvision(state, "resnet34")


def test_to_torchvision_names_variables_that_are_not_the_twins():
    variables = random_variables("resnet18", cifar_stem=True)
    with pytest.raises(DataError, match=r"'params/conv1/kernel' is \(3, 3, 3, 64\)"):
        pretrained.to_torchvision(variables, "resnet18")
    no_stats = {"params": random_variables("resnet18")["params"]}
    with pytest.raises(DataError, match=r"missing tensor\(s\) 'batch_stats/bn1/mean'"):
        pretrained.to_torchvision(no_stats, "resnet18")


def test_models_without_twin_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="'lenet5' has no torchvision twin"):
        pretrained.from_torchvision({}, "lenet5")
    with pytest.raises(ConfigError, match="'zfnet' has no torchvision twin"):
        pretrained.to_torchvision({}, "zfnet")
    with pytest.raises(ConfigError, match="'resnet9' has no torchvision twin"):
        pretrained.load_weights(tmp_path / "x.safetensors", "resnet9")
    with pytest.raises(DataError, match="a state dict must map tensor names"):
        pretrained.from_torchvision([1, 2], "resnet18")


def test_unreadable_files_are_named(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="does not exist"):
        pretrained.read_state_dict(tmp_path / "none.safetensors")
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(DataError, match=r"'.*w.npz': expected a name ending in .safetensors"):
        pretrained.read_state_dict(tmp_path / "w.npz")
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(DataError, match="cannot read weights file .*bad.safetensors"):
        pretrained.read_state_dict(tmp_path / "bad.safetensors")
    (tmp_path / "w.pth").write_bytes(b"not a pickle")
    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("No module named 'torch'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_torch)
    with pytest.raises(DataError, match=r"needs torch .* or convert it to .safetensors"):
        pretrained.read_state_dict(tmp_path / "w.pth")
    with pytest.raises(ConfigError, match="ending in .safetensors"):
        pretrained.save_safetensors({}, "resnet18", tmp_path / "out.npz")


def test_unwritable_output_is_named(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(DataError, match="cannot write .*file/w.safetensors"):
        pretrained.save_safetensors(
            random_variables("resnet18"), "resnet18", tmp_path / "file" / "w.safetensors"
        )
    assert list(tmp_path.iterdir()) == [tmp_path / "file"]


def test_missing_torchvision_is_named(monkeypatch):
    from cnn_jax.pretrained import torch_compat

    real = torch_compat.importlib.util.find_spec
    monkeypatch.setattr(
        torch_compat.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "torchvision" else real(name, *a),
    )
    monkeypatch.delitem(torch_compat.sys.modules, "torchvision", raising=False)
    reason = torch_compat.missing_reason()
    assert reason.startswith("torchvision is not installed") and "'.[test]'" in reason
    with pytest.raises(ImportError, match="torchvision is not installed"):
        torch_compat.import_torchvision()
