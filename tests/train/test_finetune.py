"""Fine-tuning from a weights file: the head found and replaced, a frozen backbone that stays bit
for bit as loaded (BatchNorm in inference mode), a slower backbone, the loaded backbone computing
the source model's features, BatchNorm's running variance against torch's, resume ignoring the
file, and the config keys' errors."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from train_helpers import REPO

from cnn_jax.config import apply_overrides, default_config, validate_config
from cnn_jax.errors import ConfigError, DataError
from cnn_jax.models import get_model
from cnn_jax.models.resnet import ResNet, ResNetBlock
from cnn_jax.pretrained import finetune
from cnn_jax.train import optimizers
from cnn_jax.train.state import create_train_state
from cnn_jax.train.steps import make_train_step

SHAPE = (16, 16, 3)


def tiny_resnet(num_classes=10):
    """A two-stage ResNet with BatchNorm, 4 and 8 channels: compiles in a few seconds."""
    return ResNet(stage_sizes=(1, 1), block_cls=ResNetBlock, num_filters=4, num_classes=num_classes)


def init_variables(model, seed=0):
    # The classic threefry compiles several times faster on CPU (as in train.state).
    with jax.threefry_partitionable(False):
        return jax.jit(model.init)(jax.random.PRNGKey(seed), jnp.zeros((1, *SHAPE)))


def source_variables(model, seed=0):
    """A trained-looking source model: random init with BatchNorm statistics moved away from
    (0, 1), so normalising with them or with batch statistics differs."""
    variables = init_variables(model, seed)
    rng = np.random.default_rng(seed)
    stats = jax.tree.map(
        lambda a: np.abs(rng.normal(1.0, 0.3, a.shape)).astype(np.float32),
        variables["batch_stats"],
    )
    return jax.device_get({"params": variables["params"], "batch_stats": stats})


def batch(n=16, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "image": jnp.asarray(rng.normal(size=(n, *SHAPE)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, classes, n), jnp.int32),
    }


def config_with(*overrides):
    return validate_config(apply_overrides(default_config(), list(overrides)))


def run_steps(model, tx, variables, steps, b):
    state = create_train_state(model, tx, SHAPE, jax.random.PRNGKey(1), variables=variables)
    step = jax.jit(make_train_step(model, tx))
    losses = []
    for _ in range(steps):
        state, metrics = step(state, b)
        losses.append(float(metrics["loss"]))
    return state, losses


def test_head_is_what_depends_on_num_classes():
    assert finetune.head_paths(tiny_resnet(), SHAPE) == {"fc/kernel", "fc/bias"}
    vgg = get_model("vgg11", num_classes=5)
    assert finetune.head_paths(vgg, (32, 32, 3)) == {
        "classifier/logits/kernel",
        "classifier/logits/bias",
    }
    lenet = get_model("lenet5", num_classes=10)
    assert finetune.head_paths(lenet, (28, 28, 1)) == {"head/logits/kernel", "head/logits/bias"}


def test_frozen_backbone_stays_bit_identical_and_the_new_head_learns():
    source = source_variables(tiny_resnet(10))
    config = config_with("optimizer.freeze_backbone=True", "optimizer.learning_rate=0.05")
    model = tiny_resnet(3)  # a 3-class dataset: the 10-class head is replaced
    head = finetune.head_paths(model, SHAPE)
    start = finetune.backbone_variables(source, model, SHAPE, head)
    assert "fc" not in start["params"]
    frozen = finetune.with_inference_batch_norm(model)
    tx = optimizers.make_optimizer(config, 10, 100, head_paths=head)
    b = batch()
    state, losses = run_steps(frozen, tx, start, 8, b)
    assert all(b < a for a, b in itertools.pairwise(losses)), losses
    assert losses[-1] < 0.97 * losses[0], losses
    got = flatten_dict(jax.device_get(state.variables()))
    for path, want in flatten_dict(start).items():  # every parameter and statistic as loaded
        assert np.asarray(got[path]).tobytes() == np.asarray(want).tobytes(), path
    fc = state.params["fc"]["kernel"]
    assert fc.shape == (8, 3)
    # BatchNorm in inference mode: training-mode logits are the evaluation logits.
    train_logits, _ = jax.jit(lambda v, x: frozen.apply(v, x, train=True, mutable=["batch_stats"]))(
        state.variables(), b["image"]
    )
    eval_logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(
        state.variables(), b["image"]
    )
    np.testing.assert_array_equal(np.asarray(train_logits), np.asarray(eval_logits))


def test_backbone_learning_rate_is_scaled():
    """Adam with weight decay: the backbone's updates are the unscaled rule's times the scale, the
    head's are unchanged."""
    model = tiny_resnet(3)
    head = finetune.head_paths(model, SHAPE)
    params = init_variables(model)["params"]
    rng = np.random.default_rng(0)
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
    updates = {}
    for scale in (1.0, 0.1):
        config = config_with("optimizer.weight_decay=0.01", f"optimizer.backbone_lr_scale={scale}")
        tx = optimizers.make_optimizer(config, 10, 100, head_paths=head)
        u, _ = jax.jit(lambda g, p, tx=tx: tx.update(g, tx.init(p), p))(grads, params)
        updates[scale] = flatten_dict(jax.device_get(u), sep="/")
    full, slow = updates[1.0], updates[0.1]
    for path in full:
        want = full[path] * (1.0 if path in head else 0.1)
        np.testing.assert_allclose(slow[path], want, rtol=1e-6, err_msg=path)
        assert np.abs(full[path]).max() > 0, path


