"""The split by where code runs: pd_launcher (node) is standard library only, except the
emulator's aiohttp; it never imports the controller; the bundle ships pd_launcher only."""
from __future__ import annotations

import ast
import io
import sys
import tarfile
from pathlib import Path

from pd_deploy import bundle

REPO = Path(__file__).resolve().parents[2]
NODE = REPO / "pd_launcher"
STDLIB = set(sys.stdlib_module_names)
EMULATOR_ONLY = {"aiohttp", "redis", "yaml"}  # redis: the FastDeploy personality (redis.asyncio);
# yaml: the KsanaLLM personality reads its rendered config as the engine does


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module.split(".")[0]))
    return out


def test_node_package_imports_only_the_standard_library():
    bad = []
    for path in sorted(NODE.rglob("*.py")):
        rel = path.relative_to(REPO)
        allowed = STDLIB | {"pd_launcher"}
        if rel.parts[:2] == ("pd_launcher", "emulator"):
            allowed |= EMULATOR_ONLY
        for line, top in _imports(path):
            if top not in allowed:
                bad.append(f"{rel}:{line}: imports {top}")
    assert bad == []


def test_the_check_catches_a_third_party_import(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import os\nimport yaml\nfrom pd_deploy import topology\nfrom . import x\n")
    tops = [t for _, t in _imports(probe) if t not in STDLIB | {"pd_launcher"}]
    assert tops == ["yaml", "pd_deploy"]


def test_bundle_holds_pd_launcher_only():
    with tarfile.open(fileobj=io.BytesIO(bundle.build()), mode="r:gz") as tar:
        names = tar.getnames()
    assert names and all(n.startswith("pd_launcher/") for n in names)
    assert "pd_launcher/launcher/cli.py" in names
    assert "pd_launcher/proxy_agent.py" in names
    assert "pd_launcher/emulator/server.py" in names
    assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)


def test_templates_are_package_data():
    from pd_deploy import proxy_config

    tdir = Path(proxy_config.TEMPLATES_DIR)
    assert tdir.parent == REPO / "pd_deploy"
    assert (tdir / "nginx.conf.j2").is_file() and (tdir / "pd_router.js").is_file()
    assert not (REPO / "templates").exists()
