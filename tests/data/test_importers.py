"""Offline import: round trips through tfds.load, and refusal of bad or hostile input."""

from __future__ import annotations

import fcntl
import gzip
import io
import os
import pickle
import subprocess
import sys
import tarfile
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from sample_files import (
    SHARED_MNIST,
    cifar_pickles,
    make_idx_folder,
    make_image_tree,
    write_idx,
    write_tar,
)

from cnn_jax.data import import_dataset, load_split_arrays
from cnn_jax.data.importers import read_idx
from cnn_jax.data.safe_files import restricted_pickle_load
from cnn_jax.errors import DataError


def _load_all(name: str, data_dir, split: str) -> dict:
    return tfds.as_numpy(tfds.load(name, split=split, data_dir=str(data_dir), batch_size=-1))


def _sorted_rows(images: np.ndarray, *label_arrays: np.ndarray) -> list:
    """Examples as sortable tuples: tfds stores examples in a shuffled order."""
    return sorted(zip([im.tobytes() for im in images], *[la.tolist() for la in label_arrays]))


def _nothing_left(data_dir: Path, name: str) -> None:
    assert not (data_dir / name).exists(), "a half-written dataset was left"
    assert not list(data_dir.glob(".import-*")), "a temporary import folder was left"


# ------------------------------------------------------------------------------- round trips


def test_idx_round_trip(tiny_mnist):
    data_dir, arrays = tiny_mnist
    for split, (images, labels) in arrays.items():
        loaded = _load_all("mnist", data_dir, split)  # plain tfds.load, the standard builder
        assert loaded["image"].shape == (len(labels), 28, 28, 1)
        assert _sorted_rows(loaded["image"][..., 0], loaded["label"]) == _sorted_rows(
            images, labels
        )
    info = tfds.builder("mnist", data_dir=data_dir).info
    assert str(info.version) == "3.0.1"
    assert info.splits["train"].num_examples == 23


def test_cifar10_round_trip_from_folder(tmp_path):
    files, arrays = cifar_pickles("cifar10", {"train": 3, "test": 4})
    src = tmp_path / "cifar-10-batches-py"
    src.mkdir()
    for basename, data in files.items():
        (src / basename).write_bytes(data)
    import_dataset("cifar10", tmp_path, tmp_path / "data")  # the parent of the folder works too
    builder = tfds.builder("cifar10", data_dir=str(tmp_path / "data"))
    assert builder.info.features["label"].names == [f"class{i}" for i in range(10)]
    for split, (images, labels) in arrays.items():
        loaded = _load_all("cifar10", tmp_path / "data", split)
        assert _sorted_rows(loaded["image"], loaded["label"]) == _sorted_rows(
            images, labels["label"]
        )
        ids = sorted(i.decode() for i in loaded["id"])
        assert ids == [f"{split}_{i:05d}" for i in range(len(images))]


def test_cifar100_round_trip_from_tarball(tmp_path):
    files, arrays = cifar_pickles("cifar100", {"train": 5, "test": 3})
    tarball = write_tar(
        tmp_path / "cifar-100-python.tar.gz",
        {f"cifar-100-python/{k}": v for k, v in files.items()},
    )
    import_dataset("cifar100", tarball, tmp_path / "data")
    for split, (images, labels) in arrays.items():
        loaded = _load_all("cifar100", tmp_path / "data", split)
        assert _sorted_rows(loaded["image"], loaded["label"], loaded["coarse_label"]) == (
            _sorted_rows(images, labels["label"], labels["coarse_label"])
        )
    # ... and the registry's loader reads it as the device feeder would
    x, y = load_split_arrays("cifar100", "test", data_dir=str(tmp_path / "data"))
    assert x.shape == (3, 32, 32, 3) and y.dtype == np.int32


