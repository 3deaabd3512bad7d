"""plugins/module_utils/pd_node.py: one copy of the node facts, shipped with the modules.

* the module_utils file is a symlink to pd_launcher/nodeutil.py, which the launcher
  imports: one file, two import names;
* nothing in plugins/ or pd_launcher/launcher defines its own copy again (the
  functions of nodeutil, or the helpers they replaced), opens /proc/PID files, makes
  HTTP requests or writes temp files itself;
* nodeutil stays importable as a module_utils: standard library only, no relative
  imports, Python 3.8 syntax;
* each module's DOCUMENTATION matches its argument_spec, and ansible-doc reads every
  module's DOCUMENTATION, EXAMPLES and RETURN;
* a real ``ansible localhost -m pd_unit_info`` run imports it (Ansiballz ships the
  symlinked file) and probes a local server through a dead proxy environment.
"""
from __future__ import annotations

import ast
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from unittest import mock

import pytest
import yaml
from ansible.module_utils import basic

from pd_launcher import nodeutil

from .modharness import MODULE_UTILS, MODULES, NAMES, REPO, load

NODEUTIL = REPO / "pd_launcher" / "nodeutil.py"
SCOPE = sorted((REPO / "plugins").rglob("*.py")) + sorted(
    (REPO / "pd_launcher" / "launcher").glob("*.py"))
# the private helpers the shared functions replaced, in case one comes back
REPLACED = {"_start_time", "_cmdline", "_alive", "_uptime", "_probe", "_port_busy",
            "_atomic_write", "port_error", "probe", "_state_ports"}
VENV_BIN = Path(sys.executable).parent


def _tree(path: Path) -> ast.AST:
    return ast.parse(path.read_text(), str(path))


def _shared_names() -> set:
    tree = _tree(NODEUTIL)
    return {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))
            and not n.name.startswith("_")}


def _scope():
    for path in SCOPE:
        if path.resolve() != NODEUTIL.resolve():
            yield path.relative_to(REPO), _tree(path)


def test_module_utils_pd_node_is_the_launchers_nodeutil():
    link = MODULE_UTILS / "pd_node.py"
    assert link.is_symlink(), "plugins/module_utils/pd_node.py must be a symlink"
    assert os.readlink(link) == "../../pd_launcher/nodeutil.py"  # relative: works in a clone
    assert link.resolve() == NODEUTIL.resolve()
    from ansible.module_utils import pd_node  # via modharness's module_utils path
    assert Path(pd_node.__file__).resolve() == NODEUTIL.resolve()


def test_nodeutil_is_a_valid_module_utils_file():
    tree = ast.parse(NODEUTIL.read_text(), feature_version=(3, 8))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"relative import at line {node.lineno}"
            top = node.module.split(".")[0]
        elif isinstance(node, ast.Import):
            top = node.names[0].name.split(".")[0]
        else:
            continue
        assert top == "__future__" or top in sys.stdlib_module_names, (
            f"nodeutil.py line {node.lineno} imports {top}: standard library only")


def test_pd_unit_builds_on_pd_node_and_the_standard_library_only():
    tree = ast.parse((MODULE_UTILS / "pd_unit.py").read_text(), feature_version=(3, 8))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0 and (node.module == "ansible.module_utils.pd_node" or
                                        node.module.split(".")[0] in sys.stdlib_module_names
                                        or node.module == "__future__"), node.module
        elif isinstance(node, ast.Import):
            assert node.names[0].name.split(".")[0] in sys.stdlib_module_names


def test_no_second_copy_of_the_node_facts():
    shared = _shared_names()
    assert {"start_time", "verify_recorded", "port_problem", "probe_ready", "atomic_write",
            "read_state"} <= shared
    defined = []
    for rel, tree in _scope():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and (
                    node.name in shared or node.name in REPLACED):
                defined.append(f"{rel}:{node.lineno} {node.name}")
    assert not defined, "use pd_launcher.nodeutil / ansible.module_utils.pd_node instead: " + \
        ", ".join(defined)


