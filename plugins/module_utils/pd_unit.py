"""What the unit modules share: install a unit's files (pd_unit_install) and look at a
unit (pd_unit_info), so pd_unit_converge can do both, and the start, in one module run.

Standard library plus ansible.module_utils.pd_node only; no AnsibleModule here (callers
turn UnitError into fail_json and `warnings` into module.warn).
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import io
import json
import os
import tarfile
import time
from typing import Any, Dict, List, Optional

from ansible.module_utils.pd_node import (
    atomic_write,
    describe_state_damage,
    launcher_by_lock,
    probe_ready,
    read_state,
    same_pid_namespace,
    seconds_since_start,
    state_path,
    verify_recorded,
)


class UnitError(Exception):
    """A unit cannot be installed or read; the message is for the operator."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_bytes(path: str) -> Optional[bytes]:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def canonical_spec(spec: Dict[str, Any]) -> bytes:
    """The bytes of a unit's spec.json (the controller's pd_spec_sha256 filter hashes
    the same bytes)."""
    return (json.dumps(spec, indent=2, sort_keys=True) + "\n").encode()


def lib_is(lib_dir: str, bundle_sha256: str) -> bool:
    """The launcher package in lib_dir was unpacked from the bundle with this sha256."""
    marker = (read_bytes(os.path.join(lib_dir, ".bundle.sha256")) or b"").decode().strip()
    return bool(bundle_sha256) and marker == bundle_sha256 and os.path.exists(
        os.path.join(lib_dir, "pd_launcher", "__main__.py"))


def unit_converged(spec_path: str, spec_sha256: str, lib_dir: str, bundle_sha256: str,
                   state_dir: str) -> bool:
    """The unit runs the wanted spec and launcher and every process is ready: nothing
    to install, start or wait for."""
    spec = read_bytes(spec_path)
    if spec is None or sha256_hex(spec) != spec_sha256 or not lib_is(lib_dir, bundle_sha256):
        return False
    now = unit_info(state_dir, spec_path, probe=True)
    return bool(now["running"] and now["healthy"])


def _unpack(bundle: bytes, lib_dir: str) -> None:
    try:
        with tarfile.open(fileobj=io.BytesIO(bundle), mode="r:gz") as tar:
            members = tar.getmembers()
            for m in members:
                if (m.name.startswith(("/", "..")) or "/../" in m.name
                        or not (m.isfile() or m.isdir())):
                    raise UnitError(f"refusing a bundle with {m.name!r}: only files and "
                                    "directories inside the lib dir")
            if hasattr(tarfile, "data_filter"):  # Python >= 3.9.17 / 3.10.12 / 3.11.4
                tar.extractall(lib_dir, members, filter="data")
            else:
                tar.extractall(lib_dir, members)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise UnitError(f"cannot unpack the launcher bundle into {lib_dir}: {exc}") from None


def install_unit(spec_json: str, bundle_path: str, lib_dir: str, check_mode: bool,
                 bundle_sha256: str = "", bundle_data: Optional[bytes] = None
                 ) -> Dict[str, Any]:
    """Directories, launcher package and spec file of one unit.

    With `bundle_sha256` (the controller's bundle) a lib dir already holding that bundle
    needs no tarball on the node; when it needs one that is not there (or is another
    one), the result says `need_bundle` and nothing was changed. `bundle_data` (the
    tarball sent along with the module's arguments) replaces reading `bundle_path`."""
    try:
        spec = json.loads(spec_json)
        dirs = [lib_dir] + [spec["dirs"][k] for k in ("run", "state", "log")]
    except (ValueError, TypeError, KeyError) as exc:
        raise UnitError(f"spec_json is not a node spec with dirs.run, dirs.state and "
                        f"dirs.log: {type(exc).__name__}: {exc}") from None
    spec_path = os.path.join(spec["dirs"]["run"], "spec.json")
    spec_bytes = canonical_spec(spec)
    marker = os.path.join(lib_dir, ".bundle.sha256")
    installed = (read_bytes(marker) or b"").decode().strip()
    lib_present = os.path.exists(os.path.join(lib_dir, "pd_launcher", "__main__.py"))
    result: Dict[str, Any] = {"spec_path": spec_path, "need_bundle": False}
    bundle: Optional[bytes] = None
    if bundle_sha256 and installed == bundle_sha256 and lib_present:
        lib_changed = False
    else:
        bundle = bundle_data if bundle_data is not None else read_bytes(bundle_path)
        if bundle_sha256 and (bundle is None or sha256_hex(bundle) != bundle_sha256):
            result.update(changed=False, lib_changed=True, spec_changed=False, created=[],
                          need_bundle=True)
            return result
        if bundle is None and check_mode:
            result.update(changed=True, lib_changed=True, spec_changed=True, created=dirs)
            return result
        if bundle is None:
            raise UnitError(f"launcher bundle {bundle_path} is missing on the node")
        lib_changed = installed != sha256_hex(bundle) or not lib_present
    spec_changed = read_bytes(spec_path) != spec_bytes
    made = [d for d in dirs if not os.path.isdir(d)]
    # state (state file, lock): the launcher's alone; logs: not for every user of the node
    modes = {spec["dirs"]["state"]: 0o700, spec["dirs"]["log"]: 0o750}
    if not check_mode:
        for d in made:
            os.makedirs(d, mode=0o755, exist_ok=True)
        for d, mode in modes.items():
            if os.stat(d).st_mode & 0o7777 != mode:
                os.chmod(d, mode)
        if lib_changed and bundle is not None:
            _unpack(bundle, lib_dir)
            atomic_write(marker, sha256_hex(bundle).encode() + b"\n", 0o644)
        if spec_changed:
            atomic_write(spec_path, spec_bytes, 0o600)
    result.update(changed=bool(made or lib_changed or spec_changed), lib_changed=lib_changed,
                  spec_changed=spec_changed, created=made)
    return result