def test_image_tree_round_trip_png_with_splits(tmp_path):
    pixels = make_image_tree(
        tmp_path / "tree", {"train": {"cat": 3, "dog": 2}, "val": {"cat": 1, "dog": 2}}
    )
    import_dataset("pets", tmp_path / "tree", tmp_path / "data")
    for split, prefix in (("train", "train/"), ("validation", "val/")):
        loaded = _load_all("pets", tmp_path / "data", split)
        got = {f.decode(): (im, lab) for f, im, lab in
               zip(loaded["filename"], loaded["image"], loaded["label"])}  # fmt: skip
        want = {k: v for k, v in pixels.items() if k.startswith(prefix)}
        assert sorted(got) == sorted(want)
        for rel, image in want.items():
            assert np.array_equal(got[rel][0], image)  # pixel by pixel
            assert got[rel][1] == ["cat", "dog"].index(rel.split("/")[1])
    # The registry finds it in the data dir, with its statistics.
    from cnn_jax.data import get_dataset_info

    info = get_dataset_info("pets", data_dir=str(tmp_path / "data"))
    assert info.class_names == ("cat", "dog") and info.image_shape == (5, 6, 3)
    assert info.test_split == "validation" and info.device_resident
    train = np.stack([v for k, v in pixels.items() if k.startswith("train/")]) / 255.0
    np.testing.assert_allclose(info.mean, train.mean((0, 1, 2)), atol=1e-5)
    np.testing.assert_allclose(info.std, train.std((0, 1, 2)), atol=1e-5)
    x, y = load_split_arrays("pets", "validation", data_dir=str(tmp_path / "data"))
    assert x.shape == (3, 5, 6, 3) and sorted(y.tolist()) == [0, 1, 1]


def test_data_list_shows_imported_image_folders(tmp_path, capsys):
    """`cnn-jax data list` lists an imported image folder like the standard datasets (issue 12
    item 19: it was missing, though training on it worked)."""
    from cnn_jax import cli

    make_image_tree(tmp_path / "tree", {"train": {"cat": 2, "dog": 1}, "test": {"cat": 1}})
    import_dataset("pets", tmp_path / "tree", tmp_path / "data")
    assert cli.main(["data", "list", "--data-dir", str(tmp_path / "data")]) == 0
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()}
    assert rows["pets"] == ["pets:1.0.0", "5x6x3", "2", "prepared"]
    assert rows["mnist"][-2:] == ["not", "prepared"]


def test_image_tree_jpeg_grayscale_varying_sizes(tmp_path):
    import tensorflow as tf

    make_image_tree(tmp_path / "tree", {"": {"a": 2, "b": 2}}, mode="L", fmt="JPEG", vary=True)
    out = import_dataset("scans", tmp_path / "tree", tmp_path / "data")
    builder = tfds.builder_from_directory(str(out))
    assert builder.info.features["image"].shape == (None, None, 1)
    for ex in tfds.as_numpy(builder.as_dataset(split="train")):
        original = (tmp_path / "tree" / ex["filename"].decode()).read_bytes()
        # JPEG bytes are stored as they are: decoding gives exactly the original's pixels.
        assert np.array_equal(ex["image"], tf.io.decode_jpeg(original, channels=1).numpy())
    from cnn_jax.data import get_dataset_info

    info = get_dataset_info("scans", data_dir=str(tmp_path / "data"))
    assert info.train_split == "train[:90%]" and info.test_split == "train[90%:]"
    assert not info.device_resident and info.image_shape[-1] == 1
    with pytest.raises(DataError, match="varying sizes"):
        load_split_arrays("scans", data_dir=str(tmp_path / "data"))


def test_real_mnist_files_are_read_by_read_idx():
    if not SHARED_MNIST.is_dir():
        pytest.skip(f"the real MNIST files are not present at {SHARED_MNIST}")
    labels = read_idx(SHARED_MNIST / "t10k-labels-idx1-ubyte.gz", 1)
    assert labels.shape == (10000,) and labels.max() == 9


# ------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "damage, message",
    [
        ("missing", "missing"),
        ("truncated", "truncated"),
        ("truncated_gzip", "cannot read IDX file"),
        ("magic", "wrong magic number"),
        ("trailing", "trailing data"),
        ("count_mismatch", "labels for the"),
    ],
)
def test_bad_idx_files_are_refused_and_leave_nothing(tmp_path, damage, message):
    src = tmp_path / "src"
    arrays = make_idx_folder(src, n_train=4, n_test=3)
    target = src / "t10k-images-idx3-ubyte.gz"
    images = arrays["test"][0]
    if damage == "missing":
        target.unlink()
    elif damage == "truncated":
        write_idx(target, images, cut=100)
    elif damage == "truncated_gzip":
        target.write_bytes(target.read_bytes()[:-30])
    elif damage == "magic":
        write_idx(target, images, magic=0x0801)
    elif damage == "trailing":
        raw = (0x0803).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in images.shape)
        target.write_bytes(gzip.compress(raw + images.tobytes() + b"\x00\x01"))
    elif damage == "count_mismatch":
        write_idx(src / "t10k-labels-idx1-ubyte.gz", np.zeros(2, np.uint8))
    data_dir = tmp_path / "data"
    with pytest.raises(DataError, match=message) as e:
        import_dataset("mnist", src, data_dir)
    assert "t10k-" in str(e.value)  # the error names the file
    _nothing_left(data_dir, "mnist")


