"""Build the node-side bundle: a reproducible tarball of the pd_launcher package only
(the controller package pd_deploy never reaches the nodes).

`python -m pd_deploy.bundle OUT_DIR` writes OUT_DIR/pd_launcher.tar.gz only when its
content changed (same sources -> same bytes, so Ansible's copy reports changed=0),
and prints `written <sha256>` or `unchanged <sha256>`.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import sys
import tarfile

import pd_launcher

PACKAGE = os.path.dirname(os.path.abspath(pd_launcher.__file__))
SKIP_DIRS = {"__pycache__"}


def build() -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        root = os.path.dirname(PACKAGE)
        for dirpath, dirnames, filenames in os.walk(PACKAGE):
            dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
            for name in sorted(filenames):
                if name.endswith((".pyc", ".pyo")):
                    continue
                path = os.path.join(dirpath, name)
                info = tarfile.TarInfo(os.path.relpath(path, root))
                with open(path, "rb") as f:
                    data = f.read()
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                info.uid = info.gid = 0
                info.uname = info.gname = "root"
                tar.addfile(info, io.BytesIO(data))
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0) as gz:
        gz.write(raw.getvalue())
    return out.getvalue()


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        sys.stderr.write("usage: python -m pd_deploy.bundle OUT_DIR\n")
        return 2
    os.makedirs(argv[0], exist_ok=True)
    target = os.path.join(argv[0], "pd_launcher.tar.gz")
    data = build()
    digest = hashlib.sha256(data).hexdigest()
    if os.path.exists(target):
        with open(target, "rb") as f:
            if f.read() == data:
                print(f"unchanged {digest}")
                return 0
    tmp = target + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, target)
    print(f"written {digest}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
