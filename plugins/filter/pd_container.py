"""Ansible filters of the container runtime and the image role (logic in
pd_deploy/containers.py, unit tests in tests/unit/test_containers.py).

    argv:   "{{ pd_unit_spec | pd_container_run_argv(settings) }}"
    plan:   "{{ inspect.stdout | pd_container_decide({'labels': ..., 'image_id': ...}) }}"
    ps:     "{{ ([pd_container_cli] + pd_container_cli_args) | pd_container_ps_argv(filters) }}"
    list:   "{{ ps.stdout | pd_container_ps }}"
    unit's: "{{ ps.stdout | pd_container_unit_ps(pd_unit_spec) }}"  # exactly its containers
    image:  "{{ '/path/image.tar' | pd_image_archive }}"          # {id, tags}
    rounds: "{{ {'n1': tar, 'n2': tar} | pd_image_fanout_plan(4) }}"     # {seeds, rounds}
"""
from __future__ import annotations

import os
import sys
from typing import Any

from ansible.errors import AnsibleFilterError

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from pd_deploy import containers  # noqa: E402
from pd_deploy.inventory import _plain  # noqa: E402


def _wrap(name: str, func):
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*(_plain(a) for a in args), **{k: _plain(v) for k, v in kwargs.items()})
        except (containers.ContainerError, KeyError, TypeError, ValueError) as exc:
            raise AnsibleFilterError(f"pd-deploy: {name}: {exc}") from None
    call.__name__ = name
    call.__doc__ = func.__doc__
    return call


FILTERS = {
    "pd_container_run_argv": containers.run_argv,
    "pd_container_run_sha256": containers.run_sha256,
    "pd_container_spec_sha256": containers.spec_sha256,
    "pd_container_reloadable": containers.reloadable,
    "pd_container_decide": containers.decide,
    "pd_container_ps_argv": containers.ps_argv,
    "pd_container_ps": containers.parse_ps,
    "pd_container_unit_ps": containers.unit_containers,
    "pd_container_name": containers.container_name,
    "pd_container_labels": containers.unit_labels,
    "pd_container_label_filters": containers.label_filters,
    "pd_container_host_paths": containers.host_paths,
    "pd_container_optional_paths": containers.optional_host_paths,
    "pd_container_stop_timeout": containers.stop_timeout,
    "pd_image_id": containers.image_id,
    "pd_image_archive": containers.archive_info,
    "pd_image_fanout_plan": containers.fanout,
}


class FilterModule:
    def filters(self) -> dict[str, Any]:
        return {name: _wrap(name, func) for name, func in FILTERS.items()}