@pytest.mark.parametrize(
    "member, kind",
    [("../evil", "file"), ("/abs/evil", "file"), ("cifar-10-batches-py/link", "symlink"),
     ("cifar-10-batches-py/hard", "hardlink"), ("cifar-10-batches-py/dev", "fifo")],
)  # fmt: skip
def test_archive_members_escaping_or_special_are_refused(tmp_path, member, kind):
    files, _ = cifar_pickles("cifar10", {"train": 1, "test": 1})
    tarball = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo(member)
        if kind == "symlink":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        elif kind == "hardlink":
            info.type, info.linkname = tarfile.LNKTYPE, "../../outside"
        elif kind == "fifo":
            info.type = tarfile.FIFOTYPE
        tar.addfile(info, io.BytesIO(b"") if kind == "file" else None)
    with pytest.raises(DataError, match="refusing archive member") as e:
        import_dataset("cifar10", tarball, tmp_path / "data")
    assert str(tarball) in str(e.value) and member in str(e.value)
    _nothing_left(tmp_path / "data", "cifar10")
    assert not (tmp_path / "evil").exists()


class _RunsCode:
    """A pickle payload that would run a shell command when unpickled by `pickle.load`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    src = tmp_path / "cifar-10-batches-py"
    src.mkdir()
    files, _ = cifar_pickles("cifar10", {"train": 1, "test": 1})
    for basename, data in files.items():
        (src / basename).write_bytes(data)
    (src / "data_batch_2").write_bytes(pickle.dumps({b"data": _RunsCode(marker)}, protocol=2))
    with pytest.raises(DataError, match=r"refusing to unpickle (posix|os|nt)\.system") as e:
        import_dataset("cifar10", src, tmp_path / "data")
    assert "data_batch_2" in str(e.value)
    assert not marker.exists(), "the pickle ran code"
    _nothing_left(tmp_path / "data", "cifar10")


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_restricted_unpickler_admits_plain_data_and_arrays(protocol):
    value = {b"data": np.arange(12, dtype=np.uint8).reshape(3, 4), "x": [1, 2.5, "s", b"b"],
             "t": (None, True), "f": np.float32(1.5), "i": np.int64(3)}  # fmt: skip
    back = restricted_pickle_load(pickle.dumps(value, protocol=protocol), "test.pkl")
    assert np.array_equal(back[b"data"], value[b"data"]) and back["x"] == value["x"]
    assert back["t"] == (None, True) and back["f"] == np.float32(1.5) and back["i"] == 3


@pytest.mark.parametrize("payload", [b"not a pickle", pickle.dumps({1: 2})[:-3]])
def test_unreadable_pickles_are_refused(payload):
    with pytest.raises(DataError, match="x.pkl: not a readable pickle"):
        restricted_pickle_load(payload, "x.pkl")


def test_cifar_batch_with_wrong_content_is_refused(tmp_path):
    files, _ = cifar_pickles("cifar10", {"train": 2, "test": 2})
    files["test_batch"] = pickle.dumps({b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]})
    for basename, data in files.items():
        (tmp_path / basename).write_bytes(data)
    with pytest.raises(DataError, match=r"test_batch: 'data' must be a uint8 array \[N, 3072\]"):
        import_dataset("cifar10", tmp_path, tmp_path / "data")
    (tmp_path / "test_batch").unlink()
    with pytest.raises(DataError, match="test_batch.*missing"):
        import_dataset("cifar10", tmp_path, tmp_path / "data")


def test_image_tree_bad_inputs(tmp_path):
    tree = tmp_path / "tree"
    make_image_tree(tree, {"": {"a": 1, "b": 1}})
    (tree / "b" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match="broken.png: not a readable image"):
        import_dataset("things", tree, tmp_path / "data")
    (tree / "b" / "broken.png").unlink()
    (tree / "c").mkdir()
    (tree / "c" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="c: no image files"):
        import_dataset("things", tree, tmp_path / "data")
    (tree / "c" / "notes.txt").unlink()
    (tree / "c").rmdir()
    with pytest.raises(DataError, match="standard dataset"):
        import_dataset("imagenette", tree, tmp_path / "data")
    with pytest.raises(DataError, match="lowercase"):
        import_dataset("My Things", tree, tmp_path / "data")
    _nothing_left(tmp_path / "data", "things")


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    from PIL import Image

    tree = tmp_path / "tree"
    make_image_tree(tree, {"": {"a": 1}}, size=(40, 40))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 40x40 counts as a bomb now
    with pytest.raises(DataError, match="img0.png: not a readable image.*DecompressionBomb"):
        import_dataset("bombs", tree, tmp_path / "data")
    _nothing_left(tmp_path / "data", "bombs")


def test_existing_dataset_is_kept_unless_overwrite(tmp_path):
    tree = tmp_path / "tree"
    make_image_tree(tree, {"": {"a": 1, "b": 1}})
    out = import_dataset("things", tree, tmp_path / "data")
    with pytest.raises(DataError, match="already exists"):
        import_dataset("things", tree, tmp_path / "data")
    make_image_tree(tree, {"": {"c": 1}})
    assert import_dataset("things", tree, tmp_path / "data", overwrite=True) == out
    assert tfds.builder_from_directory(str(out)).info.features["label"].names == ["a", "b", "c"]
    assert not list((tmp_path / "data").glob(".import-*"))


def test_missing_source(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        import_dataset("mnist", tmp_path / "nowhere", tmp_path / "data")


# ----------------------------------------------------------------- concurrent and killed imports

RACER = """
import sys, time
from pathlib import Path
from cnn_jax.data import _tf, import_dataset
from cnn_jax.errors import DataError

