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

A full log filesystem never stops anything: a banner that cannot be written is
skipped, and a rotation whose backup copy does not fit drops the copy and still
truncates the live file (the old content is lost, the new content has room again).
The spec's `logs.files` (files a process opens itself, such as nginx's access log)
are rotated the same way, which works for any writer that opens them O_APPEND.

Modes: the log directory is created 0750 and the log files 0640 (logs can hold
prompts and addresses; they are not for every user of the node).
"""
from __future__ import annotations

import errno
import logging
import logging.handlers
import os
import shutil
import sys
import time
from typing import Optional

DEFAULT_MAX_BYTES = 50 * 1024 * 1024
DEFAULT_BACKUPS = 3
DIR_MODE = 0o750
FILE_MODE = 0o640
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def make_log_dir(path: str) -> None:
    """Create the log directory (0750) if missing; an existing one is left as it is."""
    os.makedirs(path, mode=DIR_MODE, exist_ok=True)


def process_log_path(log_dir: str, name: str) -> str:
    return os.path.join(log_dir, name + ".log")


def open_process_log(path: str):  # -> BinaryIO
    make_log_dir(os.path.dirname(path))
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    return os.fdopen(fd, "ab", buffering=0)


def write_banner(path: str, text: str) -> bool:
    """Append the start banner; False (and nothing raised) when it cannot be written,
    e.g. on a full log filesystem: a missing banner must not stop a start."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    try:
        with open_process_log(path) as f:
            f.write((f"==== pd-launcher {stamp}: {text}\n").encode("utf-8", "replace"))
    except OSError:
        return False
    return True


def rotate_if_needed(path: str, max_bytes: int, backups: int) -> Optional[str]:
    """Copy-truncate rotation of a file a writer keeps open with O_APPEND.

    None when nothing was done (under the cap, missing file, no cap); else what was
    done: "rotated" or, when the backup copy did not fit on the filesystem,
    "truncated without a backup (no space left)". Other errors raise OSError.
    """
    if max_bytes <= 0:
        return None
    try:
        size = os.path.getsize(path)
    except OSError:
        return None
    if size <= max_bytes:
        return None
    done = "rotated"
    if backups > 0:
        for i in range(backups - 1, 0, -1):
            src = f"{path}.{i}"
            if os.path.exists(src):
                os.replace(src, f"{path}.{i + 1}")
        tmp = path + ".1.tmp"
        try:
            with open(path, "rb") as src_f:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
                with os.fdopen(fd, "wb") as dst_f:
                    shutil.copyfileobj(src_f, dst_f, 1024 * 1024)
            os.replace(tmp, path + ".1")
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            if exc.errno not in _NO_SPACE:
                raise
            done = "truncated without a backup (no space left)"
    with open(path, "r+b") as f:
        f.truncate(0)
    return done


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
        make_log_dir(log_dir)
        path = os.path.join(log_dir, "launcher.log")
        try:  # created 0640 (RotatingFileHandler would use the umask)
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE))
        except OSError:
            pass
        fh = logging.handlers.RotatingFileHandler(
            path, maxBytes=max(max_bytes, 0), backupCount=backups, encoding="utf-8")
        fh.setFormatter(fmt)
        logger.addHandler(fh)
    if stderr:
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(logging.Formatter("pd-launcher: %(message)s"))
        logger.addHandler(sh)
    return logger
