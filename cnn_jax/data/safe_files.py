"""Reading untrusted dataset files without letting them run code or write outside their folder.

- `restricted_pickle_load`: CIFAR's "python version" files are pickles, and unpickling can call
  any importable function. This unpickler resolves only the few numpy names that rebuild arrays;
  plain containers, bytes, strings and numbers need no name lookup (except Python 3's
  protocol-2 bytes, rebuilt with a latin-1-only `_codecs.encode`). Anything else is
  refused with a DataError naming the file.
- `ArchiveReader`: reads members of a tar archive by name after checking every member: no
  absolute paths, no '..', no links, devices or other special files. Nothing is extracted.
  A compressed archive is first decompressed once to its end, in chunks, so a corrupt block or
  checksum is reported up front and an archive expanding beyond MAX_ARCHIVE_BYTES (a
  decompression bomb) is refused without using memory; no member over MAX_MEMBER_BYTES is read.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import pickle
import posixpath
import tarfile
import zlib
from pathlib import Path

import numpy as np

from cnn_jax.errors import DataError


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    if encoding not in ("latin1", "latin-1"):
        raise DataError(f"refusing to unpickle _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _numpy_reconstructors() -> dict[tuple[str, str], object]:
    """The globals numpy array pickles refer to (numpy 1 writes numpy.core, numpy 2 numpy._core)."""
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    allowed = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # Python 3 writes bytes in protocol <= 2 as _codecs.encode(text, 'latin1').
        ("_codecs", "encode"): _latin1_encode,
    }
    for module in ("numpy.core", "numpy._core"):
        allowed[(f"{module}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{module}.multiarray", "scalar")] = multiarray.scalar
        if hasattr(numeric, "_frombuffer"):  # pickle protocol 5 arrays
            allowed[(f"{module}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles plain data and numpy arrays only."""

    ALLOWED = _numpy_reconstructors()

    def __init__(self, file, *, source_name: str, **kwargs):
        super().__init__(file, **kwargs)
        self.source_name = source_name

    def find_class(self, module: str, name: str):
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise DataError(
                f"{self.source_name}: refusing to unpickle {module}.{name}: the file would "
                "create an object other than plain data or numpy arrays (a pickle can run "
                "code, so only those are allowed); is this really a CIFAR python-format file?"
            ) from None


def restricted_pickle_load(data: bytes, source_name: str):
    """Unpickles `data` (Python 2 pickles too: bytes keys) with `RestrictedUnpickler`."""
    try:
        return RestrictedUnpickler(
            io.BytesIO(data), source_name=source_name, encoding="bytes"
        ).load()
    except DataError:
        raise
    except Exception as e:  # truncated or not a pickle at all
        raise DataError(
            f"{source_name}: not a readable pickle file ({type(e).__name__}: {e})"
        ) from e


def _member_problem(member: tarfile.TarInfo) -> str | None:
    name = member.name
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "has an absolute path"
    if ".." in posixpath.normpath(name.replace("\\", "/")).split("/"):
        return "escapes the target folder ('..')"
    if member.issym() or member.islnk():
        return f"is a link (to {member.linkname!r})"
    if not (member.isfile() or member.isdir()):
        return "is not a regular file or folder"
    return None


# The most a compressed archive may expand to, and the largest member or file read into memory
# (the CIFAR-100 tarball expands to 180 MB, its largest file is 150 MB).
MAX_ARCHIVE_BYTES = 2**32
MAX_MEMBER_BYTES = 2**30
_COMPRESSED = {b"\x1f\x8b": gzip.open, b"BZh": bz2.open, b"\xfd7zXZ\x00": lzma.open}
_CHUNK = 1 << 20


def check_compressed_stream(path: Path, what: str = "file") -> None:
    """Decompresses a gzip, bzip2 or xz file once to its end, in chunks (constant memory):
    DataError naming the file (a `what`) for a corrupt block or checksum, a cut stream, or more
    than MAX_ARCHIVE_BYTES of content. Files that are not compressed are left alone."""
    total = 0
    try:
        with open(path, "rb") as f:
            head = f.read(6)
        opener = next((o for magic, o in _COMPRESSED.items() if head.startswith(magic)), None)
        if opener is None:
            return
        with opener(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                total += len(chunk)
                if total > MAX_ARCHIVE_BYTES:
                    raise DataError(
                        f"{path}: expands to more than {MAX_ARCHIVE_BYTES} bytes when "
                        f"decompressed; expected a {what} of at most that size (is this a "
                        "decompression bomb?)"
                    )
    except (OSError, EOFError, zlib.error, lzma.LZMAError) as e:
        raise DataError(
            f"{path}: not a readable {what} (corrupt compressed data: {type(e).__name__}: {e})"
        ) from e


def check_file_size(size: int, display: str) -> None:
    """DataError when a file of `size` bytes is too large to read into memory here."""
    if size > MAX_MEMBER_BYTES:
        raise DataError(
            f"{display}: {size} bytes, more than the {MAX_MEMBER_BYTES} bytes a dataset file may "
            "have here (is this the expected file?)"
        )


class ArchiveReader:
    """Regular-file members of a tar archive (.tar, .tar.gz, ...) by name, checked for safety."""

    def __init__(self, path: Path):
        self.path = Path(path)
        check_compressed_stream(self.path, "tar archive")
        try:
            self._tar = tarfile.open(self.path, "r:*")  # noqa: SIM115 (closed by close())
            members = self._tar.getmembers()
        except (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError) as e:
            raise DataError(f"{self.path}: not a readable tar archive ({e})") from e
        for member in members:
            problem = _member_problem(member)
            if problem:
                raise DataError(
                    f"{self.path}: refusing archive member {member.name!r}, which {problem}"
                )
        self.members = {posixpath.normpath(m.name): m for m in members if m.isfile()}

    def find(self, basename: str) -> str | None:
        """The member path whose last component is `basename` (shallowest first)."""
        hits = sorted((n for n in self.members if posixpath.basename(n) == basename), key=len)
        return hits[0] if hits else None

    def read(self, name: str) -> bytes:
        if name in self.members:
            check_file_size(self.members[name].size, f"{self.path}:{name}")
        try:
            return self._tar.extractfile(self.members[name]).read()
        except (tarfile.TarError, OSError, EOFError, KeyError, zlib.error, lzma.LZMAError) as e:
            raise DataError(f"{self.path}: cannot read member {name!r} ({e})") from e

    def close(self) -> None:
        self._tar.close()