_tf.tfds().builder_cls("mnist")  # warm (without TensorFlow), so that the imports overlap
src, data_dir, ready, go = map(Path, sys.argv[1:5])
ready.touch()
while not go.exists():
    time.sleep(0.005)
try:
    import_dataset("mnist", src, data_dir)
    print("imported")
except DataError as e:
    print(f"refused: {e}")
"""


def _import_outcome(src: Path, data_dir: Path) -> str:
    try:
        import_dataset("mnist", src, data_dir)
        return "imported"
    except DataError as e:
        return f"refused: {e}"


def test_racing_imports_of_one_dataset_are_serialised(tmp_path):
    """Three processes (two started here, and this one) import mnist into one data dir at the
    same moment: one imports it, the others are refused (another import is running, or the
    dataset is there); none reports a success that another import then overwrites."""
    arrays = make_idx_folder(tmp_path / "src", n_train=9, n_test=4)
    data_dir, go = tmp_path / "data", tmp_path / "go"
    argv = [sys.executable, "-c", RACER, tmp_path / "src", data_dir]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    racers = [subprocess.Popen([*argv, tmp_path / f"ready{i}", go], **pipes) for i in range(2)]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)):
        exited = [r.communicate() for r in racers if r.poll() is not None]
        assert time.monotonic() < deadline and not exited, exited
        time.sleep(0.01)
    go.touch()
    results = [_import_outcome(tmp_path / "src", data_dir)]
    outputs = [r.communicate(timeout=120) for r in racers]
    results += [out.strip() for out, _ in outputs]
    assert all(r.returncode == 0 for r in racers), outputs
    assert sorted(r.split(":")[0] for r in results) == ["imported", "refused", "refused"], results
    for result in results:
        if result.startswith("refused"):
            assert "is being imported into" in result or "already exists" in result, result
    loaded = _load_all("mnist", data_dir, "train")
    assert _sorted_rows(loaded["image"][..., 0], loaded["label"]) == _sorted_rows(*arrays["train"])
    assert not list(data_dir.glob(".import-*"))


def _hold_import_lock(data_dir: Path, name: str):
    """Takes the import lock of `name` as a running import (another process) would."""
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / f".cnn_jax-import-{name}.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, b'{"pid": 4242}')  # as cnn_jax.file_lock.FileLock records its holder
    return fd


def test_import_is_refused_while_another_runs_and_its_temp_folder_is_kept(tmp_path):
    tree = tmp_path / "tree"
    make_image_tree(tree, {"": {"a": 1, "b": 1}})
    data_dir = tmp_path / "data"
    fd = _hold_import_lock(data_dir, "things")
    live = data_dir / ".import-things-live123"
    (live / "downloads").mkdir(parents=True)  # the running import's work
    try:
        with pytest.raises(DataError, match="being imported into .* by another process") as e:
            import_dataset("things", tree, data_dir)
        assert "process id 4242" in str(e.value) and "'things'" in str(e.value)
        assert (live / "downloads").is_dir(), "the temporary folder of a live import was removed"
        assert not (data_dir / "things").exists()
    finally:
        os.close(fd)  # the other import ends (here: dies without cleaning up)
    out = import_dataset("things", tree, data_dir)
    assert out == data_dir / "things" / "1.0.0" and not live.exists()


def test_temp_folders_of_killed_imports_are_removed_by_the_next_import(tmp_path):
    """A kill -9 during an import leaves .import-NAME-XXXX behind; the next import of NAME
    removes it (and only temp folders of NAME)."""
    tree = tmp_path / "tree"
    make_image_tree(tree, {"": {"a": 1, "b": 1}})
    data_dir = tmp_path / "data"
    stale = [data_dir / ".import-things-k1ll3d", data_dir / ".import-things-0ld"]
    for folder in stale:
        (folder / "things" / "1.0.0.incomplete").mkdir(parents=True)
        (folder / "things" / "1.0.0.incomplete" / "shard").write_bytes(bytes(1000))
    other = data_dir / ".import-things_too-x1"  # another dataset's: not ours to remove
    other.mkdir()
    import_dataset("things", tree, data_dir)
    assert not any(folder.exists() for folder in stale)
    assert other.is_dir()
    # A failed import (bad source) also leaves nothing of its own behind.
    (tree / "b" / "img0.png").write_bytes(b"broken")
    with pytest.raises(DataError, match="not a readable image"):
        import_dataset("things_too", tree, data_dir)
    assert not other.exists()  # under its lock, the stale one was removed
    assert sorted(p.name for p in data_dir.glob(".import-*")) == []


# ------------------------------------------------------- decompression bombs, corrupt and odd IDX


def _gzip_stream(path: Path, head: bytes, zeros: int) -> Path:
    """`head` then `zeros` zero bytes, gzip-compressed chunk by chunk (a bomb: 64 MiB of zeros
    is a 64 kB file)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: gzip container
    chunk = bytes(1 << 20)
    with open(path, "wb") as f:
        f.write(packer.compress(head))
        f.writelines(packer.compress(chunk[: zeros - s]) for s in range(0, zeros, len(chunk)))
        f.write(packer.flush())
    return path


