"""Per-process log files and the launcher's own log.

Layout (log dir = --log-dir or spec dirs.log)::

    <log>/launcher.log        the launcher's own log (also echoed to stderr); rotated
    <log>/<name>.log          stdout+stderr of process <name>
    <log>/<name>.log.1 .. .N  older content (N = --log-backups)

Choice: a child writes straight into its log file (opened O_APPEND and inherited as
its stdout/stderr), so a slow, busy or dead launcher can never block it on a full
pipe. The launcher checks the size about once a second and, above --log-max-bytes,
rotates by copy-then-truncate (``.1`` -> ``.2`` ..., copy to ``.1``, truncate to 0).
Because of O_APPEND the child's next write lands at the new end. Lines written
between the copy and the truncate are lost (a window of a few milliseconds); the
file can briefly exceed the cap by what is written within one check interval.
"""
from __future__ import annotations

import logging
import logging.handlers
import os
import shutil
import sys
import time
from typing import Optional

DEFAULT_MAX_BYTES = 50 * 1024 * 1024
DEFAULT_BACKUPS = 3


def process_log_path(log_dir: str, name: str) -> str:
    return os.path.join(log_dir, name + ".log")


def open_process_log(path: str):  # -> BinaryIO
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return open(path, "ab", buffering=0)


def write_banner(path: str, text: str) -> None:
    with open(path, "ab") as f:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        f.write((f"==== pd-launcher {stamp}: {text}\n").encode("utf-8", "replace"))


def rotate_if_needed(path: str, max_bytes: int, backups: int) -> bool:
    """Copy-truncate rotation of a file a child keeps open with O_APPEND."""
    if max_bytes <= 0:
        return False
    try:
        size = os.path.getsize(path)
    except OSError:
        return False
    if size <= max_bytes:
        return False
    if backups > 0:
        for i in range(backups - 1, 0, -1):
            src = f"{path}.{i}"
            if os.path.exists(src):
                os.replace(src, f"{path}.{i + 1}")
        tmp = path + ".1.tmp"
        with open(path, "rb") as src_f, open(tmp, "wb") as dst_f:
            shutil.copyfileobj(src_f, dst_f, 1024 * 1024)
        os.replace(tmp, path + ".1")
    with open(path, "r+b") as f:
        f.truncate(0)
    return True


def setup_launcher_logger(log_dir: Optional[str], max_bytes: int, backups: int,
                          stderr: bool = True) -> logging.Logger:
    logger = logging.getLogger("pd_launcher.launcher")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    fmt = logging.Formatter("%(asctime)s pd-launcher[%(process)d] %(levelname)s %(message)s")
    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
        fh = logging.handlers.RotatingFileHandler(
            os.path.join(log_dir, "launcher.log"), maxBytes=max(max_bytes, 0),
            backupCount=backups, encoding="utf-8")
        fh.setFormatter(fmt)
        logger.addHandler(fh)
    if stderr:
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(logging.Formatter("pd-launcher: %(message)s"))
        logger.addHandler(sh)
    return logger
