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

import hashlib
import io
import json
import os
import tarfile

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.pd_node import atomic_write


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def _unpack(module: AnsibleModule, bundle: bytes, lib_dir: str) -> None:
    try:
        with tarfile.open(fileobj=io.BytesIO(bundle), mode="r:gz") as tar:
            members = tar.getmembers()
            for m in members:
                if (m.name.startswith(("/", "..")) or "/../" in m.name
                        or not (m.isfile() or m.isdir())):
                    module.fail_json(msg=f"refusing a bundle with {m.name!r}: only files and "
                                         "directories inside the lib dir")
            if hasattr(tarfile, "data_filter"):  # Python >= 3.9.17 / 3.10.12 / 3.11.4
                tar.extractall(lib_dir, members, filter="data")
            else:
                tar.extractall(lib_dir, members)
    except (tarfile.TarError, OSError, EOFError) as exc:
        module.fail_json(msg=f"cannot unpack the launcher bundle into {lib_dir}: {exc}")


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
        spec = json.loads(p["spec_json"])
        dirs = [p["lib_dir"]] + [spec["dirs"][k] for k in ("run", "state", "log")]
    except (ValueError, TypeError, KeyError) as exc:
        module.fail_json(msg=f"spec_json is not a node spec with dirs.run, dirs.state and "
                             f"dirs.log: {type(exc).__name__}: {exc}")
    spec_path = os.path.join(spec["dirs"]["run"], "spec.json")
    spec_bytes = (json.dumps(spec, indent=2, sort_keys=True) + "\n").encode()
    bundle = _read(p["bundle"])
    if bundle is None and module.check_mode:
        module.exit_json(changed=True, lib_changed=True, spec_changed=True, created=dirs,
                         spec_path=spec_path)
    if bundle is None:
        module.fail_json(msg=f"launcher bundle {p['bundle']} is missing on the node")
    marker = os.path.join(p["lib_dir"], ".bundle.sha256")
    lib_changed = (_read(marker) or b"").decode().strip() != _sha(bundle) or not os.path.exists(
        os.path.join(p["lib_dir"], "pd_launcher", "__main__.py"))
    spec_changed = _read(spec_path) != spec_bytes
    made = [d for d in dirs if not os.path.isdir(d)]
    # state (state file, lock): the launcher's alone; logs: not for every user of the node
    modes = {spec["dirs"]["state"]: 0o700, spec["dirs"]["log"]: 0o750}
    if not module.check_mode:
        for d in made:
            os.makedirs(d, mode=0o755, exist_ok=True)
        for d, mode in modes.items():
            if os.stat(d).st_mode & 0o7777 != mode:
                os.chmod(d, mode)
        if lib_changed:
            _unpack(module, bundle, p["lib_dir"])
            atomic_write(marker, _sha(bundle).encode() + b"\n", 0o644)
        if spec_changed:
            atomic_write(spec_path, spec_bytes, 0o600)
    module.exit_json(changed=bool(made or lib_changed or spec_changed), lib_changed=lib_changed,
                     spec_changed=spec_changed, created=made, spec_path=spec_path)


if __name__ == "__main__":
    main()