def torch_resnet18_file(tmp_path, num_classes=1000, seed=0):
    """A torchvision ResNet-18 with random weights (BatchNorm statistics randomised) saved as a
    .safetensors file; returns (torch model in eval mode, path)."""
    from cnn_jax.pretrained import torch_compat

    if torch_compat.missing_reason():
        pytest.skip(torch_compat.missing_reason())
    torchvision = torch_compat.import_torchvision()
    import safetensors.torch
    import torch

    torch.manual_seed(seed)
    net = torchvision.models.resnet18(num_classes=num_classes).eval()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    path = tmp_path / "resnet18.safetensors"
    safetensors.torch.save_file(net.state_dict(), str(path))
    return net, path


@pytest.mark.parametrize("channels", [3, 1])
def test_loaded_backbone_gives_the_source_models_features(tmp_path, channels):
    """resnet18 from torchvision's file, with a new 10-class head: its logits are torchvision's
    ResNet-18 with that head, for RGB images and (summed first conv) for greyscale ones."""
    import torch

    net, path = torch_resnet18_file(tmp_path)
    config = config_with(
        "model.name=resnet18", f"model.pretrained={path}", "optimizer.freeze_backbone=True"
    )
    shape = (64, 64, channels)
    model = get_model("resnet18", num_classes=10)
    train_model, head, start = finetune.prepare(config, model, shape, resuming=False)
    assert head == {"fc/kernel", "fc/bias"}
    tx = optimizers.make_optimizer(config, 10, 100, head_paths=head)
    state = create_train_state(train_model, tx, shape, jax.random.PRNGKey(0), variables=start)
    fc = jax.device_get(state.params["fc"])
    net.fc = torch.nn.Linear(512, 10)
    with torch.no_grad():
        net.fc.weight.copy_(torch.from_numpy(np.asarray(fc["kernel"]).T.copy()))
        net.fc.bias.copy_(torch.from_numpy(np.array(fc["bias"])))
    x = np.random.default_rng(1).normal(size=(2, *shape)).astype(np.float32)
    ours = np.asarray(model.apply(state.variables(), x, train=False))
    x_rgb = np.repeat(x, 3, axis=-1) if channels == 1 else x
    with torch.no_grad():
        theirs = net(torch.from_numpy(x_rgb.transpose(0, 3, 1, 2).copy())).numpy()
    assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()


def test_weights_that_do_not_fit_are_named(tmp_path):
    from cnn_jax.train.checkpoints import export_npz

    source = source_variables(tiny_resnet(10))
    path = export_npz(source, tmp_path / "tiny.npz")
    config = config_with("model.name=resnet18", f"model.pretrained={path}")
    other = ResNet(stage_sizes=(2, 1), block_cls=ResNetBlock, num_filters=8, num_classes=3)
    with pytest.raises(DataError, match=r"missing .params/layer1_1/bn1/bias.") as e:
        finetune.prepare(config, other, SHAPE, resuming=False)
    assert "shapes differ: params/bn1/bias is (4,), the model's (8,)" in str(e.value)
    fewer = ResNet(stage_sizes=(1,), block_cls=ResNetBlock, num_filters=4, num_classes=3)
    with pytest.raises(DataError, match=r"not in the model 'batch_stats/layer2_0/bn1/mean'"):
        finetune.prepare(config, fewer, SHAPE, resuming=False)
    # resuming ignores the file: nothing is read
    missing = config_with("model.name=resnet18", f"model.pretrained={tmp_path / 'gone.npz'}")
    _, _, start = finetune.prepare(missing, tiny_resnet(3), SHAPE, resuming=True)
    assert start is None
    with pytest.raises(DataError, match=r"gone.npz' does not exist"):
        finetune.prepare(missing, tiny_resnet(3), SHAPE, resuming=False)
    odd = config_with("model.name=resnet18", f"model.pretrained={tmp_path / 'weights.ckpt'}")
    (tmp_path / "weights.ckpt").write_bytes(b"0")
    with pytest.raises(ConfigError, match=r"cannot tell its format.*model.pretrained_format"):
        finetune.prepare(odd, tiny_resnet(3), SHAPE, resuming=False)