def test_no_one_else_reads_proc_pids_probes_or_writes_temp_files():
    banned_modules = {"urllib.request", "urllib.error", "http.client", "tempfile", "requests"}
    banned_attrs = {"create_connection", "ProxyHandler", "SO_REUSEADDR", "mkstemp"}
    found = []
    for rel, tree in _scope():
        docstrings = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr)
                      and isinstance(n.value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = {node.module} | {f"{node.module}.{a.name}" for a in node.names}
            else:
                names = set()
            if names & banned_modules:
                found.append(f"{rel}:{node.lineno} import {sorted(names & banned_modules)}")
            if isinstance(node, ast.Attribute) and node.attr in banned_attrs:
                found.append(f"{rel}:{node.lineno} .{node.attr}")
            if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                    and id(node) not in docstrings
                    and (node.value == "/proc/" or node.value.endswith(("/stat", "/cmdline")))):
                found.append(f"{rel}:{node.lineno} {node.value!r}")
    assert not found, "node facts belong in pd_launcher/nodeutil.py: " + ", ".join(found)


def test_modules_use_pd_node_and_never_the_launcher_package():
    for name in NAMES:
        tree = _tree(MODULES / f"{name}.py")
        froms = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert froms & {"ansible.module_utils.pd_node", "ansible.module_utils.pd_unit"}, name
        assert not any(m and m.startswith("pd_launcher") for m in froms), name


class _Spec(Exception):
    pass


def _argument_spec(name: str) -> dict:
    def capture(self, argument_spec, **kwargs):
        raise _Spec(argument_spec, kwargs)

    with mock.patch.object(basic.AnsibleModule, "__init__", capture):
        with pytest.raises(_Spec) as info:
            load(name).main()
    return info.value.args[0]


@pytest.mark.parametrize("name", NAMES)
def test_documentation_matches_the_argument_spec(name):
    mod = load(name)
    doc = yaml.safe_load(mod.DOCUMENTATION)
    assert doc["module"] == name and doc["short_description"] and doc["description"]
    options = doc["options"]
    spec = _argument_spec(name)
    assert set(options) == set(spec), name
    for opt, want in spec.items():
        got = options[opt]
        where = f"{name}.{opt}"
        assert got.get("description"), where
        assert got.get("type", "str") == want.get("type", "str"), where
        assert bool(got.get("required")) == bool(want.get("required")), where
        assert got.get("default") == want.get("default"), where
        assert got.get("choices") == want.get("choices"), where
        assert got.get("elements") == want.get("elements"), where
    examples = yaml.safe_load(mod.EXAMPLES)
    assert examples and all(name in task for task in examples), name
    returns = yaml.safe_load(mod.RETURN)
    assert returns, name
    for key, ret in returns.items():
        assert ret.get("description") and ret.get("returned") and ret.get("type"), key


def test_ansible_doc_reads_every_module():
    out = subprocess.run([str(VENV_BIN / "ansible-doc"), "-M", str(MODULES), "--json", *NAMES],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    docs = json.loads(out.stdout)
    assert sorted(docs) == sorted(NAMES)
    for name, d in docs.items():
        assert d["doc"]["options"] and d["examples"] and d["return"], name


def test_a_real_ansible_run_ships_pd_node_and_probes_past_a_dead_proxy(tmp_path):
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}/health"
    cmd = nodeutil.read_cmdline(os.getpid())
    me = {"pid": os.getpid(), "start_time": nodeutil.start_time(os.getpid()), "argv": cmd,
          "cmdline": cmd}
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "launcher.json").write_text(json.dumps(
        {"schema": 1, "status": "running", "launcher": me,
         "processes": [dict(me, name="api")]}))
    (tmp_path / "spec.json").write_text(json.dumps(
        {"processes": [{"name": "api", "ready": {"type": "http", "url": url}}]}))
    env = dict(os.environ, ANSIBLE_CALLBACK_RESULT_FORMAT="json", ANSIBLE_NOCOLOR="1",
               PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    env.update({k: "http://127.0.0.1:9" for k in (
        "http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy")})
    env["no_proxy"] = env["NO_PROXY"] = "example.org"
    try:
        out = subprocess.run(
            [str(VENV_BIN / "ansible"), "localhost", "-c", "local", "-i", "localhost,",
             "-e", f"ansible_python_interpreter={sys.executable}", "-m", "pd_unit_info",
             "-a", f"state_dir={tmp_path / 'state'} spec_path={tmp_path / 'spec.json'}"],
            capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    finally:
        srv.shutdown()
        srv.server_close()
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(out.stdout.split("=>", 1)[1])
    assert result["running"] is True and result["healthy"] is True, result
    assert result["processes"][0]["probe"] == f"GET {url}: 200"
