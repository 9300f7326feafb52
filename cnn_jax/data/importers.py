"""Offline import: prepare a tfds dataset from files the user already has, with no network.

After `import_dataset(name, source, data_dir)`, plain `tfds.load(name, data_dir=data_dir)` works.

- mnist, fashion_mnist: the four IDX files (`train-images-idx3-ubyte.gz`, ... also accepted
  uncompressed). Written by the standard tfds builder class with only its source of files
  replaced, so the result (features, version, example keys, hence the stored order) is what
  `tfds.load` would have produced after a download.
- cifar10, cifar100: the official python-pickle tarball (`cifar-10-python.tar.gz`) or its
  extracted folder. tfds' builders read the binary version; the pickles hold the same images
  in the same order, and are converted to the standard builder's features ('id' train_00000...).
  Pickles are read only through a restricted unpickler (`safe_files`).
- any other name: a class-per-folder image tree (ImageFolder style), either `ROOT/CLASS/img` or
  `ROOT/SPLIT/CLASS/img` with SPLIT in train/test/validation(val, valid). Stored as
  `data_dir/NAME/1.0.0` (loadable with `tfds.load(NAME, data_dir=...)` or
  `tfds.builder_from_directory`) with per-channel statistics for the registry.

Every import is written into a temporary folder inside data_dir and moved into place with one
rename, so an error or a kill never leaves a half-written dataset where tfds would read it.
Imports of one dataset into one data_dir are serialised by a lock (a second one is refused while
the first runs), and the temporary folders of killed imports are removed by the next import.
IDX files are read incrementally and checked against their declared sizes (decompression bombs
cost no memory beyond MAX_IDX_BYTES); images are brought to 8 bits by `images.to_8bit`.
"""

from __future__ import annotations

import gzip
import math
import os
import re
import shutil
import tempfile
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import numpy as np

from cnn_jax.data import _tf
from cnn_jax.data.images import GRAY_MODES, to_8bit
from cnn_jax.data.registry import STANDARD_IMPORTS, resolve_data_dir
from cnn_jax.data.safe_files import ArchiveReader, check_file_size, restricted_pickle_load
from cnn_jax.errors import DataError
from cnn_jax.file_lock import FileLock, LockHeld

# ----------------------------------------------------------------------------------------------
# IDX files (MNIST, Fashion-MNIST)
# ----------------------------------------------------------------------------------------------

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_UBYTE = 0x08
# The most data one IDX file may declare (MNIST's train images are 47 MB): caps the memory an
# import of a damaged or hostile file can take.
MAX_IDX_BYTES = 2**30
_CHUNK = 1 << 20


