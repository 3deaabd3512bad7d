#!/usr/bin/python
"""Remove the files one pd-deploy unit put on a node (after it was stopped)."""
from __future__ import annotations

DOCUMENTATION = r"""
module: pd_unit_remove
short_description: Remove a stopped unit's run and state files (and logs if asked)
description:
  - Removes <base>/run/<role> and <base>/state/<role>, <base>/logs/<role> when
    remove_logs is true, and the launcher (<base>/lib) once no unit is left on the node.
  - Refuses while the unit's state file still exists (the unit was not stopped).
  - Only these paths, which pd-deploy created; supports check mode.
options:
  base_dir: {description: the node's pd_base_dir, type: path, required: true}
  role: {description: unit role (P, D or C), type: str, required: true}
  remove_logs: {description: also remove the unit's logs, type: bool, default: false}
"""

import os
import shutil

from ansible.module_utils.basic import AnsibleModule


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "base_dir": {"type": "path", "required": True},
            "role": {"type": "str", "required": True, "choices": ["P", "D", "C"]},
            "remove_logs": {"type": "bool", "default": False},
        },
        supports_check_mode=True,
    )
    base, role = module.params["base_dir"], module.params["role"]
    state_file = os.path.join(base, "state", role, "launcher.json")
    if os.path.exists(state_file):
        module.fail_json(msg=f"{state_file} still exists: the unit is not stopped")
    targets = [os.path.join(base, "run", role), os.path.join(base, "state", role)]
    if module.params["remove_logs"]:
        targets.append(os.path.join(base, "logs", role))
    run_dir = os.path.join(base, "run")
    others = [d for d in (os.listdir(run_dir) if os.path.isdir(run_dir) else []) if d != role]
    if not others:
        targets += [os.path.join(base, d) for d in ("lib", "run", "state")]
        if module.params["remove_logs"]:
            targets.append(os.path.join(base, "logs"))
    removed = [t for t in targets if os.path.lexists(t)]
    if not module.check_mode:
        for path in removed:
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            elif os.path.lexists(path):
                os.unlink(path)
    module.exit_json(changed=bool(removed), removed=removed)


if __name__ == "__main__":
    main()
