"""The streaming tf.data feeder: batches, determinism, exact resume, evaluation coverage."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import tensorflow_datasets as tfds

from cnn_jax.data import eval_batches, train_batches
from cnn_jax.data.streaming import _center_crop


def _take(iterator, n):
    return list(itertools.islice(iterator, n))


def test_train_batches_shapes_and_determinism(digits_dir):
    kw = {"batch_size": 32, "seed": 3, "data_dir": digits_dir}
    a = _take(train_batches("digits", **kw), 3)
    b = _take(train_batches("digits", **kw), 3)
    c = _take(train_batches("digits", **{**kw, "seed": 4}), 3)
    assert a[0]["image"].shape == (32, 8, 8, 1) and a[0]["image"].dtype == np.uint8
    assert a[0]["label"].shape == (32,) and a[0]["label"].dtype == np.int32
    for x, y in zip(a, b):
        assert np.array_equal(x["image"], y["image"]) and np.array_equal(x["label"], y["label"])
    assert not np.array_equal(a[0]["label"], c[0]["label"])


def test_resume_at_start_step_is_exact_across_epochs(digits_dir):
    # 1437 // 200 = 7 steps per epoch: steps 5..9 cross into epoch 1.
    kw = {"batch_size": 200, "seed": 0, "data_dir": digits_dir, "image_size": 12}
    full = _take(train_batches("digits", **kw), 10)
    resumed = _take(train_batches("digits", start_step=5, **kw), 5)
    for x, y in zip(full[5:], resumed):
        assert np.array_equal(x["image"], y["image"]) and np.array_equal(x["label"], y["label"])
    assert full[0]["image"].shape == (200, 12, 12, 1)
    epoch0 = np.concatenate([b["label"] for b in full[:7]])
    assert len(epoch0) == 1400  # drop remainder
    # Epochs are shuffled differently.
    assert not np.array_equal(full[0]["label"], full[7]["label"])


def test_class_subset_and_shards(digits_dir):
    batches = _take(
        train_batches("digits", batch_size=16, seed=0, data_dir=digits_dir, classes=[3, 7]), 4
    )
    assert set(np.concatenate([b["label"] for b in batches]).tolist()) == {0, 1}
    first = [_take(train_batches("digits", batch_size=8, seed=0, data_dir=digits_dir,
                                 shard=(i, 2)), 1)[0] for i in range(2)]  # fmt: skip
    assert first[0]["image"].shape == first[1]["image"].shape == (8, 8, 8, 1)


@pytest.mark.parametrize("batch", [7, 100, 360, 500])
def test_streamed_eval_covers_the_split_once(digits_dir, batch):
    batches = list(eval_batches("digits", "test", batch_size=batch, data_dir=digits_dir))
    assert len(batches) == -(-360 // batch)
    assert sum(b["mask"].sum() for b in batches) == 360
    assert all(b["image"].shape[0] == batch for b in batches)
    real = np.concatenate([b["image"][b["mask"] > 0] for b in batches])
    want = tfds.as_numpy(tfds.load("digits", split="test", data_dir=digits_dir, batch_size=-1))
    assert sorted(im.tobytes() for im in real) == sorted(im.tobytes() for im in want["image"])


def test_streamed_eval_shards_and_common_batch_count(digits_dir):
    total = 0
    for i in range(3):
        batches = list(eval_batches("digits", "test", batch_size=50, data_dir=digits_dir,
                                    shard=(i, 3), num_batches=4))  # fmt: skip
        assert len(batches) == 4
        total += sum(b["mask"].sum() for b in batches)
    assert total == 360


def test_shuffling_is_seeded_with_mock_data():
    with tfds.testing.mock_data(num_examples=64):
        a = _take(train_batches("cifar10", batch_size=16, seed=1), 4)
        b = _take(train_batches("cifar10", batch_size=16, seed=1), 4)
        c = _take(train_batches("cifar10", batch_size=16, seed=2), 4)
    assert a[0]["image"].shape == (16, 32, 32, 3) and a[0]["label"].dtype == np.int32
    assert all(np.array_equal(x["image"], y["image"]) for x, y in zip(a, b))
    assert not np.array_equal(a[0]["image"], c[0]["image"])
    epoch0 = {im.tobytes() for batch in a for im in batch["image"]}
    assert len(epoch0) == 64  # one epoch visits every example once


def test_imagenet_like_stream_with_mock_data():
    # Varying image sizes: random-resized crop for training, centre crop for evaluation.
    with tfds.testing.mock_data(num_examples=24):
        batch = next(train_batches("imagenette", batch_size=8, seed=0, image_size=32))
        ev = list(eval_batches("imagenette", batch_size=10, image_size=32))
    assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.uint8
    assert batch["label"].max() < 10
    assert [b["mask"].sum() for b in ev] == [10, 10, 4] and ev[0]["image"].shape == (10, 32, 32, 3)


def test_center_crop_keeps_the_middle():
    import tensorflow as tf

    image = np.zeros((70, 140, 3), np.uint8)
    image[:, 60:80] = 255  # a bright band in the middle
    out = _center_crop(tf.constant(image), (8, 8)).numpy()
    assert out.shape == (8, 8, 3) and out[:, 3:5].min() > 200 and out[:, 0].max() < 50


def test_synthetic_streams_from_memory():
    batch = next(train_batches("synthetic", batch_size=16, seed=0))
    assert batch["image"].shape == (16, 28, 28, 1)


# -- JPEG records: fused decode-and-crop, thread pool, read-ahead, device prefetch -------------


def _jpeg(rng, height: int, width: int, mode: str = "RGB", **save) -> bytes:
    """A photo-like JPEG (smooth colours + noise), quality 90 unless `save` says otherwise."""
    import io

    from PIL import Image

    shape = (height, width) if mode == "L" else (height, width, 3)
    smooth = rng.integers(0, 256, (4, 4) + shape[2:], dtype=np.uint8)
    image = Image.fromarray(smooth).resize((width, height), Image.BICUBIC)
    pixels = np.asarray(image, np.int16) + rng.integers(-20, 21, shape)
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
        out, "JPEG", **{"quality": 90, **save}
    )
    return out.getvalue()


@pytest.mark.parametrize(
    "mode, save",
    [
        ("RGB", {}),  # 4:2:0 colour: upsampling interpolates across the box's edges
        ("RGB", {"subsampling": 1}),  # 4:2:2
        ("RGB", {"subsampling": 0}),  # 4:4:4
        ("RGB", {"progressive": True}),
        ("L", {}),
    ],
)
def test_fused_crop_gives_the_pixels_of_decode_then_crop(mode, save):
    import tensorflow as tf

    from cnn_jax.data.streaming import crop_box, decode_random_crop

    rng = np.random.default_rng(0)
    cropped = 0
    sizes = [(37, 53), (64, 48), (75, 100), (16, 17), (121, 90), (333, 499)]
    for i, (h, w) in enumerate(sizes):
        encoded = tf.constant(_jpeg(rng, h, w, mode, **save))
        decoded = tf.io.decode_jpeg(encoded, channels=3)
        for j in range(12):
            seed = tf.constant([i, j], tf.int64)
            begin, box = crop_box(tf.shape(decoded), seed)
            want = tf.slice(decoded, begin, box).numpy()
            got = decode_random_crop(encoded, seed, channels=3, decode=None).numpy()
            assert got.shape == want.shape and np.array_equal(got, want)
            cropped += got.shape[:2] != (h, w)
    assert cropped > 40  # the boxes really crop


def test_other_formats_are_decoded_then_cropped():
    import io

    import tensorflow as tf
    from PIL import Image

    from cnn_jax.data.streaming import crop_box, decode_random_crop

    pixels = np.random.default_rng(1).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, "PNG")
    seed = tf.constant([3, 4], tf.int64)
    begin, box = crop_box(tf.constant([40, 60, 3]), seed)
    got = decode_random_crop(
        tf.constant(png.getvalue()), seed, channels=3,
        decode=lambda e: tf.io.decode_png(e, channels=3),
    ).numpy()  # fmt: skip
    b, s = begin.numpy(), box.numpy()
    assert np.array_equal(got, pixels[b[0] : b[0] + s[0], b[1] : b[1] + s[1]])


@pytest.fixture(scope="module")
def jpeg_dir(tmp_path_factory) -> str:
    """An imported image folder of 40 JPEGs of varying sizes (streamed, Inception crops)."""
    from cnn_jax.data import import_dataset

    root = tmp_path_factory.mktemp("jpeg_folder")
    rng = np.random.default_rng(2)
    for i in range(40):
        folder = root / "src" / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        h, w = int(rng.integers(24, 48)), int(rng.integers(24, 48))
        (folder / f"{i:02d}.jpg").write_bytes(_jpeg(rng, h, w))
    import_dataset("jpegs", root / "src", root / "data")
    return str(root / "data")


def test_jpeg_folder_streams_fused_crops_like_unfused_and_resumes(jpeg_dir):
    from cnn_jax.data.registry import get_dataset_info

    info = get_dataset_info("jpegs", data_dir=jpeg_dir)
    assert not info.device_resident  # varying sizes: streamed with Inception crops
    # 36 train images (train[:90%]) // 8 = 4 steps per epoch: 10 steps cross two epochs.
    kw = {"batch_size": 8, "seed": 5, "data_dir": jpeg_dir, "image_size": 16}
    fused = _take(train_batches("jpegs", **kw), 10)
    unfused = _take(train_batches("jpegs", fused_jpeg_crop=False, **kw), 10)
    resumed = _take(train_batches("jpegs", start_step=6, threads=1, **kw), 4)
    assert fused[0]["image"].shape == (8, 16, 16, 3)
    for x, y in zip(fused, unfused):
        assert np.array_equal(x["image"], y["image"]) and np.array_equal(x["label"], y["label"])
    for x, y in zip(fused[6:], resumed):
        assert np.array_equal(x["image"], y["image"]) and np.array_equal(x["label"], y["label"])


@pytest.mark.parametrize("bad", [{"prefetch": 0}, {"threads": 0}, {"threads": 1.5}])
def test_bad_read_ahead_or_thread_count_is_refused_by_name(bad):
    from cnn_jax.errors import ConfigError

    with pytest.raises(ConfigError, match=f"{next(iter(bad))}=.*expected an integer >= 1"):
        next(train_batches("synthetic", batch_size=4, seed=0, **bad))


def test_pipelines_run_on_a_private_pool_sized_to_the_host():
    from cnn_jax.data.streaming import host_threads, pipeline_options

    options = pipeline_options()
    assert options.threading.private_threadpool_size == host_threads() >= 1
    assert options.deterministic and options.autotune.enabled
    assert pipeline_options(3).threading.private_threadpool_size == 3


def test_read_ahead_keeps_order_runs_ahead_and_stops_when_closed():
    import threading
    import time

    from cnn_jax.data.feeding import read_ahead

    produced = []
    lock = threading.Lock()

    def items():
        for i in range(100):
            with lock:
                produced.append(i)
            yield i

    ahead = read_ahead(items(), 5)
    assert next(ahead) == 0
    time.sleep(0.3)  # the thread fills the buffer meanwhile
    with lock:
        assert len(produced) >= 6  # item 0 + 5 buffered (+ one waiting to be put)
    assert [next(ahead) for _ in range(10)] == list(range(1, 11))
    ahead.close()
    with lock:
        count = len(produced)
    time.sleep(0.3)
    with lock:
        assert len(produced) == count < 100  # nothing is produced after closing

    def failing():
        yield 1
        raise ValueError("broken record")

    it = read_ahead(failing(), 3)
    assert next(it) == 1
    with pytest.raises(ValueError, match="broken record"):
        next(it)


def test_prefetch_to_device_puts_ahead_in_order():
    from cnn_jax.data.feeding import prefetch_to_device

    puts = []

    def put(batch):
        puts.append(batch)
        return batch * 10

    seen = []
    for out in prefetch_to_device(iter(range(7)), put, size=2):
        seen.append(out)
        # batch k is handed over after batch k + 2 was sent to the devices (or all were)
        assert len(puts) == min(len(seen) + 2, 7)
    assert seen == [10 * i for i in range(7)] and puts == list(range(7))


def _streaming_config(*overrides):
    from cnn_jax.config import apply_overrides, default_config

    return apply_overrides(default_config(), [
        "dataset.name=synthetic", "dataset.synthetic_shape=[8, 8, 1]",
        "dataset.synthetic_size=96", "dataset.feeder=streaming", "model.name=simple_convnet",
        "model.options.features=[4]", "model.options.hidden_features=[8]",
        "model.options.dropout_rate=0.0", "train.batch_size=8", "train.eval_batch_size=32",
        "train.num_epochs=2", "train.log_every_steps=5", "train.steps_per_call=4",
        "optimizer.learning_rate=0.01", *overrides,
    ])  # fmt: skip


def test_streaming_feeder_order_and_bit_exact_resume_with_prefetch(tmp_path):
    import jax

    from cnn_jax.train import load, train_and_evaluate
    from cnn_jax.train.feeders import make_feeder
    from cnn_jax.train.loop import compile_for
    from cnn_jax.train.optimizers import make_optimizer
    from cnn_jax.train.restore import build_model

    config = _streaming_config()
    feeder = make_feeder(config, jax.device_count())
    assert feeder.kind == "streaming"
    model = build_model(config, feeder.num_classes)
    compiled = compile_for(config, model, make_optimizer(config, 12, 24), feeder, jax.devices())
    host = _take(feeder.open_train(0), 15)  # 12 steps per epoch: crosses into epoch 1
    on_device = _take(feeder.train_batches(compiled, 0), 15)
    from_step_7 = _take(feeder.train_batches(compiled, 7), 8)
    for h, d in zip(host, on_device):
        assert np.array_equal(h["image"], np.asarray(d["image"]))
        assert np.array_equal(h["label"], np.asarray(d["label"]))
    for h, d in zip(host[7:], from_step_7):
        assert np.array_equal(h["image"], np.asarray(d["image"]))

    whole = train_and_evaluate(config, tmp_path / "whole")
    first = train_and_evaluate(config, tmp_path / "resumed", max_steps=10)  # mid-call, mid-epoch
    resumed = train_and_evaluate(config, tmp_path / "resumed")
    assert first["steps"] == 10 and resumed["resumed_from"] == 10 and resumed["steps"] == 24
    a, b = load(tmp_path / "whole")[1], load(tmp_path / "resumed")[1]
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert whole["final_test_accuracy"] == resumed["final_test_accuracy"]
