"""`pip install .` (not editable) into a fresh venv gives a working `pd-deploy plan`,
run from another directory, with the templates and the whole node package installed."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "inventories" / "example" / "inventory.yml"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    # a copy without the venvs and build leftovers: what a clean clone holds
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".venv*", ".git", "var", "build", "*.egg-info", "__pycache__", ".pytest_cache",
        ".ruff_cache", "bench"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    res = subprocess.run([str(venv / "bin" / "pip"), "install", "-q",
                          "--disable-pip-version-check", str(src)],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return venv


def _run(venv: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run([*args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_console_script_plans_like_the_repo(wheel_venv, tmp_path):
    out = _run(wheel_venv, str(wheel_venv / "bin" / "pd-deploy"), "plan", "-i", str(EXAMPLE),
               "--format", "json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    here = subprocess.run([sys.executable, "-m", "pd_deploy", "plan", "-i", str(EXAMPLE),
                           "--format", "json"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert json.loads(out.stdout) == json.loads(here.stdout)


def test_installed_package_renders_the_front_door(wheel_venv, tmp_path):
    out = _run(wheel_venv, str(wheel_venv / "bin" / "python"), "-m", "pd_deploy", "plan",
               "-i", str(EXAMPLE), "--node", "prefill-1", "--role", "C", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    spec = json.loads(out.stdout)
    paths = [f["path"] for f in spec["files"]]
    assert any(p.endswith("/nginx.conf") for p in paths)
    assert any(p.endswith("/pd_router.js") for p in paths)


def test_installed_node_package_is_complete(wheel_venv, tmp_path):
    code = ("import pd_deploy, pd_launcher, pd_launcher.launcher.cli, pd_launcher.proxy_agent,"
            " os; print(os.path.dirname(pd_launcher.__file__)); "
            "print(os.path.dirname(pd_deploy.__file__))")
    out = _run(wheel_venv, str(wheel_venv / "bin" / "python"), "-c", code, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    node, ctrl = (Path(p) for p in out.stdout.split())
    assert "site-packages" in str(node)  # not the repo
    for rel in ("launcher/cli.py", "emulator/server.py", "emulator/__main__.py",
                "proxy_agent.py", "__main__.py"):
        assert (node / rel).is_file(), rel
    assert (ctrl / "templates" / "nginx.conf.j2").is_file()
    # the bundle built from the installed package ships pd_launcher only
    out = _run(wheel_venv, str(wheel_venv / "bin" / "python"), "-m", "pd_deploy.bundle",
               str(tmp_path / "b"), cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.startswith("written"), out.stderr
    with tarfile.open(tmp_path / "b" / "pd_launcher.tar.gz") as tar:
        names = tar.getnames()
    assert "pd_launcher/emulator/server.py" in names
    assert all(n.startswith("pd_launcher/") for n in names)