def _ours(entry: Dict[str, Any]) -> bool:
    return bool(entry) and verify_recorded(entry)[0] == "ours"


def unit_info(state_dir: str, spec_path: Optional[str], probe: bool = True,
              timeout: float = 2.0, check_pids: bool = True) -> Dict[str, Any]:
    """The unit's state file, its recorded PIDs checked (start time + command line) and,
    with `probe`, every live process's readiness probe. `damage` lists what is wrong
    with the state file (the caller warns with it)."""
    state, read_error = None, None
    try:
        state = read_state(state_dir)
    except (OSError, ValueError) as exc:
        read_error = f"cannot read {state_path(state_dir)}: {exc}"
    spec = None
    if spec_path and os.path.exists(spec_path):
        try:
            with open(spec_path, encoding="utf-8") as f:
                spec = json.load(f)
        except (OSError, ValueError) as exc:
            raise UnitError(f"cannot read the node spec {spec_path}: {exc}") from None
    check = check_pids and (state is None or same_pid_namespace(state))
    where = "{}/{}".format((spec or {}).get("node") or "?",
                           (spec or {}).get("unit") or (spec or {}).get("role") or "?")
    damage: List[str] = []
    state_error = None
    if read_error:
        state_error = f"{where}: damaged state file: {read_error}; no recorded PID can be " \
                      "proven ours"
        damage.append(state_error)
    elif check:
        damage += [f"{where}: damaged state file: {d}"
                   for d in describe_state_damage(state_dir, state)]
    launcher = (state or {}).get("launcher") or {}
    if check and (state_error or (launcher and not _ours(launcher))):
        launcher = launcher_by_lock(state_dir) or launcher  # the lock proves it
    recorded = {e.get("name"): e for e in (state or {}).get("processes", [])}
    spec_procs = {q["name"]: q for q in (spec or {}).get("processes", [])}
    names = list(spec_procs) or list(recorded)
    alive = {n: (_ours(recorded.get(n, {})) if check else None) for n in names}
    started = time.monotonic()
    wanted = {n: spec_procs[n]["ready"] for n in names
              if probe and alive[n] is not False and (spec_procs.get(n) or {}).get("ready")}
    results = {}
    if wanted:
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(16, len(wanted))) as pool:
            futures = {n: pool.submit(probe_ready, r, timeout) for n, r in wanted.items()}
            results = {n: f.result() for n, f in futures.items()}
    procs = []
    for name in names:
        entry = recorded.get(name, {})
        spec_proc = spec_procs.get(name, {})
        ok, detail = results.get(name, (False, "not probed"))
        if probe and name in spec_procs and not spec_proc.get("ready") and name in recorded:
            # no probe of its own (e.g. xLLM's ranks > 0, covered by rank 0's /health):
            # ready while it runs, as `pd_launcher wait` counts it
            running = alive[name] if check else entry.get("exit") is None
            ok, detail = bool(running), "no probe, running" if running else "no probe, not running"
        procs.append({
            "name": name,
            "pid": entry.get("pid"),
            "alive": alive[name],
            "ready": ok,
            "probe": detail,
            "ports": [f"{x['host']}:{x['port']}/{x['use']}" for x in spec_proc.get("ports", [])],
            "dp_ranks": spec_proc.get("dp_ranks", []),
        })
    launcher_alive = _ours(launcher) if check else None
    uptime = None
    if launcher_alive:
        since = seconds_since_start(launcher["start_time"])
        uptime = None if since is None else round(since, 1)
    result: Dict[str, Any] = {
        "changed": False,
        "deployed": spec is not None,
        "recorded": state is not None or state_error is not None,
        "status": (state or {}).get("status"),
        "restarts": int((state or {}).get("restarts") or 0),
        "launcher_pid": launcher.get("pid"),
        "launcher_alive": launcher_alive,
        "uptime_s": uptime,
        "running": bool(launcher_alive) and bool(procs) and all(x["alive"] for x in procs),
        "healthy": bool(procs) and all(x["ready"] for x in procs),
        "processes": procs,
        "probe_seconds": round(time.monotonic() - started, 3),
        "now": time.time(),
    }
    if state_error:
        result["state_error"] = state_error
    result["damage"] = damage
    return result
