"""Orbax checkpoints: round trip, keep latest k + best, shape mismatches, damage, npz export."""

import shutil

import jax
import numpy as np
import optax
import pytest
from train_helpers import IMAGE_SHAPE, TinyCNN, assert_trees_equal

from cnn_jax.errors import CheckpointError
from cnn_jax.train.checkpoints import (
    CheckpointStore,
    DamagedCheckpointError,
    IncompatibleCheckpointError,
    export_npz,
    load_npz,
)
from cnn_jax.train.state import abstract_train_state, create_train_state

MODEL = TinyCNN(use_bn=True)
TX = optax.chain(  # a masked state (MaskedState / EmptyState nodes) must round-trip too
    optax.clip_by_global_norm(1.0),
    optax.add_decayed_weights(1e-4, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)),
    optax.sgd(0.1, momentum=0.9),
)


@pytest.fixture(scope="module")
def state():
    return jax.device_get(create_train_state(MODEL, TX, IMAGE_SHAPE, jax.random.PRNGKey(0)))


def _store(tmp_path, **kw):
    return CheckpointStore(tmp_path, **kw)


def test_save_and_restore_round_trip(tmp_path, state):
    store = _store(tmp_path)
    assert store.save(7, state, {"step": 7, "epoch": 0, "config": {"a": 1}})
    assert not store.save(7, state, {"step": 7})  # an existing step is not overwritten
    store.wait()
    restored, meta = store.restore(7, abstract_train_state(MODEL, TX, IMAGE_SHAPE))
    assert_trees_equal(restored, state)
    assert meta == {"step": 7, "epoch": 0, "config": {"a": 1}}
    store.close()
    # A fresh process (new store) reads it back too.
    reader = _store(tmp_path, read_only=True)
    again, _ = reader.restore(7, abstract_train_state(MODEL, TX, IMAGE_SHAPE))
    reader.close()
    assert_trees_equal(again, state)


def test_keeps_latest_k_and_the_best(tmp_path, state):
    store = _store(tmp_path, keep=2, best_metric="accuracy", best_mode="max")
    accuracies = {1: 0.5, 2: 0.9, 3: 0.6, 4: 0.7, 5: None, 6: 0.55}  # 5: saved without an eval
    for step, acc in accuracies.items():
        store.save(step, state, {"step": step}, None if acc is None else {"accuracy": acc})
    store.wait()
    assert store.all_steps() == [2, 5, 6]
    assert store.best_step() == 2
    assert store.resolve("best") == 2 and store.resolve("latest") == 6 and store.resolve(5) == 5
    with pytest.raises(CheckpointError, match="step 3 not found"):
        store.resolve(3)
    store.close()


def test_best_by_minimum_loss(tmp_path, state):
    store = _store(tmp_path, keep=1, best_metric="loss", best_mode="min")
    for step, loss in {1: 0.3, 2: 0.1, 3: 0.2, 4: 0.25}.items():
        store.save(step, state, {"step": step}, {"loss": loss})
    store.wait()
    assert store.all_steps() == [2, 4]
    assert store.best_step() == 2
    store.close()


def test_restoring_into_a_different_model_names_the_mismatches(tmp_path, state):
    store = _store(tmp_path)
    store.save(1, state, {"step": 1})
    store.wait()

    wider = abstract_train_state(TinyCNN(num_classes=7, use_bn=True), TX, IMAGE_SHAPE)
    with pytest.raises(IncompatibleCheckpointError) as info:
        store.restore(1, wider)
    message = str(info.value)
    assert (
        "params/Dense_0/kernel: checkpoint has shape (4, 10), model/optimizer expects (4, 7)"
        in message
    )
    assert "params/Dense_0/bias" in message
    assert "opt_state" in message  # the momentum buffers differ too

    adam = abstract_train_state(MODEL, optax.adam(1e-3), IMAGE_SHAPE)
    with pytest.raises(IncompatibleCheckpointError, match=r"opt_state/0/mu/Conv_0/kernel: missing"):
        store.restore(1, adam)
    store.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # see test_loop
@pytest.mark.parametrize("item", ["variables", "train"])
@pytest.mark.parametrize("damage", ["delete_data", "truncate_metadata"])
def test_damaged_checkpoint_is_reported(tmp_path, state, damage, item):
    store = _store(tmp_path)
    store.save(1, state, {"step": 1})
    store.close()
    state_dir = tmp_path / "checkpoints" / "1" / item
    if damage == "delete_data":  # the array data files (OCDBT) are gone
        for data_dir in state_dir.rglob("d"):
            shutil.rmtree(data_dir)
    else:
        (state_dir / "_METADATA").write_text("{")
    store = _store(tmp_path)
    with pytest.raises(DamagedCheckpointError, match="checkpoints/1 is damaged"):
        store.restore(1, abstract_train_state(MODEL, TX, IMAGE_SHAPE))
    store.close()


def _abstract_variables(state):
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    return {"params": shapes.params, "batch_stats": shapes.batch_stats}


def test_model_variables_restore_without_an_optimizer(tmp_path, state):
    """The variables item alone: no optimizer state is read, so a damaged or different
    optimizer state does not stop a user from loading the trained model."""
    store = _store(tmp_path)
    store.save(3, state, {"step": 3})
    store.close()
    for data_dir in (tmp_path / "checkpoints" / "3" / "train").rglob("d"):
        shutil.rmtree(data_dir)  # the optimizer state is gone
    reader = _store(tmp_path, read_only=True)
    variables, meta = reader.restore_variables(3, _abstract_variables(state))
    reader.close()
    assert meta == {"step": 3}
    assert_trees_equal(variables, {"params": state.params, "batch_stats": state.batch_stats})


def test_export_npz_round_trip_without_orbax(tmp_path, state):
    variables = state.variables()
    path = export_npz(variables, tmp_path / "params.npz")
    with np.load(path) as archive:  # plain numpy is enough to read it
        assert "params/Conv_0/kernel" in archive.files
        assert "batch_stats/BatchNorm_0/mean" in archive.files
        np.testing.assert_array_equal(
            archive["params/Conv_0/kernel"], variables["params"]["Conv_0"]["kernel"]
        )
    loaded = load_npz(path)
    assert_trees_equal(loaded, variables)
    x = np.zeros((2, *IMAGE_SHAPE), np.float32)
    np.testing.assert_array_equal(MODEL.apply(loaded, x), MODEL.apply(variables, x))


def test_load_npz_of_a_bad_file(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="cannot read parameter file"):
        load_npz(bad)
