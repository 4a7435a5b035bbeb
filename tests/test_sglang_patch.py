"""patches/sglang applies cleanly to the pinned sglang release, and apply.sh is idempotent.

Downloads that release's wheel with pip (no dependencies) and works on its unpacked files; skips,
rather than fails, when there is no network or no wheel for this interpreter. sglang itself is never
imported (it needs CUDA extensions).
"""
from __future__ import annotations

import os
import py_compile
import shutil
import subprocess
import sys
import zipfile

import pytest

from lib.engine.sglang_backend import SGLANG_VERSION

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATCH_DIR = os.path.join(REPO, "patches", "sglang")
APPLY = os.path.join(PATCH_DIR, "apply.sh")
PATCHES = sorted(os.path.join(PATCH_DIR, f) for f in os.listdir(PATCH_DIR) if f.endswith(".patch"))
PATCHED_FILES = ("sglang/srt/distributed/parallel_state.py", "sglang/srt/distributed/bootstrap.py")

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(shutil.which("patch") is None, reason="the 'patch' program is not installed")]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> str:
    """The pinned wheel's sglang sources (only what the patches touch) and its dist-info."""
    download = tmp_path_factory.mktemp("wheel")
    cmd = [sys.executable, "-m", "pip", "download", f"sglang=={SGLANG_VERSION}", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(download)]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        pytest.skip("pip download of the sglang wheel timed out (no network?)")
    wheels = [f for f in os.listdir(download) if f.endswith(".whl")]
    if result.returncode != 0 or not wheels:
        pytest.skip(f"cannot download sglang=={SGLANG_VERSION} (no network or no wheel for this Python): "
                    f"{result.stderr.strip()[-300:]}")
    site = tmp_path_factory.mktemp("site")
    with zipfile.ZipFile(download / wheels[0]) as wheel:
        wanted = [n for n in wheel.namelist() if n in PATCHED_FILES or n.endswith(".dist-info/METADATA")]
        wheel.extractall(site, members=wanted)
    return str(site)


def fresh_copy(pristine: str, tmp_path) -> str:
    site = str(tmp_path / "site")
    shutil.copytree(pristine, site)
    return site


def run_apply(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", APPLY, *args], capture_output=True, text=True, timeout=60)


def test_each_patch_applies_without_fuzz_or_offset(pristine, tmp_path):
    site = fresh_copy(pristine, tmp_path)
    assert PATCHES
    for p in PATCHES:
        with open(p) as f:
            result = subprocess.run(["patch", "-p1", "--dry-run", "-f", "-d", site], stdin=f, capture_output=True,
                                    text=True)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "Hunk" not in result.stdout, f"{os.path.basename(p)} applies only with offset/fuzz:\n{result.stdout}"


def test_apply_script_checks_applies_once_and_leaves_valid_python(pristine, tmp_path):
    site = fresh_copy(pristine, tmp_path)
    check = run_apply("--check", "--site", site)
    assert check.returncode == 1 and "not applied" in check.stdout
    first = run_apply("--site", site)
    assert first.returncode == 0 and "applied to" in first.stdout, first.stdout + first.stderr
    for rel in PATCHED_FILES:
        py_compile.compile(os.path.join(site, rel), doraise=True)
    with open(os.path.join(site, PATCHED_FILES[0])) as f:
        assert "def set_external_world_ranks" in f.read()
    again = run_apply("--site", site)
    assert again.returncode == 0 and "already applied" in again.stdout
    assert run_apply("--check", "--site", site).returncode == 0


def test_apply_script_refuses_another_release(pristine, tmp_path):
    site = fresh_copy(pristine, tmp_path)
    metadata = [os.path.join(root, f) for root, _, files in os.walk(site) for f in files if f == "METADATA"][0]
    with open(metadata) as f:
        text = f.read()
    with open(metadata, "w") as f:
        f.write(text.replace(f"Version: {SGLANG_VERSION}", "Version: 0.0.1"))
    result = run_apply("--site", site)
    assert result.returncode == 2 and f"pip install sglang=={SGLANG_VERSION}" in result.stderr
