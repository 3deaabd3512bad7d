"""Ansible filters over pd_deploy/systemd.py: the systemd service unit that starts a
process-runtime unit's launcher at boot (roles/node_unit/tasks/systemd.yml) and what
cleanup removes (roles/cleanup/tasks/systemd.yml). No text is built in Jinja.

    unit:  "{{ pd_unit_spec | pd_systemd_unit(pd_python, pd_unit_lib, pd_unit_spec_path,
               pd_unit_state, pd_unit_log, pd_no_proxy_env) }}"   # {name, content, marker}
    on:    "{{ pd_systemd | pd_systemd_wanted(stat_of_run_systemd_system) }}"
"""
from __future__ import annotations

import os
import sys
from typing import Any

from ansible.errors import AnsibleFilterError

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from pd_deploy import systemd  # noqa: E402


def _plain(value: Any) -> Any:
    """Ansible's lazy/unsafe containers as plain dicts, lists and strings."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, str):
        return str(value)
    return value


def pd_systemd_unit(spec: dict[str, Any], python: str, lib_dir: str, spec_path: str,
                    state_dir: str, log_dir: str, environment: dict[str, Any] | None = None,
                    user: str | None = None, phases: dict[str, str] | None = None
                    ) -> dict[str, str]:
    """{"name": "pd-deploy-<cluster>-<unit>.service", "content": the unit file,
    "marker": its first line} of one node unit (pd_deploy.systemd.render_unit)."""
    try:
        return systemd.render_unit(_plain(spec), _plain(python), _plain(lib_dir),
                                   _plain(spec_path), _plain(state_dir), _plain(log_dir),
                                   _plain(environment or {}), _plain(user) or None,
                                   _plain(phases or {}))
    except systemd.SystemdUnitError as exc:
        raise AnsibleFilterError(f"pd-deploy: systemd unit: {exc}") from None


def pd_systemd_wanted(value: Any, running: Any = None) -> bool:
    """pd_systemd (auto | true | false) and, for auto, the stat of /run/systemd/system."""
    try:
        return systemd.systemd_wanted(_plain(value), _plain(running))
    except systemd.SystemdUnitError as exc:
        raise AnsibleFilterError(f"pd-deploy: {exc}") from None


def pd_systemd_mode(value: Any) -> str:
    """pd_systemd normalised to auto | true | false (an error on anything else)."""
    try:
        return systemd.systemd_mode(_plain(value))
    except systemd.SystemdUnitError as exc:
        raise AnsibleFilterError(f"pd-deploy: {exc}") from None


def pd_systemd_files(specs: dict[str, Any], units: list[str], directory: str
                     ) -> list[dict[str, str]]:
    """[{unit, name, path, marker}] of the host's UNITS' unit files in DIRECTORY."""
    try:
        return systemd.unit_files(_plain(specs), _plain(units), _plain(directory))
    except systemd.SystemdUnitError as exc:
        raise AnsibleFilterError(f"pd-deploy: systemd unit: {exc}") from None


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {
            "pd_systemd_unit": pd_systemd_unit,
            "pd_systemd_wanted": pd_systemd_wanted,
            "pd_systemd_mode": pd_systemd_mode,
            "pd_systemd_files": pd_systemd_files,
        }
