#!/usr/bin/python
"""Serve one file over HTTP from a node for a while (the image tarball fan-out)."""
from __future__ import annotations

DOCUMENTATION = r"""
module: pd_image_serve
short_description: Start or stop a transient HTTP server for one file on a node
description:
  - C(state=started) starts a small HTTP server (the node's Python, standard library)
    in its own session, bound to O(bind), that serves exactly one file, O(path), at
    C(/<basename>) and nothing else. It exits by itself after O(lifetime) seconds in
    case nobody stops it (an interrupted play). Its PID, start time and port are
    recorded in C(<dir of path>/.pd-image-serve.json); a server recorded there from
    an earlier run is stopped first.
  - C(state=stopped) stops the recorded server, only if the PID still is that server
    (same start time, command line naming the served file); a reused PID is never
    signalled. SIGTERM, then SIGKILL after 5 s. Idempotent.
  - In check mode nothing is started or stopped.
author: pd-deploy
options:
  state:
    description: Whether the server should run.
    type: str
    choices: [started, stopped]
    default: started
  path:
    description: The file to serve (absolute).
    type: path
    required: true
  bind:
    description: Address to listen on (the node IP).
    type: str
    default: 127.0.0.1
  port:
    description: TCP port; 0 picks a free one (returned as RV(port)).
    type: int
    default: 0
  lifetime:
    description: Seconds after which the server stops by itself.
    type: int
    default: 3600
"""

EXAMPLES = r"""
- name: Serve the image tarball to the next fan-out round
  pd_image_serve:
    path: /opt/pd/images/engine.tar
    bind: "{{ node_ip }}"
  register: server

- name: Stop serving
  pd_image_serve:
    path: /opt/pd/images/engine.tar
    state: stopped
"""

RETURN = r"""
pid:
  description: The server's PID.
  type: int
  returned: state=started
port:
  description: The port it listens on.
  type: int
  returned: state=started
url:
  description: The URL of the file.
  type: str
  returned: state=started
  sample: http://10.0.0.2:41234/engine.tar
stopped:
  description: PIDs of servers stopped (an earlier one, or the one asked to stop).
  type: list
  elements: int
  returned: always
"""

import json
import os
import signal
import subprocess
import sys
import time

from ansible.module_utils.basic import AnsibleModule
from ansible.module_utils.pd_node import atomic_write, read_cmdline, read_stat, start_time

MARKER = "pd-image-serve"
RECORD = ".pd-image-serve.json"

# The server: argv = MARKER PATH BIND PORT LIFETIME. Prints "port N" once listening.
SERVER = r"""
import http.server, os, shutil, sys, threading
_, _marker, path, bind, port, lifetime = sys.argv
name = "/" + os.path.basename(path)

class Handler(http.server.BaseHTTPRequestHandler):
    def _head(self):
        if self.path != name:
            self.send_error(404)
            return None
        f = open(path, "rb")
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(os.fstat(f.fileno()).st_size))
        self.end_headers()
        return f

    def do_HEAD(self):
        f = self._head()
        if f:
            f.close()

    def do_GET(self):
        f = self._head()
        if f:
            with f:
                shutil.copyfileobj(f, self.wfile, 1 << 20)

    def log_message(self, fmt, *args):
        sys.stdout.write("%s %s\n" % (self.address_string(), fmt % args))
        sys.stdout.flush()

family = __import__("socket").AF_INET6 if ":" in bind else __import__("socket").AF_INET
http.server.ThreadingHTTPServer.address_family = family
server = http.server.ThreadingHTTPServer((bind, int(port)), Handler)
server.daemon_threads = True
print("port %d" % server.server_address[1], flush=True)
threading.Timer(float(lifetime), server.shutdown).start()
server.serve_forever()
"""


def record_path(path: str) -> str:
    return os.path.join(os.path.dirname(path), RECORD)


def is_our_server(rec: dict) -> bool:
    """The recorded PID is still the server we started for this file."""
    pid = rec.get("pid")
    if not isinstance(pid, int) or pid <= 1:
        return False
    if start_time(pid) != rec.get("start_time"):
        return False
    cmd = read_cmdline(pid) or []
    return MARKER in cmd and rec.get("path") in cmd


def stop_server(path: str, grace: float = 5.0) -> list[int]:
    """Stop the server recorded next to PATH (if it is still ours); remove the record."""
    rec_file = record_path(path)
    try:
        with open(rec_file) as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return []
    stopped = []
    if is_our_server(rec):
        pid = rec["pid"]

        def running() -> bool:
            # Once it is ours, follow it by PID and start time alone: an exiting process
            # shows an empty command line before it lets go of its socket.
            st = read_stat(pid)
            return st is not None and not st.zombie and st.start_time == rec["start_time"]

        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            if not running():
                break
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                break
            end = time.monotonic() + wait
            while time.monotonic() < end and running():
                time.sleep(0.02)
        stopped.append(pid)
    os.unlink(rec_file)
    return stopped


def start_server(path: str, bind: str, port: int, lifetime: int, python: str = sys.executable,
                 timeout: float = 15.0) -> dict:
    """Start the server in its own session; wait until it listens; record it."""
    log_path = os.path.join(os.path.dirname(path), ".pd-image-serve.log")
    argv = [python, "-u", "-c", SERVER, MARKER, path, bind, str(port), str(lifetime)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                close_fds=True, cwd="/")
    end = time.monotonic() + timeout
    port_seen = None
    while time.monotonic() < end:
        with open(log_path, "rb") as f:
            first = f.readline().decode(errors="replace")
        if first.startswith("port ") and first.endswith("\n"):
            port_seen = int(first.split()[1])
            break
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    if port_seen is None:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        with open(log_path, "rb") as f:
            out = f.read().decode(errors="replace")[-2000:]
        raise RuntimeError(f"the HTTP server for {path} did not start on {bind}:{port}: {out}")
    rec = {"pid": proc.pid, "start_time": start_time(proc.pid), "port": port_seen,
           "path": path, "bind": bind}
    atomic_write(record_path(path), json.dumps(rec).encode(), 0o644)
    host = f"[{bind}]" if ":" in bind else bind
    rec["url"] = f"http://{host}:{port_seen}/{os.path.basename(path)}"
    return rec


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "state": {"type": "str", "choices": ["started", "stopped"], "default": "started"},
            "path": {"type": "path", "required": True},
            "bind": {"type": "str", "default": "127.0.0.1"},
            "port": {"type": "int", "default": 0},
            "lifetime": {"type": "int", "default": 3600},
        },
        supports_check_mode=True,
    )
    p = module.params
    path = os.path.abspath(p["path"])
    if module.check_mode:
        module.exit_json(changed=True, stopped=[], pid=None, port=None, url=None)
    stopped = stop_server(path)
    if p["state"] == "stopped":
        module.exit_json(changed=bool(stopped), stopped=stopped)
    if not os.path.isfile(path):
        module.fail_json(msg=f"{path}: no such file to serve", stopped=stopped)
    try:
        rec = start_server(path, p["bind"], p["port"], p["lifetime"])
    except (OSError, RuntimeError) as exc:
        module.fail_json(msg=str(exc), stopped=stopped)
    module.exit_json(changed=True, stopped=stopped, pid=rec["pid"], port=rec["port"],
                     url=rec["url"])


if __name__ == "__main__":
    main()
