"""Import an `experiments/*.py` script (not a package) as a module for its tests."""

import contextlib
import importlib.util
import sys
from pathlib import Path


@contextlib.contextmanager
def script_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve annotations through sys.modules
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(name, None)
