"""Make a CUDA-linked torchvision importable on a CPU-only torch, for its pure-Python image transforms.

transformers imports torchvision whenever it is installed (its image and video processors are
built on it, and so is `Qwen2_5_VLProcessor`, which vLLM also builds for a vision-language
model). The only torchvision builds the package index serves are linked against torch's CUDA
libraries, so on the CPU install its C extension (`torchvision/_C.so`) does not load, and
`import torchvision` then fails with "operator torchvision::nms does not exist": it registers
fake kernels for the `nms` and `qnms` ops unconditionally, and only the C extension defines them.
Defining those two op schemas first is enough for the rest to import; the transforms the
processors use are pure PyTorch. Calling `torchvision.ops.nms` still fails, with torchvision's own
"Couldn't load custom C++ ops".

`ensure_torchvision_importable()` does this only when torchvision is installed, not yet imported,
and its C extension cannot load: a working torchvision (any CUDA machine) is never touched.
`install_import_hook()` runs it on the first `import torchvision` of the process, whoever imports
it; the CPU install (scripts/setup.sh) calls it from a one-line `.pth` file in the virtualenv, so
every Python process of the environment has it. This module is imported at every interpreter start
there: it must stay light (torch is imported only when torchvision is).
"""

from __future__ import annotations

import importlib.util
import sys

TYPE_CHECKING = False  # not typing's: every interpreter start imports this module, and typing costs 4 ms
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any

# The op schemas torchvision's C extension defines and its Python registers fakes for at import.
SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_LIBRARIES: list = []  # the torch.library.Library holding them, kept alive (a dropped one undefines)


def torchvision_dir() -> Path | None:
    """The installed torchvision package's folder (without importing it), or None."""
    from pathlib import Path

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def c_ops_loadable(package: Path) -> bool:
    """Whether torchvision's C extension loads here (what torchvision itself tries at import)."""
    import torch

    library = next(iter(sorted(package.glob("_C*.so")) + sorted(package.glob("_C*.pyd"))), None)
    if library is None:
        return False
    try:
        torch.ops.load_library(str(library))
    except (OSError, RuntimeError):
        return False
    return True


def missing_schemas() -> list[str]:
    """The schemas of `SCHEMAS` no library has defined yet."""
    import torch

    return [schema for schema in SCHEMAS if not hasattr(torch.ops.torchvision, schema.split("(", 1)[0])]


def ensure_torchvision_importable() -> bool:
    """Define the `nms`/`qnms` op schemas when torchvision is installed but its C ops cannot load.

    Returns whether it defined any (False: torchvision works, is absent, or was imported already)."""
    if "torchvision" in sys.modules:
        return False  # imported already: it works, or its import already failed
    package = torchvision_dir()
    if package is None or c_ops_loadable(package):
        return False
    missing = missing_schemas()
    if not missing:
        return False
    import logging

    import torch

    library = torch.library.Library("torchvision", "FRAGMENT")
    for schema in missing:
        library.define(schema)
    _LIBRARIES.append(library)
    # Expected on the CPU install and handled: not worth a line in every command's output (DEBUG).
    logging.getLogger(__name__).debug(
        "torchvision's C ops do not load (a CUDA build on a CPU torch): defined %s", ", ".join(missing)
    )
    return True


class _FirstImport:
    """A meta path finder that runs `ensure_torchvision_importable` when torchvision is first
    imported, then steps aside (it finds nothing itself: the regular finders import torchvision)."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        if fullname == "torchvision":
            uninstall_import_hook()
            ensure_torchvision_importable()
        return None


def install_import_hook() -> None:
    """Make the process's first `import torchvision` define the missing op schemas first."""
    if "torchvision" not in sys.modules and not any(isinstance(f, _FirstImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _FirstImport())


def uninstall_import_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _FirstImport)]
