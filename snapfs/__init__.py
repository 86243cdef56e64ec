"""snapfs: consistent point-in-time views of a running QEMU VM's disks, served as FUSE files."""

from __future__ import annotations

import importlib.util
import sys
import types

__version__ = "0.1.0"


def lazy_module(name: str) -> types.ModuleType:
    """A module that is loaded when first used: ``snapfs copy``, ``restore`` and ``verify``
    need neither trio nor QMP, and start that much faster."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ImportError(f"no module {name}")
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
