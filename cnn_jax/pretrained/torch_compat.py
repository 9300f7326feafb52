"""Importing torchvision beside the CPU build of torch, for tests and benchmarks.

torchvision's wheels are built against torch's CUDA build; beside the CPU build its compiled
detection ops (`torchvision/_C.so`) fail to load, and importing torchvision then stops at
'operator torchvision::nms does not exist' (its fake-tensor registrations need the op schemas).
Classification models and transforms need none of those ops, so `import_torchvision` declares
the two schemas torchvision registers against at import time (without kernels: calling
`torchvision.ops.nms` still fails) and imports it.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

# Kept alive for the process: dropping the Library object would remove the declared schemas.
_SCHEMA_LIBRARY = None

# The ops torchvision's _meta_registrations.py registers fakes for whether or not _C.so loaded.
_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)


def missing_reason() -> str | None:
    """Why `import_torchvision` cannot work here (torch or torchvision not installed), or None."""
    for name in ("torch", "torchvision"):
        if importlib.util.find_spec(name) is None:
            return (
                f"{name} is not installed (pip install -e '.[test]' installs torch==2.13.0 and "
                "torchvision==0.28.0)"
            )
    return None


def import_torchvision() -> ModuleType:
    """torchvision, imported; works whether or not its compiled ops load. Raises ImportError
    when torch or torchvision is not installed."""
    global _SCHEMA_LIBRARY
    if "torchvision" in sys.modules:
        return sys.modules["torchvision"]
    reason = missing_reason()
    if reason:
        raise ImportError(reason)
    import torch

    if _SCHEMA_LIBRARY is None and not _load_compiled_ops():
        _SCHEMA_LIBRARY = torch.library.Library("torchvision", "DEF")
        for schema in _SCHEMAS:
            _SCHEMA_LIBRARY.define(schema)
    import torchvision

    return torchvision


def _load_compiled_ops() -> bool:
    """Whether torchvision's compiled ops load here (as its own import would load them)."""
    import torch

    spec = importlib.util.find_spec("torchvision")
    for folder in spec.submodule_search_locations or []:
        for library in Path(folder).glob("_C.*"):
            if library.suffix in (".so", ".pyd", ".dylib"):
                try:
                    torch.ops.load_library(str(library))
                except (OSError, RuntimeError):
                    return False
                return True
    return False