def _idx_head(dims: tuple[int, ...]) -> bytes:
    return (0x0800 | len(dims)).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)


def test_idx_decompression_bomb_costs_no_memory(tmp_path):
    """A valid IDX followed by 64 MiB of zeros (a 64 kB .gz): refused as trailing data after
    reading no more than the declared size (the old reader decompressed it all into memory)."""
    head = _idx_head((12, 28, 28)) + bytes(12 * 28 * 28)
    bomb = _gzip_stream(tmp_path / "train-images-idx3-ubyte.gz", head, 64 << 20)
    assert bomb.stat().st_size < 200_000
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: has trailing data"):
            read_idx(bomb, 3)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"reading the bomb took {peak / 2**20:.0f} MiB"


@pytest.mark.parametrize(
    "dims, fragment",
    [
        # 2**31 * 2**31 * 4 = 2**64 wraps to 0 in int64 (the old reader's np.prod)
        ((2**31, 2**31, 4), "declares 2147483648x2147483648x4 = 18446744073709551616 bytes"),
        ((2**32 - 1,) * 3, "declares 4294967295x4294967295x4294967295 = "),
        ((1_400_000, 28, 28), ("declares 1400000x28x28 = 1097600000 bytes of data, more than "
         "the 1073741824 bytes an IDX file may hold here")),
    ],
)  # fmt: skip
def test_idx_declared_size_over_the_limit_is_refused_before_reading(tmp_path, dims, fragment):
    path = _gzip_stream(tmp_path / "t10k-images-idx3-ubyte.gz", _idx_head(dims), 1 << 20)
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz: ") as e:
            read_idx(path, 3)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert fragment in str(e.value)
    assert peak < 4 << 20


def test_corrupt_gzip_block_and_checksum(tmp_path):
    images = np.random.default_rng(0).integers(0, 4, (12, 28, 28), dtype=np.uint8)
    packed = bytearray(gzip.compress(_idx_head(images.shape) + images.tobytes(), mtime=0))
    path = tmp_path / "train-images-idx3-ubyte.gz"
    bad_block = bytearray(packed)
    bad_block[10] = 0xFF  # the first deflate block header: final, reserved type 3
    path.write_bytes(bad_block)
    with pytest.raises(
        DataError, match=r"images-idx3-ubyte.gz: cannot read IDX file \(corrupt gzip"
    ):
        read_idx(path, 3)
    bad_crc = bytearray(packed)
    bad_crc[-8] ^= 1  # the CRC-32 of the content
    path.write_bytes(bad_crc)
    with pytest.raises(DataError, match="images-idx3-ubyte.gz: cannot read IDX file .*CRC check"):
        read_idx(path, 3)


