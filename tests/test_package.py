"""The package installs: a wheel built from the source carries the bundles, and ``multiad`` run from a fresh
virtual environment that holds only that wheel (its dependencies come from this environment's site-packages,
so torch is not downloaded again) trains and evaluates on a tiny generated set."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ("setup.cfg", "pyproject.toml", "README.md", "LICENSE", "multiad_monai")


def _run(command: list[str], cwd: str, env: dict | None = None, timeout: int = 600) -> str:
    """The command's standard output; it must succeed."""
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, " ".join(command) + "\n" + result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> str:
    """A wheel built from a copy of the source (the working tree is shared; its build/ is left alone)."""
    source = tmp_path_factory.mktemp("source")
    for name in SOURCES:
        path = os.path.join(REPO, name)
        if os.path.isdir(path):
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "runs", "eval"))
        else:
            shutil.copy(path, source / name)
    out = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(source)], cwd=str(source))
    (built,) = [str(out / name) for name in os.listdir(out) if name.endswith(".whl")]
    return built


def test_the_wheel_carries_both_bundles(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for bundle in ("multiad_2d", "multiad_medical"):
        for name in ("configs/train.json", "configs/inference.json", "configs/evaluate.json", "configs/metadata.json",
                     "configs/logging.conf", "docs/README.md", "LICENSE"):
            assert f"multiad_monai/bundles/{bundle}/{name}" in names, (bundle, name)
    assert "multiad_monai/bundles/multiad_2d/configs/retina_oct.json" in names
    assert "multiad_monai/bundles/multiad_medical/configs/liver_ct.json" in names
    assert "multiad_monai/bundles/multiad_medical/configs/brain_2p5d.json" in names


@pytest.mark.slow
def test_multiad_runs_from_the_installed_wheel(wheel, tmp_path):
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], cwd=str(tmp_path))
    python = str(venv / "bin" / "python")
    # installed with this environment's pip into the fresh one; --ignore-installed: a copy of multiad-monai in the
    # system site-packages (an editable install of the source) is neither used nor removed
    _run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", "--ignore-installed", wheel],
         cwd=str(tmp_path))
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "2"
    work = tmp_path / "work"  # outside the source tree: nothing there can shadow the installed package
    work.mkdir()
    location = _run([python, "-c", "import multiad_monai, multiad_monai.apps.bundles as b; print(multiad_monai.__file__); print(b.BUNDLES_DIR)"],
                    cwd=str(work), env=env).split()
    assert all(path.startswith(str(venv)) for path in location), location
    # every declared requirement is met by the versions this test runs with
    _run([python, "-c", _CHECK_REQUIREMENTS], cwd=str(work), env=env)

    _run([python, "-c", "from multiad_monai.data import make_demo_dataset as m; m('data', num_train=20, num_test_good=4, "
          "num_test_defect=6, image_size=64, seed=3)"], cwd=str(work), env=env)
    multiad = str(venv / "bin" / "multiad")
    log = _run([multiad, "demo", "--dataset_dir", "data", "--output_dir", "run", "--set", "image_size=64", "--set", "num_epochs=1",
                "--set", "min_epoch_length=2", "--set", "val_interval=1", "--set", "baselines=[]"], cwd=str(work), env=env)
    assert os.path.isfile(work / "run" / "model.pt")
    metrics = json.load(open(work / "run" / "eval" / "metrics.json"))["metrics"]
    assert 0.0 <= metrics["image_auroc"] <= 1.0
    assert log.rstrip().splitlines()[-1] == f"[multiad] report: {work / 'run' / 'eval' / 'report.html'}"
    # the medical bundle is found by name in the installed package (a typo in --set stops before any work)
    result = subprocess.run([multiad, "train", "--bundle_root", "multiad_medical", "--set", "no_such_key=1"], cwd=str(work),
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "unknown config key 'no_such_key'" in result.stderr
    assert os.path.join(str(venv), "lib") in result.stderr and "multiad_medical" in result.stderr

_CHECK_REQUIREMENTS = """
from importlib.metadata import requires, version
from packaging.requirements import Requirement
unmet = []
for text in requires("multiad-monai"):
    req = Requirement(text)
    if req.marker is not None:
        continue
    if not req.specifier.contains(version(req.name).split("+")[0], prereleases=True):
        unmet.append(f"{req} (installed {version(req.name)})")
assert not unmet, unmet
"""