def _read_into(f, buffer: memoryview) -> int:
    """Fills `buffer` from the binary stream `f` chunk by chunk; returns the bytes read."""
    filled = 0
    while filled < len(buffer):
        n = f.readinto(buffer[filled : filled + _CHUNK])
        if not n:
            break
        filled += n
    return filled


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """A uint8 IDX file (gzip-compressed or not) as an array with the header's dimensions.

    The stream is read incrementally, never past the size the header declares (plus one byte to
    detect trailing data), so a decompression bomb costs no more memory than that size, which
    may not exceed MAX_IDX_BYTES. Raises DataError naming the file for a wrong magic number, a
    declared size over the limit, a corrupt gzip stream, or data shorter or longer than the
    header says.
    """
    header_size = 4 + 4 * ndim
    expected = (_IDX_UBYTE << 8) | ndim
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            header = bytearray(header_size)
            got = _read_into(f, memoryview(header))
            if got < header_size:
                raise DataError(f"{path}: truncated IDX file: {got} bytes, shorter than its header")
            magic = int.from_bytes(header[:4], "big")
            if magic != expected:
                raise DataError(
                    f"{path}: wrong magic number 0x{magic:08x}; expected 0x{expected:08x} "
                    f"(an IDX file of uint8 with {ndim} dimension{'s' if ndim > 1 else ''})"
                )
            dims = [int.from_bytes(header[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
            size = math.prod(dims)  # Python ints: no overflow
            shape = "x".join(map(str, dims))
            if size > MAX_IDX_BYTES:
                raise DataError(
                    f"{path}: the header declares {shape} = {size} bytes of data, more than the "
                    f"{MAX_IDX_BYTES} bytes an IDX file may hold here (a damaged header, or not "
                    "an MNIST-style file)"
                )
            data = np.empty(size, np.uint8)
            got = _read_into(f, memoryview(data))
            if got < size:
                raise DataError(
                    f"{path}: truncated: the header says {shape} = {size} bytes of data, "
                    f"the file holds {got}"
                )
            if f.read(1):
                raise DataError(
                    f"{path}: has trailing data: the header says {shape} = {size} bytes of "
                    "data, the file holds more"
                )
    except (OSError, EOFError) as e:  # truncated gzip stream, bad CRC, unreadable file
        raise DataError(f"{path}: cannot read IDX file ({type(e).__name__}: {e})") from e
    except zlib.error as e:  # a corrupt deflate block
        raise DataError(f"{path}: cannot read IDX file (corrupt gzip data: {e})") from e
    return data.reshape(dims)


def _find_idx(source: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (source / name).is_file():
            return source / name
    raise DataError(f"{source / (stem + '.gz')}: missing (expected the IDX file {stem}[.gz])")


def read_idx_dataset(source: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{'train'|'test': (images uint8 [N, 28, 28, 1], labels int64 [N])} from a folder."""
    if not source.is_dir():
        raise DataError(f"{source}: expected a folder holding the four IDX files")
    splits = {}
    for split, (image_stem, label_stem) in IDX_FILES.items():
        image_path, label_path = _find_idx(source, image_stem), _find_idx(source, label_stem)
        images = read_idx(image_path, 3)
        if images.shape[1:] != (28, 28):
            raise DataError(f"{image_path}: images are {images.shape[1:]}, expected 28x28")
        if not len(images):
            raise DataError(
                f"{image_path}: holds 0 images (the header says 0x28x28); expected at least one"
            )
        labels = read_idx(label_path, 1)
        if len(images) != len(labels):
            raise DataError(
                f"{label_path}: {len(labels)} labels for the {len(images)} images of {image_path}"
            )
        if labels.size and labels.max() > 9:
            raise DataError(f"{label_path}: label {labels.max()} outside 0..9")
        splits[split] = (images[..., None], labels.astype(np.int64))
    return splits


# ----------------------------------------------------------------------------------------------
# CIFAR python-pickle files
# ----------------------------------------------------------------------------------------------

CIFAR_LAYOUT = {
    # name: (folder in the tarball, train files, test files, meta file, label keys in the meta)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                "batches.meta", {"label": "label_names"}),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta",
                 {"coarse_label": "coarse_label_names", "label": "fine_label_names"}),
}  # fmt: skip
# Example label keys of the tfds builders -> keys of the pickled batches.
_CIFAR_BATCH_KEYS = {"label": ("labels", "fine_labels"), "coarse_label": ("coarse_labels",)}


class _CifarFiles:
    """The pickled CIFAR files, from a tarball or a folder (the extracted one or its parent)."""

    def __init__(self, source: Path, folder: str):
        self.source, self.archive, self.folder = source, None, None
        if source.is_file():
            self.archive = ArchiveReader(source)
        elif (source / folder).is_dir():
            self.folder = source / folder
        elif source.is_dir():
            self.folder = source
        else:
            raise DataError(f"{source}: expected a CIFAR python-version tarball or folder")

    def load(self, basename: str):
        """(unpickled object, display name)."""
        if self.archive is not None:
            member = self.archive.find(basename)
            if member is None:
                raise DataError(f"{self.source}: the archive has no file {basename!r}")
            display = f"{self.source}:{member}"
            return restricted_pickle_load(self.archive.read(member), display), display
        path = self.folder / basename
        if not path.is_file():
            raise DataError(f"{path}: missing (expected the CIFAR file {basename!r})")
        check_file_size(path.stat().st_size, str(path))
        return restricted_pickle_load(path.read_bytes(), str(path)), str(path)


def _str_keys(obj, display: str) -> dict:
    if not isinstance(obj, dict):
        raise DataError(f"{display}: expected a pickled dict, found {type(obj).__name__}")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _label_names(meta: dict, key: str, display: str) -> list[str]:
    names = meta.get(key)
    if not isinstance(names, list) or not names:
        raise DataError(f"{display}: no {key!r} list in the meta file")
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]


def read_cifar(name: str, source: Path) -> tuple[dict, dict]:
    """(label names {label key: [names]}, {split: (images uint8 [N,32,32,3], {label key: int64
    [N]})}) from the CIFAR python-version files; DataError naming the file on any problem."""
    folder, train_files, test_files, meta_file, meta_keys = CIFAR_LAYOUT[name]
    files = _CifarFiles(source, folder)
    try:
        meta, display = files.load(meta_file)
        meta = _str_keys(meta, display)
        names = {key: _label_names(meta, mkey, display) for key, mkey in meta_keys.items()}
        splits = {}
        for split, basenames in (("train", train_files), ("test", test_files)):
            images, labels = [], {key: [] for key in meta_keys}
            for basename in basenames:
                batch, display = files.load(basename)
                batch = _str_keys(batch, display)
                data = batch.get("data")
                if not (isinstance(data, np.ndarray) and data.dtype == np.uint8
                        and data.ndim == 2 and data.shape[1] == 3072):  # fmt: skip
                    raise DataError(f"{display}: 'data' must be a uint8 array [N, 3072]")
                images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
                for key in meta_keys:
                    batch_key = next((k for k in _CIFAR_BATCH_KEYS[key] if k in batch), None)
                    values = np.asarray(batch.get(batch_key, []), dtype=np.int64)
                    if (
                        values.shape != (len(data),)
                        or values.min(initial=0) < 0
                        or (values.max(initial=0) >= len(names[key]))
                    ):
                        raise DataError(
                            f"{display}: expected {len(data)} {key} values in "
                            f"0..{len(names[key]) - 1} under {_CIFAR_BATCH_KEYS[key]}"
                        )
                    labels[key].append(values)
            splits[split] = (
                np.concatenate(images),
                {key: np.concatenate(v) for key, v in labels.items()},
            )
    finally:
        if files.archive is not None:
            files.archive.close()
    return names, splits


# ----------------------------------------------------------------------------------------------
# Class-per-folder image trees
# ----------------------------------------------------------------------------------------------

IMAGE_EXTENSIONS = (
    ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp"
)  # fmt: skip
_SPLIT_DIRS = {"train": "train", "test": "test", "validation": "validation",
               "val": "validation", "valid": "validation"}  # fmt: skip


def _visible_dirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _image_files(class_dir: Path) -> list[Path]:
    return sorted(
        p for p in class_dir.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(class_dir).parts)
    )  # fmt: skip


def scan_image_tree(source: Path) -> tuple[list[str], dict[str, list[tuple[Path, int]]]]:
    """(class names, {split: [(file, label)]}) of an image tree; DataError when malformed."""
    if not source.is_dir():
        raise DataError(f"{source}: expected a folder of class folders holding images")
    top = _visible_dirs(source)
    if top and all(p.name.lower() in _SPLIT_DIRS for p in top):
        split_dirs = {_SPLIT_DIRS[p.name.lower()]: p for p in top}
        if "train" not in split_dirs:
            raise DataError(f"{source}: split folders {[p.name for p in top]} but no 'train'")
    else:
        split_dirs = {"train": source}
    classes = [p.name for p in _visible_dirs(split_dirs["train"])]
    if not classes:
        raise DataError(f"{split_dirs['train']}: no class folders found")
    splits = {}
    for split, split_dir in split_dirs.items():
        files = []
        for class_dir in _visible_dirs(split_dir):
            if class_dir.name not in classes:
                raise DataError(
                    f"{class_dir}: class {class_dir.name!r} is not among the train classes"
                )
            found = _image_files(class_dir)
            if not found:
                raise DataError(f"{class_dir}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
            files += [(f, classes.index(class_dir.name)) for f in found]
        splits[split] = files
    return classes, splits


def _open_image(path: Path):
    """A loaded PIL image with 8-bit channels (16-bit greyscale scaled, `images.to_8bit`);
    DataError naming the file if it is unreadable, a decompression bomb, or of 32-bit depth."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
            image.load()
    except (OSError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"{path}: not a readable image ({type(e).__name__}: {e})") from e
    return to_8bit(image, str(path))


def _pixels(image, channels: int) -> np.ndarray:
    """uint8 [H, W, channels] pixels of a PIL image."""
    return np.asarray(image.convert("L" if channels == 1 else "RGB"), np.uint8).reshape(
        image.height, image.width, channels
    )


def _tree_plan(classes: list[str], splits: dict) -> dict:
    """One pass over the headers and pixels: channels, shape, encoding, train statistics."""
    modes, sizes, all_jpeg = set(), set(), True
    for files in splits.values():
        for path, _ in files:
            image = _open_image(path)
            modes.add(image.mode)
            sizes.add(image.size)
            all_jpeg &= image.format == "JPEG" and image.mode in ("RGB", "L")
    channels = 1 if modes <= set(GRAY_MODES) else 3
    total = np.zeros(channels)
    total_sq = np.zeros(channels)
    count = 0
    for path, _ in splits["train"]:
        x = _pixels(_open_image(path), channels).reshape(-1, channels) / 255.0
        total += x.sum(0)
        total_sq += (x * x).sum(0)
        count += len(x)
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean * mean, 1e-12))
    fixed = len(sizes) == 1
    if fixed:
        ((w, h),) = sizes
        shape = (h, w, channels)
        feature_shape = shape
    else:  # varying sizes: the model sees crops of the median shorter side, at most 224
        side = int(min(224, np.median([min(s) for s in sizes])))
        shape, feature_shape = (side, side, channels), (None, None, channels)
    n = sum(len(f) for f in splits.values())
    test_split = next((s for s in ("test", "validation") if s in splits), "train[90%:]")
    return {
        "cnn_jax_image_folder": True,
        "class_names": classes,
        "image_shape": list(shape),
        "feature_shape": list(feature_shape),
        "encoding": "jpeg" if all_jpeg else "png",  # JPEG bytes are kept as they are
        "mean": [round(float(m), 6) for m in mean],
        "std": [round(float(s), 6) for s in std],
        "train_split": "train" if test_split != "train[90%:]" else "train[:90%]",
        "test_split": test_split,
        "device_resident": fixed and n * int(np.prod(shape)) < 2**30,
    }


# ----------------------------------------------------------------------------------------------
# Builders: the standard classes with local sources, and the image-folder builder
# ----------------------------------------------------------------------------------------------


def _local_idx_builder(name: str, splits: dict, data_dir: str):
    tfds = _tf.tfds()
    base = tfds.builder_cls(name)

    class LocalIdx(base, skip_registration=True):
        """The standard builder, reading validated local IDX arrays instead of downloading."""

        def _split_generators(self, dl_manager):
            return {split: self._local_examples(*arrays) for split, arrays in splits.items()}

        def _local_examples(self, images, labels):
            # Same records and keys as the standard `_generate_examples` (index -> order).
            for index, (image, label) in enumerate(zip(images, labels)):
                yield index, {"image": image, "label": label}

    # Same name and module as the standard class, so even dataset_info.json matches a download.
    LocalIdx.name, LocalIdx.__module__ = base.name, base.__module__
    return LocalIdx(data_dir=data_dir)


def _local_cifar_builder(name: str, names: dict, splits: dict, data_dir: str):
    tfds = _tf.tfds()
    base = tfds.builder_cls(name)

    class LocalCifar(base, skip_registration=True):
        """The standard builder, fed from the python-pickle version instead of the binary one."""

        def _split_generators(self, dl_manager):
            for key, label_names in names.items():
                self.info.features[key].names = label_names
            return {
                split: self._local_examples(f"{split}_", images, labels)
                for split, (images, labels) in splits.items()
            }

        def _local_examples(self, prefix, images, labels):
            for index, image in enumerate(images):
                record = {key: values[index] for key, values in labels.items()}
                record["id"] = f"{prefix}{index:05d}"
                record["image"] = image
                yield index, record

    LocalCifar.name, LocalCifar.__module__ = base.name, base.__module__
    return LocalCifar(data_dir=data_dir)


def _image_folder_builder(name: str, source: Path, splits: dict, plan: dict, data_dir: str):
    tfds = _tf.tfds()
    channels = plan["image_shape"][-1]

    class ImageFolder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")
        RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Imported with cnn-jax data import."}

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                description=f"Image folder imported from {source.name!r} with cnn-jax.",
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(
                            shape=tuple(plan["feature_shape"]), encoding_format=plan["encoding"]
                        ),
                        "label": tfds.features.ClassLabel(names=plan["class_names"]),
                        "filename": tfds.features.Text(),
                    }
                ),
                supervised_keys=("image", "label"),
                metadata=tfds.core.MetadataDict(plan),
            )

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(files) for split, files in splits.items()}

        def _generate_examples(self, files):
            for path, label in files:
                rel = path.relative_to(source).as_posix()
                if plan["encoding"] == "jpeg":
                    image = path.read_bytes()
                else:
                    image = _pixels(_open_image(path), channels)
                yield rel, {"image": image, "label": label, "filename": rel}

    ImageFolder.name = name
    return ImageFolder(data_dir=data_dir)


