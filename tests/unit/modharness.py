"""Run the Ansible modules of plugins/modules in-process, as Ansible would on a node.

* ``ansible.module_utils`` gets plugins/module_utils on its path, so the modules'
  ``from ansible.module_utils.pd_node import ...`` resolves to the same file Ansiballz
  ships (a symlink to pd_launcher/nodeutil.py);
* arguments go in through ``ansible.module_utils.testing.patch_module_args`` (the
  module reads them as it reads its JSON on a node);
* ``exit_json`` / ``fail_json`` raise ``ModuleDone`` carrying the result, so a test
  gets the result dict back (``failed`` is True after ``fail_json``);
* ``run_command`` can be replaced by a fake (container CLIs the test machine lacks).
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Dict, Optional
from unittest import mock

import ansible.module_utils
from ansible.module_utils import basic

REPO = Path(__file__).resolve().parents[2]
MODULES = REPO / "plugins" / "modules"
MODULE_UTILS = REPO / "plugins" / "module_utils"
NAMES = ("pd_image_serve", "pd_preflight", "pd_unit_converge", "pd_unit_info", "pd_unit_install",
         "pd_unit_remove")

if str(MODULE_UTILS) not in ansible.module_utils.__path__:
    ansible.module_utils.__path__.append(str(MODULE_UTILS))


class ModuleDone(Exception):
    def __init__(self, result: Dict[str, Any]) -> None:
        super().__init__(result.get("msg", ""))
        self.result = result


def load(name: str) -> ModuleType:
    """A fresh copy of plugins/modules/<name>.py (its main() is not run)."""
    spec = importlib.util.spec_from_file_location(f"pd_module_{name}", MODULES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _module_args(args: Dict[str, Any]):
    try:
        from ansible.module_utils.testing import patch_module_args
    except ImportError:  # ansible-core < 2.19
        return mock.patch.object(basic, "_ANSIBLE_ARGS",
                                 json.dumps({"ANSIBLE_MODULE_ARGS": args}).encode())
    return patch_module_args(args)


def run(mod: ModuleType, args: Dict[str, Any], check_mode: bool = False,
        run_command: Optional[Callable[..., Any]] = None) -> Dict[str, Any]:
    """Run mod.main() with `args`; the result dict (``failed`` True after fail_json)."""
    warnings: list = []

    def exit_json(self, **kwargs: Any) -> None:
        kwargs.setdefault("failed", False)
        kwargs["warnings"] = warnings
        raise ModuleDone(kwargs)

    def fail_json(self, msg: str = "", **kwargs: Any) -> None:
        kwargs.update(failed=True, msg=msg, warnings=warnings)
        raise ModuleDone(kwargs)

    def warn(self, warning: str) -> None:
        warnings.append(warning)

    args = dict(args)
    if check_mode:
        args["_ansible_check_mode"] = True
    with contextlib.ExitStack() as stack:
        stack.enter_context(_module_args(args))
        stack.enter_context(mock.patch.object(basic.AnsibleModule, "exit_json", exit_json))
        stack.enter_context(mock.patch.object(basic.AnsibleModule, "fail_json", fail_json))
        stack.enter_context(mock.patch.object(basic.AnsibleModule, "warn", warn))
        if run_command is not None:
            stack.enter_context(mock.patch.object(
                basic.AnsibleModule, "run_command",
                lambda self, argv, *a, **kw: run_command(argv)))
        try:
            mod.main()
        except ModuleDone as done:
            return done.result
    raise AssertionError(f"{mod.__name__}.main() returned without exit_json or fail_json")


def ok(mod: ModuleType, args: Dict[str, Any], **kw: Any) -> Dict[str, Any]:
    result = run(mod, args, **kw)
    assert not result["failed"], result.get("msg")
    return result


def failed(mod: ModuleType, args: Dict[str, Any], **kw: Any) -> Dict[str, Any]:
    result = run(mod, args, **kw)
    assert result["failed"], result
    return result
