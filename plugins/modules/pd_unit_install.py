#!/usr/bin/python
"""Install one pd-deploy unit's files on a node: directories, launcher, node spec."""
from __future__ import annotations

DOCUMENTATION = r"""
module: pd_unit_install
short_description: Create a unit's directories, unpack the launcher bundle, write the node spec
description:
  - One module run instead of a directory, unpack and template task each, so a converged
    node costs one round trip. Reports changed only when the launcher or the spec changed.
  - Supports check mode (reports what would change, changes nothing).
options:
  spec_json: {description: the node spec as JSON (may carry API keys), type: str, required: true}
  bundle: {description: path of the launcher bundle tarball on the node, type: path, required: true}
  lib_dir: {description: where the launcher package is unpacked, type: path, required: true}
"""

import hashlib
import io
import json
import os
import tarfile
import tempfile

from ansible.module_utils.basic import AnsibleModule


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def _atomic_write(path: str, data: bytes, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".pd-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
    spec = json.loads(p["spec_json"])
    dirs = [p["lib_dir"]] + [spec["dirs"][k] for k in ("run", "state", "log")]
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
    if not module.check_mode:
        for d in made:
            os.makedirs(d, mode=0o755, exist_ok=True)
        if lib_changed:
            with tarfile.open(fileobj=io.BytesIO(bundle), mode="r:gz") as tar:
                names = tar.getnames()
                if any(n.startswith(("/", "..")) or "/../" in n for n in names):
                    module.fail_json(msg="refusing a bundle with paths outside the lib dir")
                tar.extractall(p["lib_dir"])
            _atomic_write(marker, _sha(bundle).encode() + b"\n", 0o644)
        if spec_changed:
            _atomic_write(spec_path, spec_bytes, 0o600)
    module.exit_json(changed=bool(made or lib_changed or spec_changed), lib_changed=lib_changed,
                     spec_changed=spec_changed, created=made, spec_path=spec_path)


if __name__ == "__main__":
    main()
