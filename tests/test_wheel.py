"""r2ray/wheel.py: the wheel a registered model carries holds every file of the package, and a
build environment that cannot build it is an error naming what is missing."""

from __future__ import annotations

import re
import subprocess
import tomllib
import zipfile

import pytest
from packaging.requirements import Requirement

from conftest import REPO
from r2ray import wheel
from r2ray.errors import R2RayError


def test_the_wheel_holds_every_file_git_tracks_in_the_package(tmp_path):
    """Package data included (default_catalog.yaml, any data file added later)."""
    tracked = subprocess.run(["git", "ls-files", "r2ray"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.split()
    names = set(zipfile.ZipFile(wheel.package_wheel(str(tmp_path))).namelist())
    assert "r2ray/default_catalog.yaml" in tracked
    assert sorted(set(tracked) - names) == []


def test_the_build_floor_builds_the_license_expression():
    """`license = "Apache-2.0"` (an SPDX expression, PEP 639) is read by setuptools >= 77 only;
    68 fails with "`project.license` must be valid exactly by one definition"."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert isinstance(pyproject["project"]["license"], str)
    setuptools = [Requirement(r) for r in pyproject["build-system"]["requires"]
                  if Requirement(r).name == "setuptools"][0]
    assert not setuptools.specifier.contains("76.1.0")
    assert setuptools.specifier.contains("77.0.0")


def test_a_build_environment_below_build_system_requires_is_named(tmp_path):
    """The wheel is built without isolation, with the setuptools installed here: one older than
    pyproject's build-system asks for is named, not left to fail deep in setuptools' traceback."""
    root = tmp_path / "checkout"
    (root / "r2ray").mkdir(parents=True)
    (root / "r2ray" / "__init__.py").write_text("")
    (root / "README.md").write_text("r2ray\n")
    pyproject = (REPO / "pyproject.toml").read_text()
    (root / "pyproject.toml").write_text(
        re.sub(r'"setuptools>=[\d.]+"', '"setuptools>=999"', pyproject, count=1))
    with pytest.raises(R2RayError, match=r"setuptools>=999"):
        wheel._built_wheel(root, "setuptools-floor")