# ----------------------------------------------------------------------------------------------
# import_dataset
# ----------------------------------------------------------------------------------------------

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


def _is_tfds_builder(name: str) -> bool:
    try:
        _tf.tfds().builder_cls(name)
        return True
    except ValueError:  # tfds' DatasetNotFoundError
        return False


def _usable_data_dir(data_dir: Path) -> None:
    """Creates `data_dir` if needed; DataError naming it when it is, or lies under, a file."""
    blocker = next((p for p in (data_dir, *data_dir.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        problem = "is" if blocker == data_dir else f"cannot be created: {str(blocker)!r} is"
        raise DataError(
            f"data dir {str(data_dir)!r} {problem} a file, not a folder; expected a folder "
            "(or a path where one can be created)"
        )
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(
            f"data dir {str(data_dir)!r} cannot be created: {e.strerror or e}; expected a "
            "writable folder"
        ) from e


class _ImportLock(FileLock):
    """An exclusive lock on `data_dir/.cnn_jax-import-NAME.lock` while NAME is imported
    (`cnn_jax.file_lock.FileLock`, as for workdirs): the kernel releases it when its holder
    dies, however it dies, so, under the lock, any `.import-NAME-*` temporary folder belongs to
    an import that is no longer running (it was killed) and is removed.
    """

    def __init__(self, data_dir: Path, name: str):
        super().__init__(data_dir / f".cnn_jax-import-{name}.lock")
        self.data_dir, self.name = data_dir, name

    def acquire(self) -> None:
        try:
            super().acquire()
        except LockHeld as e:
            raise DataError(
                f"dataset {self.name!r} is being imported into {str(self.data_dir)!r} by another "
                f"process ({e.describe()}); wait for it to finish (then the dataset is there), "
                "or stop it and import again"
            ) from None
        except OSError as e:
            raise DataError(
                f"data dir {str(self.data_dir)!r}: cannot create or lock {self.path.name} "
                f"({e.strerror or e}); expected a writable folder"
            ) from e


def stale_import_folders(data_dir: Path, name: str) -> list[Path]:
    """The temporary folders of imports of `name` into `data_dir` (only stale ones while the
    import lock of `name` is held, see `_ImportLock`)."""
    return sorted(p for p in data_dir.glob(f".import-{name}-*") if p.is_dir())


def _prepare_atomically(
    name: str, data_dir: Path, make_builder: Callable[[str], object], overwrite: bool
) -> Path:
    """Builds into a temporary folder inside `data_dir`, checks it reads back, then renames
    it to data_dir/NAME/VERSION. On any error the temporary folder is removed. The caller holds
    the import lock of `name`."""
    with tempfile.TemporaryDirectory(prefix=f".import-{name}-", dir=data_dir) as tmp:
        builder = make_builder(tmp)
        final = data_dir / name / str(builder.version)
        if final.exists() and not overwrite:
            raise DataError(
                f"{final} already exists: dataset {name!r} is already prepared in {data_dir}; "
                "remove that folder first (or pass overwrite=True) to import it again"
            )
        tf = _tf.tf()  # hide the GPUs before tfds starts TensorFlow
        try:
            with _tf.quiet_prepare():
                builder.download_and_prepare(download_dir=os.path.join(tmp, "downloads"))
        except (OSError, ValueError, RuntimeError, tf.errors.OpError) as e:  # e.g. disk full
            if isinstance(e, DataError):
                raise
            raise DataError(
                f"import of {name!r} failed while writing: {type(e).__name__}: {e}"
            ) from e
        built = Path(builder.data_path)
        written = _tf.tfds().builder_from_directory(built).info.splits
        expected = builder.info.splits
        if {s: written[s].num_examples for s in written} != {
            s: expected[s].num_examples for s in expected
        }:
            raise DataError(f"import of {name!r}: the written dataset does not read back whole")
        final.parent.mkdir(exist_ok=True)
        if final.exists():  # overwrite: move the old one into tmp, deleted with it
            os.replace(final, Path(tmp) / "replaced")
        os.replace(built, final)
    return final


def import_dataset(
    name: str,
    source_path: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Prepares tfds dataset `name` in `data_dir` from local files; returns its folder
    (data_dir/NAME/VERSION). See the module docstring for the accepted sources. data_dir
    defaults to $TFDS_DATA_DIR or ~/tensorflow_datasets. Raises DataError naming the file on
    missing, truncated or malformed input, when the dataset is already there (unless
    `overwrite`), when data_dir is (under) a file, and while another process imports `name`
    into the same data_dir (imports of one dataset are serialised by a lock; the temporary
    folders that killed imports left behind are removed under it)."""
    source = Path(source_path).expanduser()
    data_dir = Path(resolve_data_dir(data_dir))
    if not source.exists():
        raise DataError(f"{source}: no such file or folder")
    if name not in STANDARD_IMPORTS:
        if not _NAME_RE.match(name or ""):
            raise DataError(
                f"dataset name {name!r}: expected lowercase letters, digits and '_' "
                "(starting with a letter), e.g. 'flowers'"
            )
        from cnn_jax.data.registry import available_datasets

        if name in available_datasets() or _is_tfds_builder(name):
            raise DataError(
                f"dataset name {name!r} is a standard dataset that cannot be imported from an "
                f"image folder; importable standard datasets: {', '.join(STANDARD_IMPORTS)}. "
                "Choose another name for your image folder."
            )
    _usable_data_dir(data_dir)
    with _ImportLock(data_dir, name):
        for stale in stale_import_folders(data_dir, name):
            shutil.rmtree(stale, ignore_errors=True)
        if name in ("mnist", "fashion_mnist"):
            splits = read_idx_dataset(source)
            make = lambda tmp: _local_idx_builder(name, splits, tmp)
        elif name in CIFAR_LAYOUT:
            names, splits = read_cifar(name, source)
            make = lambda tmp: _local_cifar_builder(name, names, splits, tmp)
        else:
            classes, files = scan_image_tree(source)
            plan = _tree_plan(classes, files)
            make = lambda tmp: _image_folder_builder(name, source, files, plan, tmp)
        try:
            return _prepare_atomically(name, data_dir, make, overwrite)
        except OSError as e:  # e.g. out of space for the temporary folder or the final rename
            where = f": {e.filename}" if e.filename else f" in {data_dir}"
            raise DataError(
                f"import of {name!r} failed while writing ({e.strerror or e}){where}; expected "
                "a writable data dir with free space"
            ) from e
