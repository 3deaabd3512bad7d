#!/usr/bin/python
"""Install one pd-deploy unit's files on a node: directories, launcher, node spec."""
from __future__ import annotations

DOCUMENTATION = r"""
module: pd_unit_install
short_description: Create a unit's directories, unpack the launcher bundle, write the node spec
description:
  - One module run instead of a directory, unpack and template task each, so a converged
    node costs one round trip. Reports changed only when a directory was created or the
    launcher or the spec changed.
  - The launcher bundle (a tarball of the C(pd_launcher) package) is unpacked into
    O(lib_dir) when its sha256 differs from the one recorded there; the spec is written
    to C(<dirs.run>/spec.json), mode 0600 (it may carry API keys). Both writes are
    atomic (temp file, fsync, rename).
  - Supports check mode (reports what would change, changes nothing).
author: pd-deploy
options:
  spec_json:
    description: The node spec as JSON (may carry API keys; never logged).
    type: str
    required: true
  bundle:
    description: Path of the launcher bundle tarball on the node.
    type: path
    required: true
  lib_dir:
    description: Where the launcher package is unpacked.
    type: path
    required: true
"""

EXAMPLES = r"""
- name: Install the prefill unit
  pd_unit_install:
    spec_json: "{{ spec | to_json }}"
    bundle: /opt/pd/pd_launcher.tar.gz
    lib_dir: /opt/pd/lib
  no_log: true
"""

RETURN = r"""
lib_changed:
  description: The launcher package was (or would be) unpacked.
  type: bool
  returned: always
spec_changed:
  description: The spec file was (or would be) written.
  type: bool
  returned: always
created:
  description: Directories created (lib, run, state, log).
  type: list
  elements: str
  returned: always
spec_path:
  description: Where the spec is, C(<dirs.run>/spec.json).
  type: str
  returned: always
"""

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.pd_unit import UnitError, install_unit


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "spec_json": {"type": "str", "required": True, "no_log": True},
            "bundle": {"type": "path", "required": True},
            "lib_dir": {"type": "path", "required": True},
        },
        supports_check_mode=True,
    )
    p = module.params
    try:
        result = install_unit(p["spec_json"], p["bundle"], p["lib_dir"], module.check_mode)
    except UnitError as exc:
        module.fail_json(msg=str(exc))
    result.pop("need_bundle", None)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