def test_idx_with_zero_images_is_refused(tmp_path):
    src = tmp_path / "src"
    make_idx_folder(src, n_train=4, n_test=3)
    write_idx(src / "t10k-images-idx3-ubyte.gz", np.zeros((0, 28, 28), np.uint8))
    write_idx(src / "t10k-labels-idx1-ubyte.gz", np.zeros(0, np.uint8))
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz: holds 0 images"):
        import_dataset("mnist", src, tmp_path / "data")
    _nothing_left(tmp_path / "data", "mnist")


@pytest.mark.parametrize("where", ["file", "file/sub", "file/sub/deeper"])
def test_data_dir_that_is_or_lies_under_a_file(tmp_path, where):
    src = tmp_path / "src"
    make_idx_folder(src, n_train=2, n_test=2)
    (tmp_path / "file").write_text("not a folder")
    data_dir = tmp_path / where
    with pytest.raises(DataError) as e:
        import_dataset("mnist", src, data_dir)
    problem = (
        "is a file" if where == "file" else f"cannot be created: '{tmp_path / 'file'}' is a file"
    )
    assert f"data dir '{data_dir}' {problem}, not a folder" in str(e.value)
    assert (tmp_path / "file").read_text() == "not a folder"


# --------------------------------------------------------------- compressed CIFAR archive damage


def _cifar_tarball(tmp_path: Path) -> Path:
    files, _ = cifar_pickles("cifar10", {"train": 1, "test": 1})
    return write_tar(
        tmp_path / "cifar-10-python.tar.gz",
        {f"cifar-10-batches-py/{k}": v for k, v in files.items()},
    )


def test_cifar_tarball_with_bad_checksum_is_refused(tmp_path):
    """tarfile stops reading at the end-of-archive marker and never checks the gzip CRC: the
    damaged content would be imported."""
    tarball = _cifar_tarball(tmp_path)
    damaged = bytearray(tarball.read_bytes())
    damaged[-8] ^= 1
    tarball.write_bytes(damaged)
    with pytest.raises(DataError, match="not a readable tar archive .corrupt compressed data.*CRC"):
        import_dataset("cifar10", tarball, tmp_path / "data")
    _nothing_left(tmp_path / "data", "cifar10")


def test_cifar_tarball_bomb_and_oversized_member_are_refused(tmp_path, monkeypatch):
    from cnn_jax.data import safe_files

    tarball = _cifar_tarball(tmp_path)
    monkeypatch.setattr(safe_files, "MAX_ARCHIVE_BYTES", 50_000)  # it expands to ~70 kB
    with pytest.raises(
        DataError, match=r"cifar-10-python.tar.gz: expands to more than 50000 bytes"
    ):
        import_dataset("cifar10", tarball, tmp_path / "data")
    monkeypatch.setattr(safe_files, "MAX_ARCHIVE_BYTES", 2**32)
    monkeypatch.setattr(safe_files, "MAX_MEMBER_BYTES", 9_000)  # data_batch_2 is 9525 bytes
    with pytest.raises(DataError, match=r"gz:cifar-10-batches-py/data_batch_2: 9525 bytes, more"):
        import_dataset("cifar10", tarball, tmp_path / "data")
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "batches.meta").write_bytes(bytes(10_000))
    with pytest.raises(DataError, match=r"batches.meta: 10000 bytes, more than the 9000 bytes"):
        import_dataset("cifar10", folder, tmp_path / "data")
    _nothing_left(tmp_path / "data", "cifar10")


def test_out_of_space_while_writing_is_a_data_error(tmp_path, monkeypatch):
    import errno
    import tempfile

    src = tmp_path / "src"
    make_idx_folder(src, n_train=2, n_test=2)
    temp = tmp_path / "data" / ".import-mnist-full"

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(temp))

    monkeypatch.setattr(tempfile, "mkdtemp", no_space)
    with pytest.raises(DataError) as e:
        import_dataset("mnist", src, tmp_path / "data")
    assert str(e.value).startswith(
        f"import of 'mnist' failed while writing (No space left on device): {temp}; expected"
    )
