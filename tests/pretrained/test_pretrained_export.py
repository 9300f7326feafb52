"""`cnn-jax export --format safetensors`: torchvision's names for the twins (loadable into
torchvision.models), this project's names for the other models."""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

import cnn_jax.train
from cnn_jax import cli, pretrained
from cnn_jax.models import get_model
from cnn_jax.pretrained import torch_compat

safetensors_numpy = pytest.importorskip("safetensors.numpy")


def trained_run(monkeypatch, tmp_path, name: str, shape=(224, 224, 3), **options):
    """A workdir whose `load` gives `name`'s variables (random, 10 classes): export reads
    nothing else of it."""
    model = get_model(name, num_classes=10, **options)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *shape)))
    rng = np.random.default_rng(0)
    variables = jax.tree.map(lambda s: rng.random(s.shape, np.float32), dict(shapes))
    config = types.SimpleNamespace(model=types.SimpleNamespace(name=name))
    monkeypatch.setattr(cnn_jax.train, "load", lambda *a: (model, variables, config), raising=False)
    (tmp_path / "run").mkdir()
    return tmp_path / "run", variables


def export(capsys, workdir, out, *extra):
    code = cli.main(["export", "--workdir", str(workdir), "--out", str(out), *extra])
    return code, *capsys.readouterr()


def test_twin_exports_torchvision_names(monkeypatch, tmp_path, capsys):
    workdir, variables = trained_run(monkeypatch, tmp_path, "resnet18")
    out = tmp_path / "out" / "r18.safetensors"
    code, stdout, _ = export(capsys, workdir, out, "--format", "safetensors")
    assert code == 0 and "torchvision's resnet18 names" in stdout
    state = pretrained.read_state_dict(out)
    assert state["fc.weight"].shape == (10, 512) and "layer4.1.bn2.running_var" in state
    back = pretrained.from_torchvision(state, "resnet18")
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(variables), strict=True):
        assert np.array_equal(a, b)
    if torch_compat.missing_reason() is None:  # PyTorch users load it as it is
        import torch
        from safetensors.torch import load_file

        net = torch_compat.import_torchvision().models.resnet18(num_classes=10)
        net.load_state_dict(load_file(out))  # strict: every tensor named and shaped
        assert torch.equal(net.fc.bias, torch.from_numpy(state["fc.bias"]))


@pytest.mark.parametrize(
    ("name", "options", "why"),
    [
        ("lenet5", {}, "lenet5 has no torchvision twin"),
        ("resnet18", {"cifar_stem": True}, "its options change torchvision's resnet18 tensors"),
    ],
)
def test_other_models_export_their_own_names(monkeypatch, tmp_path, capsys, name, options, why):
    shape = (28, 28, 1) if name == "lenet5" else (32, 32, 3)
    workdir, variables = trained_run(monkeypatch, tmp_path, name, shape, **options)
    out = tmp_path / "m.safetensors"
    code, stdout, _ = export(capsys, workdir, out, "--format", "safetensors")
    assert code == 0 and f"cnn_jax's names ({why})" in stdout
    state = safetensors_numpy.load_file(out)
    flat = flatten_dict(variables, sep="/")  # the .npz export's keys: 'params/conv1/kernel'
    assert state.keys() == flat.keys()
    assert all(np.array_equal(state[k], flat[k]) for k in flat)


def test_format_and_suffix_must_agree(monkeypatch, tmp_path, capsys):
    workdir, _ = trained_run(monkeypatch, tmp_path, "resnet18")
    code, _, err = export(capsys, workdir, tmp_path / "r.npz", "--format", "safetensors")
    assert code == 2 and "ending in .safetensors (--format safetensors)" in err
    code, _, err = export(capsys, workdir, tmp_path / "r.safetensors")  # npz by default
    assert code == 2 and "ending in .npz (--format npz)" in err
    code, _, err = export(capsys, workdir, tmp_path / "r.st", "--format", "pt")
    assert code == 2 and "invalid choice: 'pt'" in err
