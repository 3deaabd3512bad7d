"""systemd service units that start a process-runtime unit's launcher at boot.

One service per node unit, ``pd-deploy-<cluster>-<unit>.service``: it runs
``python -m pd_launcher run <run>/spec.json --state-dir <state> --log-dir <log>`` from the
unit's lib directory, as the converge module (plugins/modules/pd_unit_converge.py) does
during site.yml. The node_unit role installs and *enables* it (it is not started: site.yml
starts the launcher itself); at boot systemd starts it, and the next site.yml finds the
unit running (its state file) and keeps it. ``Restart=no``: the launcher restarts crashed
processes itself (pd_restart_policy). docs/systemd.md has the whole story.

The unit file carries no secret: the spec's environment stays in the spec file (0600);
only the environment given here (the proxy-free environment, PYTHONPATH) is written.
Every error names the host and the field.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from pd_launcher.nodeutil import is_secret_name

#: first line of every unit file pd-deploy writes; cleanup removes only files that have it
MARKER_PREFIX = "# pd-deploy: "
#: characters systemd-escape keeps in a unit name component ('-' too: it is valid in
#: unit names and the planner's names use it, e.g. xllm-service; '/' is escaped)
_NAME_SAFE = re.compile(r"[A-Za-z0-9:_.\-]")
#: unit names are at most 255 characters (UNIT_NAME_MAX - 1)
NAME_MAX = 255
#: `pd_launcher stop` waits grace + 15 s for the launcher's own shutdown; 15 s more
#: for systemd to see the processes gone
STOP_MARGIN_S = 30
#: grace_seconds of a spec that does not say (the launcher's default)
DEFAULT_GRACE_S = 30
#: the phases of a host's units, in start order (pd_plan.units)
PHASES = ("before-engines", "engines", "after-engines", "front-door")
_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class SystemdUnitError(ValueError):
    """An input that cannot make a valid unit; the message names host and field."""


def _fail(host: str, field: str, message: str) -> SystemdUnitError:
    return SystemdUnitError(f"{host}: {field}: {message}")


def escape_name(value: str) -> str:
    """systemd-escape (unit name mode) of one name component: characters outside
    [A-Za-z0-9:_.-] and a leading '.' become \\xNN per UTF-8 byte ('/' included, so that
    a name never names a path)."""
    out = []
    for i, ch in enumerate(value):
        if _NAME_SAFE.fullmatch(ch) and not (i == 0 and ch == "."):
            out.append(ch)
        else:
            out.extend(f"\\x{b:02x}" for b in ch.encode("utf-8"))
    return "".join(out)


def _text(host: str, field: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise _fail(host, field, f"must be a non-empty string, got {value!r}")
    if _CONTROL.search(value):
        raise _fail(host, field, f"must not contain control characters, got {value!r}")
    return value


def _path(host: str, field: str, value: Any) -> str:
    value = _text(host, field, value)
    if not value.startswith("/") or value != value.strip():
        raise _fail(host, field, f"must be an absolute path (no surrounding spaces), "
                                 f"got {value!r}")
    return value


def _spec_unit(spec: Mapping[str, Any]) -> str:
    """The unit's name in the plan: P, D, C or the service's name."""
    return str(spec.get("unit") or spec.get("role") or "")


def unit_name(spec: Mapping[str, Any]) -> str:
    """``pd-deploy-<cluster>-<unit>.service`` of a node spec (components escaped)."""
    host = str(spec.get("node") or "?")
    cluster = _text(host, "cluster", spec.get("cluster"))
    unit = _text(host, "unit", _spec_unit(spec))
    name = f"pd-deploy-{escape_name(cluster)}-{escape_name(unit)}.service"
    if len(name) > NAME_MAX:
        raise _fail(host, "cluster", f"the systemd unit name {name!r} is longer than "
                                     f"{NAME_MAX} characters (a shorter pd_cluster_name?)")
    return name


def marker(spec: Mapping[str, Any]) -> str:
    """The marker line of the unit's file (escaped names: one line, no spaces inside)."""
    host = str(spec.get("node") or "?")
    cluster = escape_name(_text(host, "cluster", spec.get("cluster")))
    unit = escape_name(_text(host, "unit", _spec_unit(spec)))
    return f"{MARKER_PREFIX}cluster={cluster} unit={unit}"