@pytest.mark.parametrize(
    "override, message",
    [
        ("optimizer.backbone_lr_scale=0", r"'optimizer.backbone_lr_scale' has invalid value 0"),
        ("optimizer.backbone_lr_scale=1.5", r"expected a number in \(0, 1\]"),
        ("model.pretrained_format=onnx", r"'model.pretrained_format' has invalid value 'onnx'"),
    ],
)
def test_config_keys_are_checked(override, message):
    with pytest.raises(ConfigError, match=message):
        config_with(override)
    with pytest.raises(ConfigError, match=r"1 when optimizer.freeze_backbone is True"):
        config_with("optimizer.freeze_backbone=True", "optimizer.backbone_lr_scale=0.5")


def test_batch_norm_running_variance_is_flax_biased_not_torch_unbiased():
    """One training step of the zoo's BatchNorm against torch's BatchNorm2d (momentum 0.1): the
    running mean agrees; the running variance takes the biased batch variance (n values per
    channel) where torch takes the unbiased one, so torch's is larger by 0.1 * var / (n - 1)."""
    torch = pytest.importorskip("torch")
    from cnn_jax.layers import BatchNorm

    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 2.0, size=(2, 7, 7, 8)).astype(np.float32)  # n = 98 per channel
    bn = BatchNorm(use_running_average=False)
    variables = bn.init(jax.random.PRNGKey(0), x)
    _, new = bn.apply(variables, x, mutable=["batch_stats"])
    ours = jax.device_get(new["batch_stats"])
    layer = torch.nn.BatchNorm2d(8).train()
    layer(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
    n = 2 * 7 * 7
    biased = x.reshape(-1, 8).var(axis=0, dtype=np.float64)
    np.testing.assert_allclose(ours["mean"], layer.running_mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours["var"], 0.9 + 0.1 * biased, rtol=1e-5)
    torch_var = layer.running_var.numpy()
    np.testing.assert_allclose(torch_var, 0.9 + 0.1 * biased * n / (n - 1), rtol=1e-5)
    relative = np.abs(torch_var - ours["var"]) / torch_var
    assert 1e-3 < relative.max() < 1e-2  # ~0.1 * 4 / (0.9 + 0.4) / 97 at this variance


def test_experiment_config_fine_tunes_resnet18_on_digits():
    from cnn_jax.config import load_config

    config = validate_config(load_config("resnet18_digits_finetune"))
    assert config.model.name == "resnet18" and config.dataset.name == "digits"
    assert config.model.pretrained.endswith(".safetensors")
    assert (REPO / "experiments" / "resnet18_digits_finetune.py").is_file()


# Trains 2 steps, removes the weights file, resumes to 3 steps: one process, one compilation
# (the second run finds the first's programs in the persistent cache).
TRAIN_THEN_RESUME = """
import pathlib, sys
from cnn_jax import cli
weights, argv = pathlib.Path(sys.argv[1]), sys.argv[2:]
assert cli.main([*argv, "--max-steps", "2"]) == 0
weights.unlink()
sys.exit(cli.main([*argv, "--max-steps", "3"]))
"""


@pytest.mark.heavy
def test_fine_tuning_run_and_resume_through_the_cli(tmp_path):
    """The experiment with a torchvision file (random weights), in a one-device process (the
    8 forced devices of `make test` would compile ResNet-18 for minutes): 2 steps with the
    backbone frozen, then a resume to 3 steps after the file is gone (never read again)."""
    from cnn_jax.train import load

    net, path = torch_resnet18_file(tmp_path)
    workdir = tmp_path / "run"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           "TFDS_DATA_DIR": str(tmp_path / "tfds"), "TF_CPP_MIN_LOG_LEVEL": "2",
           "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5"}  # fmt: skip
    argv = ["train", "resnet18_digits_finetune", "--workdir", str(workdir), "--no-pictures",
            "--set", f"model.pretrained={path}", "train.batch_size=8",
            "train.eval_batch_size=120", "dataset.image_size=32", "checkpoint.async_save=False"]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-c", TRAIN_THEN_RESUME, str(path), *argv],
        capture_output=True, text=True, env=env, cwd=str(REPO), check=False, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from the checkpoint of step 2" in done.stdout
    assert not path.exists()
    _, variables, _ = load(workdir)
    # frozen for 3 steps: the file's first conv, summed over RGB for the grey digits
    conv1 = np.asarray(variables["params"]["conv1"]["kernel"])
    want = net.conv1.weight.detach().numpy().transpose(2, 3, 1, 0).sum(axis=2, keepdims=True)
    np.testing.assert_allclose(conv1, want, rtol=1e-6, atol=1e-6)
    assert variables["params"]["fc"]["kernel"].shape == (512, 10)
