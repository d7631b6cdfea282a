"""This package as a wheel, with its pinned requirements, for registered models to carry.

No index has r2ray, so a model that names ``r2ray==0.1.0`` cannot have its environment rebuilt.
Instead :func:`package_wheel` builds the wheel offline (``pip wheel --no-build-isolation``) from
the checkout r2ray runs from, and :func:`model_requirements` names it by its path inside the model
(``code/``, where MLflow copies ``code_paths``; MLflow installs requirements from the model's
folder) beside every runtime dependency pinned to the version installed here.
"""

from __future__ import annotations

import functools
import hashlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from r2ray.errors import R2RayError

MODEL_CODE_FOLDER = "code"  # where mlflow.pyfunc.log_model copies code_paths inside the model


def source_root() -> Path:
    """The checkout r2ray runs from (an editable install); its wheel is built from here."""
    root = Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        raise R2RayError(f"r2ray at {root} is not a source checkout (no pyproject.toml), so its "
                         "wheel cannot be built to log with the model; register from a checkout "
                         "installed with `pip install -e .`")
    return root


def _source_files(root: Path) -> list[Path]:
    return [root / "pyproject.toml", root / "README.md",
            *sorted(f for f in (root / "r2ray").rglob("*")
                    if f.is_file() and "__pycache__" not in f.parts)]


@functools.lru_cache(maxsize=2)
def _built_wheel(root: Path, fingerprint: str) -> tuple[str, bytes]:
    """(file name, bytes) of the wheel of the sources at ``root``; ``fingerprint`` (of their
    content) keys the cache, so a process builds each version of the sources once (~1 s). Built
    with the setuptools installed here (no isolation), checked against pyproject's
    ``build-system.requires`` first, so one too old is named rather than failing in setuptools."""
    with tempfile.TemporaryDirectory(prefix="r2ray-wheel-") as tmp:
        source = Path(tmp) / "source"  # a copy: setuptools writes build/ and *.egg-info beside it
        for file in _source_files(root):
            (source / file.relative_to(root)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(file, source / file.relative_to(root))
        built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                                "--no-index", "--no-build-isolation", "--check-build-dependencies",
                                "--wheel-dir", str(Path(tmp) / "out"), str(source)],
                               capture_output=True, text=True)
        if built.returncode != 0:
            raise R2RayError(f"building r2ray's wheel from {root} failed:\n{built.stderr[-2000:]}")
        wheel = next((Path(tmp) / "out").glob("r2ray-*.whl"))
        return wheel.name, wheel.read_bytes()


def package_wheel(folder: str) -> Path:
    """Write the wheel of this package, as its source is now, into ``folder``; returns its path."""
    root = source_root()
    digest = hashlib.sha256()
    for file in _source_files(root):
        digest.update(str(file.relative_to(root)).encode() + b"\0" + file.read_bytes())
    name, data = _built_wheel(root, digest.hexdigest())
    path = Path(folder) / name
    path.write_bytes(data)
    return path


def model_requirements(wheel: Path) -> list[str]:
    """pip requirements of a model that carries ``wheel`` in its code folder: the wheel, then every
    runtime dependency of r2ray (and pandas, the pyfunc's frame type) pinned to the version
    installed here, without local labels such as ``+cpu``."""
    from importlib.metadata import requires, version

    from packaging.requirements import Requirement

    names = [req.name for req in map(Requirement, requires("r2ray") or []) if req.marker is None]
    return [f"{MODEL_CODE_FOLDER}/{wheel.name}",
            *(f"{name}=={version(name).split('+')[0]}" for name in [*names, "pandas"])]