def stop_timeout(spec: Mapping[str, Any]) -> int:
    """TimeoutStopSec: the spec's SIGTERM -> SIGKILL grace (grace_seconds, default 30)
    plus the time `pd_launcher stop` gives the launcher to shut down (STOP_MARGIN_S)."""
    grace = spec.get("grace_seconds")
    if isinstance(grace, bool) or not isinstance(grace, (int, float)) or grace < 0:
        grace = DEFAULT_GRACE_S
    return int(math.ceil(grace)) + STOP_MARGIN_S


def _quote_word(word: str) -> str:
    """One argument of an Exec*= line: specifiers (%) and variables ($) are literal,
    quoted when it has a space, quote or backslash."""
    word = word.replace("%", "%%").replace("$", "$$")
    if word and not re.search(r"[\s\"'\\;]", word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _literal(path: str) -> str:
    """A path setting (WorkingDirectory=, ConditionPathExists=): taken as is, no quotes
    and no variables, but specifiers (%) are expanded."""
    return path.replace("%", "%%")


def _exec_line(argv: list[str]) -> str:
    return " ".join(_quote_word(a) for a in argv)


def _env_line(host: str, key: str, value: Any) -> str:
    if not isinstance(key, str) or not _ENV_KEY.fullmatch(key):
        raise _fail(host, f"environment.{key}", "is not a valid environment variable name")
    if is_secret_name(key):
        raise _fail(host, f"environment.{key}", "looks like a secret; secrets stay in the "
                                                "spec file (0600), never in a unit file")
    text = "" if value is None else str(value)
    if _CONTROL.search(text):
        raise _fail(host, f"environment.{key}", "must not contain control characters")
    text = text.replace("%", "%%").replace("\\", "\\\\").replace('"', '\\"')
    return f'Environment="{key}={text}"'


def _after_units(spec: Mapping[str, Any], phases: Mapping[str, str] | None) -> list[str]:
    """The service names of this host's units of earlier phases (etcd before the front
    door on a C host), so that at boot they start first on the same node."""
    if not phases:
        return []
    own = _spec_unit(spec)
    rank = {p: i for i, p in enumerate(PHASES)}
    mine = rank.get(str(phases.get(own, "")), len(PHASES))
    return [unit_name(dict(spec, unit=u)) for u, p in phases.items()
            if u != own and rank.get(str(p), len(PHASES)) < mine]


def render_unit(spec: Mapping[str, Any], python: str, lib_dir: str, spec_path: str,
                state_dir: str, log_dir: str, environment: Mapping[str, Any] | None = None,
                user: str | None = None, phases: Mapping[str, str] | None = None
                ) -> dict[str, str]:
    """{"name", "content", "marker"} of the service unit of one node unit.

    spec: the unit's node spec (cluster, node, role/unit, grace_seconds are read; its
    processes and their environment are not). python: pd_python (absolute, or a name
    systemd finds in its own PATH). environment: written as Environment= lines (the
    proxy-free environment); PYTHONPATH is set to lib_dir. user: User= (the owner of
    the unit's files; None: root). phases: unit -> phase of the host (pd_plan.units),
    for After= on the host's earlier units.
    """
    host = _text("?", "node", spec.get("node"))
    name = unit_name(spec)
    cluster = spec["cluster"]
    unit = _spec_unit(spec)
    python = _text(host, "pd_python", python)
    lib_dir = _path(host, "lib_dir", lib_dir)
    spec_path = _path(host, "spec_path", spec_path)
    state_dir = _path(host, "state_dir", state_dir)
    log_dir = _path(host, "log_dir", log_dir)
    env = dict(environment or {})
    env["PYTHONPATH"] = lib_dir
    if user is not None:
        user = _text(host, "user", user)
        if not re.fullmatch(r"[A-Za-z0-9_.][A-Za-z0-9_.@\-]*\$?", user):
            raise _fail(host, "user", f"is not a valid user name, got {user!r}")
    run = [python, "-m", "pd_launcher", "run", spec_path, "--state-dir", state_dir,
           "--log-dir", log_dir]
    stop = [python, "-m", "pd_launcher", "stop", "--state-dir", state_dir]
    after = " ".join(["network-online.target"] + _after_units(spec, phases))
    description = f"pd-deploy cluster {cluster} unit {unit} on node {host}"
    lines = [
        marker(spec),
        "# Written by pd-deploy (roles/node_unit/tasks/systemd.yml), removed by cleanup.yml;",
        "# the next site.yml rewrites any change. docs/systemd.md.",
        "[Unit]",
        "Description=" + description.replace("%", "%%"),
        "After=" + after,
        "Wants=network-online.target",
        # a spec that is gone (cleanup kept the file, a tmpfs base_dir): skipped, not failed
        "ConditionPathExists=" + _literal(spec_path),
        "",
        "[Service]",
        "Type=simple",
    ]
    if user is not None:
        lines.append("User=" + user)
    lines += ["WorkingDirectory=" + _literal(lib_dir)]
    lines += [_env_line(host, k, v) for k, v in sorted(env.items())]
    lines += [
        "ExecStart=" + _exec_line(run),
        # Only when systemd stops a launcher it still runs (systemctl stop, shutdown):
        # $MAINPID is unset once the launcher has exited, e.g. because site.yml
        # restarted the unit, and then this must not stop the launcher site.yml started.
        "ExecStop=/bin/sh -c " + _quote_word('[ -z "$MAINPID" ] || exec "$0" "$@"')
        + " " + _exec_line(stop),
        "KillMode=mixed",
        f"TimeoutStopSec={stop_timeout(spec)}",
        "# Restart=no: the launcher restarts crashed processes itself (pd_restart_policy)",
        "# and gives up after pd_restart_max; systemd only brings the unit up at boot.",
        "Restart=no",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ]
    return {"name": name, "content": "\n".join(lines), "marker": marker(spec)}


def systemd_wanted(value: Any, running: Any = None) -> bool:
    """pd_systemd (auto | true | false) -> install the units? auto: whether the node runs
    systemd (`running`: a bool, or ansible.builtin.stat's result of /run/systemd/system;
    None or a skipped result: unknown, taken as true so that the caller looks)."""
    mode = systemd_mode(value)
    if mode != "auto":
        return mode == "true"
    if isinstance(running, Mapping):
        if "stat" not in running:
            return True
        return bool(running["stat"].get("exists") and running["stat"].get("isdir", True))
    return True if running is None else bool(running)


def systemd_mode(value: Any) -> str:
    """pd_systemd normalised: "auto", "true" or "false" (YAML booleans and their usual
    spellings accepted); anything else is an error naming the knob."""
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value).strip().lower()
    if text in ("auto", ""):
        return "auto"
    if text in ("true", "yes", "on", "1"):
        return "true"
    if text in ("false", "no", "off", "0"):
        return "false"
    raise SystemdUnitError(f"pd_systemd: must be auto, true or false, got {value!r}")


def unit_files(specs: Mapping[str, Mapping[str, Any]], units: list[str],
               directory: str) -> list[dict[str, str]]:
    """For cleanup: {"unit", "name", "path", "marker"} of the host's UNITS (names of
    SPECS, the host's specs by unit) in DIRECTORY (pd_systemd_dir)."""
    out = []
    for u in units:
        spec = specs[u]
        host = str(spec.get("node") or "?")
        base = _path(host, "pd_systemd_dir", directory).rstrip("/") or "/"
        name = unit_name(spec)
        out.append({"unit": u, "name": name, "path": f"{base}/{name}", "marker": marker(spec)})
    return out
