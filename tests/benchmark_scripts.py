"""The scripts in ``benchmarks/`` as modules, for tests of their helpers (the folder is no
package, so each is loaded from its file, fresh on every call)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def benchmark_module(name: str):
    """``benchmarks/<name>.py`` loaded as a fresh module."""
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
