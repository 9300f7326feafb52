"""Tiny dataset files in their original formats (IDX, CIFAR pickles, image trees) for the data
tests. Imported by the test modules as `sample_files` (tests/data is on sys.path)."""

from __future__ import annotations

import gzip
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
SHARED_MNIST = REPO.parent / "shared" / "data" / "mnist"


def write_idx(path: Path, array: np.ndarray, *, magic: int | None = None, cut: int = 0) -> Path:
    """Writes uint8 `array` as an IDX file (.gz when the name says so); `cut` drops trailing bytes."""
    magic = (0x08 << 8 | array.ndim) if magic is None else magic
    raw = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    raw = (raw + array.astype(np.uint8).tobytes())[: -cut or None]
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


def make_idx_folder(folder: Path, n_train: int = 13, n_test: int = 7, seed: int = 0) -> dict:
    """The four MNIST IDX .gz files with random content; returns {split: (images, labels)}."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
        out[split] = (images, labels)
    return out


def cifar_pickles(name: str, sizes: dict[str, int], seed: int = 0) -> tuple[dict, dict]:
    """({basename: pickle bytes}, {split: (images [N,32,32,3], labels {key: [N]})}) laid out like
    the official python version (Python 2 style: bytes keys, data uint8 [N, 3072])."""
    rng = np.random.default_rng(seed)
    files, arrays = {}, {}
    if name == "cifar10":
        names = {"label": [f"class{i}" for i in range(10)]}
        files["batches.meta"] = {b"label_names": [n.encode() for n in names["label"]]}
        layout = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    else:
        names = {
            "label": [f"fine{i}" for i in range(100)],
            "coarse_label": [f"c{i}" for i in range(20)],
        }
        files["meta"] = {
            b"fine_label_names": [n.encode() for n in names["label"]],
            b"coarse_label_names": [n.encode() for n in names["coarse_label"]],
        }
        layout = {"train": ["train"], "test": ["test"]}
    for split, basenames in layout.items():
        images, labels = [], {k: [] for k in names}
        for i, basename in enumerate(basenames):
            n = sizes[split] + (i % 2)  # uneven batch files
            data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
            batch = {b"batch_label": basename.encode(), b"data": data}
            if name == "cifar10":
                lab = rng.integers(0, 10, n).tolist()
                batch[b"labels"] = lab
                labels["label"].append(lab)
            else:
                fine, coarse = rng.integers(0, 100, n).tolist(), rng.integers(0, 20, n).tolist()
                batch[b"fine_labels"], batch[b"coarse_labels"] = fine, coarse
                labels["label"].append(fine)
                labels["coarse_label"].append(coarse)
            files[basename] = batch
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        arrays[split] = (np.concatenate(images), {k: np.concatenate(v) for k, v in labels.items()})
    return {k: pickle.dumps(v, protocol=2) for k, v in files.items()}, arrays


def write_tar(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def make_image_tree(
    root: Path,
    layout: dict[str, dict[str, int]],
    *,
    size=(6, 5),
    mode="RGB",
    fmt="PNG",
    seed: int = 0,
    vary: bool = False,
) -> dict[str, np.ndarray]:
    """Writes root/SPLIT/CLASS/img.ext (or root/CLASS/... for the split '') and returns
    {relative path: pixels [H, W, C]}."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = {}
    for split, classes in layout.items():
        for cls, count in classes.items():
            folder = root / split / cls if split else root / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                w, h = (size[0] + i, size[1] + 2 * i) if vary else size
                c = 1 if mode == "L" else 3
                pixels = rng.integers(0, 256, (h, w, c), dtype=np.uint8)
                image = Image.fromarray(pixels[..., 0] if c == 1 else pixels, mode)
                path = folder / f"img{i}.{'jpg' if fmt == 'JPEG' else fmt.lower()}"
                image.save(path, format=fmt)
                out[path.relative_to(root).as_posix()] = pixels
    return out
