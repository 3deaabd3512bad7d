"""The container runtime, controller side: pure functions behind the Ansible filters
of plugins/filter/pd_container.py and the status table.

* ``run_argv(spec, settings)``: the ``<cli> run`` command of one unit (flags, labels,
  mounts, devices), for docker and podman;
* ``decide(inspect_output, wanted)``: keep, create or recreate a unit's container;
* ``ps_argv(cli)``: the ``<cli> ps`` command whose output ``parse_ps`` reads, for both CLIs;
* ``parse_ps(output)`` / ``parse_inspect(output)``: docker's and podman's JSON in one shape;
* ``archive_info(path)``: the image ID and tags of a docker-archive tarball without
  loading it (the ``Config`` blob named in ``manifest.json``);
* ``fanout(needs, width)``: which node gets the tarball from the controller (the seed)
  and, round by round, which node fetches it from which holder.

No I/O except ``archive_info`` (reads the tarball's manifest).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile
from typing import Any, Iterable, Mapping

LABEL_CLUSTER = "pd.cluster"
LABEL_NODE = "pd.node"
LABEL_ROLE = "pd.role"
LABEL_UNIT = "pd.unit"  # services only: P, D and C (the front door) are named by pd.role
LABEL_SPEC = "pd.spec-sha256"
LABEL_LAUNCHER = "pd.launcher-sha256"
LABEL_RUN = "pd.run-sha256"
IDENTITY_LABELS = (LABEL_CLUSTER, LABEL_NODE, LABEL_ROLE, LABEL_UNIT)
UNIT_ROLES = ("P", "D", "C")

# `<cli> stop -t` and `run --stop-timeout`: the launcher's own grace (SIGTERM -> SIGKILL of
# its children) plus this margin, so the runtime's SIGKILL never cuts the grace short.
STOP_MARGIN_S = 10

# Ascend hosts (reference/vllm-pd-facts.md, "Containers on Ascend hosts"): read-only
# driver mounts; hccn_tool only when the host has it.
ASCEND_MOUNTS = (
    "/usr/local/Ascend/driver",
    "/usr/local/dcmi",
    "/usr/local/bin/npu-smi",
    "/etc/ascend_install.info",
    "/etc/hccn.conf",
)
ASCEND_OPTIONAL_MOUNTS = ("/usr/bin/hccn_tool",)
#: engines that run on Ascend NPUs: their containers get the devices and driver mounts
ASCEND_ENGINES = ("vllm-ascend", "xllm")


class ContainerError(ValueError):
    pass


def _is_engine(spec: Mapping[str, Any]) -> bool:
    return spec.get("role") in ("P", "D")


def unit_name(spec: Mapping[str, Any]) -> str:
    """The unit a spec describes: P, D, C (the front door) or a service name."""
    return str(spec.get("unit") or spec["role"])


def unit_labels(spec: Mapping[str, Any]) -> dict[str, str]:
    """The labels that say whose container it is: cluster, node, role, and for a service
    (a unit on a C host that is not the front door) its name as pd.unit."""
    labels = {LABEL_CLUSTER: str(spec["cluster"]), LABEL_NODE: str(spec["node"]),
              LABEL_ROLE: str(spec["role"])}
    if unit_name(spec) not in UNIT_ROLES:
        labels[LABEL_UNIT] = unit_name(spec)
    return labels


def container_name(spec: Mapping[str, Any]) -> str:
    """``pd-<cluster>-<node>-<unit>`` (unit in lower case: p, d, c or the service name),
    as roles/node_unit/tasks/paths.yml names it."""
    return f"pd-{spec['cluster']}-{spec['node']}-{unit_name(spec).lower()}"


def label_filters(spec: Mapping[str, Any]) -> list[str]:
    """``ps`` arguments selecting this unit's containers (label filters AND). A CLI
    filter cannot ask for a label to be absent, so the front door's filters also match
    the services of its host: pass the output through ``unit_containers``."""
    out: list[str] = []
    for key, value in unit_labels(spec).items():
        out += ["--filter", f"label={key}={value}"]
    return out


def is_unit_container(container: Mapping[str, Any], spec: Mapping[str, Any]) -> bool:
    """Whether a container (``parse_ps`` shape) carries exactly this unit's identity
    labels (pd.unit absent for P, D and C)."""
    want = unit_labels(spec)
    theirs = container.get("labels") or {}
    return all(theirs.get(k) == want.get(k) for k in IDENTITY_LABELS)


def unit_containers(ps_text: Any, spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The containers of one unit in ``ps_argv`` output."""
    return [c for c in parse_ps(ps_text) if is_unit_container(c, spec)]


def host_paths(spec: Mapping[str, Any]) -> list[str]:
    """Host paths a unit's container mounts that must exist (preflight checks them):
    the Ascend driver files for Ascend engines (vllm-ascend, xllm); nothing for others."""
    if _is_engine(spec) and spec.get("engine") in ASCEND_ENGINES:
        return list(ASCEND_MOUNTS)
    return []


def optional_host_paths(spec: Mapping[str, Any]) -> list[str]:
    """Host paths mounted only when present on the node (stat them, pass the existing
    ones as ``settings["present"]``)."""
    if _is_engine(spec) and spec.get("engine") in ASCEND_ENGINES:
        return list(ASCEND_OPTIONAL_MOUNTS)
    return []


def _unique(items: Iterable[str]) -> list[str]:
    seen: list[str] = []
    for item in items:
        if item and item not in seen:
            seen.append(item)
    return seen


def _str_list(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        raise ContainerError(f"{what}: expected a list of strings, got {value!r}")
    return [str(v) for v in value]


def run_argv(spec: Mapping[str, Any], settings: Mapping[str, Any]) -> list[str]:
    """``<cli> [cli_args] run -d ...`` for one unit (node spec ``spec``).

    settings: ``cli`` (docker | podman), ``cli_args``, ``name``, ``image``,
    ``spec_path``, ``lib`` (directory holding the unpacked pd_launcher package),
    ``python`` (in the image), ``restart``, ``shm_size``, ``extra_args`` (engines
    only), ``labels`` (added to cluster/node/role, e.g. the spec checksum),
    ``present`` (optional host paths that exist on the node).

    One container per node and unit: host network, ``--init`` (reaps orphans, forwards
    SIGTERM to the launcher), stop timeout = grace + margin, the unit's run/state/log
    directories mounted read-write at the same path, the launcher package read-only,
    the model read-only (real engines), and the accelerators: every Ascend device file
    plus the driver mounts and /etc/hccn.conf (vllm-ascend, xllm), all GPUs (vllm: CDI
    for podman, ``--gpus``
    for docker); none for the emulator and the proxy.
    """
    for key in ("name", "image", "spec_path", "lib"):
        if not settings.get(key):
            raise ContainerError(f"settings.{key} is required")
    cli = str(settings.get("cli") or "docker")
    engine_unit = _is_engine(spec)
    engine = spec.get("engine")
    dirs = spec["dirs"]
    grace = int(spec.get("grace_seconds", 30))
    lib = str(settings["lib"])
    argv = [cli, *_str_list(settings.get("cli_args"), "cli_args"),
            "run", "--detach", "--name", str(settings["name"])]
    labels = dict(unit_labels(spec))
    labels.update({str(k): str(v) for k, v in (settings.get("labels") or {}).items()})
    for key in sorted(labels):
        argv += ["--label", f"{key}={labels[key]}"]
    argv += ["--network", "host", "--init",
             "--restart", str(settings.get("restart") or "no"),
             "--stop-timeout", str(grace + STOP_MARGIN_S),
             "--pull", "never"]
    if engine_unit and settings.get("shm_size"):
        argv += ["--shm-size", str(settings["shm_size"])]
    for d in _unique([dirs["run"], dirs["state"], dirs["log"]]):
        argv += ["--volume", f"{d}:{d}"]
    argv += ["--volume", f"{lib}:{lib}:ro"]
    checks = spec.get("checks") or {}
    real = engine_unit and engine in ASCEND_ENGINES + ("vllm",)
    mounts: list[str] = []
    if engine_unit:
        # the proxy's checks.paths (the njs module) live in the image, not on the host
        mounts += checks.get("paths") or []
    if real and engine in ASCEND_ENGINES:
        for dev in _unique(checks.get("devices") or []):
            argv += ["--device", dev]
        present = set(_str_list(settings.get("present"), "present"))
        mounts += host_paths(spec) + [p for p in optional_host_paths(spec) if p in present]
    for path in _unique(mounts):
        argv += ["--volume", f"{path}:{path}:ro"]
    if real and engine == "vllm":
        argv += ["--device", "nvidia.com/gpu=all"] if cli.endswith("podman") else ["--gpus", "all"]
    if engine_unit:
        argv += _str_list(settings.get("extra_args"), "extra_args")
    argv += ["--env", f"PYTHONPATH={lib}", str(settings["image"]),
             str(settings.get("python") or "python3"), "-m", "pd_launcher", "run",
             str(settings["spec_path"]), "--state-dir", dirs["state"], "--log-dir", dirs["log"]]
    return argv


def run_sha256(spec: Mapping[str, Any], settings: Mapping[str, Any]) -> str:
    """Checksum of how the unit's container is run (``run_argv`` without the labels of
    ``settings``): a change of image reference, mounts, devices, restart policy, shm
    size or extra arguments changes it, so the container is recreated."""
    plain = dict(settings)
    plain["labels"] = {}
    return hashlib.sha256("\0".join(run_argv(spec, plain)).encode()).hexdigest()


def reloadable(spec: Mapping[str, Any]) -> bool:
    """A process of the unit takes a reload signal (the front door's agent): a spec that
    differs only in what its launcher reloads is applied in place (pd_launcher reload)."""
    return any(p.get("reload_signal") for p in spec.get("processes", []))


def spec_sha256(spec: Mapping[str, Any]) -> str:
    """The container's pd.spec-sha256 label: the sha256 of the spec file the node gets
    (canonical JSON), or for a reloadable unit of the spec without what its launcher
    reloads in place (RELOADABLE_KEYS: files, proxy), so that a change of the front
    door's pools reloads the running container instead of recreating it."""
    from pd_deploy.record import spec_sha256 as canonical_sha256
    from pd_launcher.launcher.spec import RELOADABLE_KEYS

    if reloadable(spec):
        spec = {k: v for k, v in spec.items() if k not in RELOADABLE_KEYS}
    return canonical_sha256(spec)


def stop_timeout(spec: Mapping[str, Any]) -> int:
    return int(spec.get("grace_seconds", 30)) + STOP_MARGIN_S


# ------------------------------------------------------------------ CLI output

# `<cli> ps --format`: a Go template both CLIs understand. podman prints one JSON list,
# docker one JSON object per line. (The bare word `json` is a keyword only for podman
# and docker >= 23; docker 20.10 prints the word "json" once per container.)
PS_FORMAT = "{{json .}}"


def ps_argv(cli: Any, filters: Any = None) -> list[str]:
    """``<cli> [cli_args] ps --all --format '{{json .}}' [filters]``: every container,
    running or not, in the JSON ``parse_ps`` reads. cli: the CLI and its global
    arguments as a list; filters: e.g. ``label_filters(spec)``."""
    return [*_str_list(cli, "cli"), "ps", "--all", "--format", PS_FORMAT,
            *_str_list(filters, "filters")]



def image_id(value: Any) -> str:
    """An image ID without the ``sha256:`` prefix docker shows ("" for none)."""
    text = str(value or "").strip()
    return text.split(":", 1)[1] if text.startswith("sha256:") else text


def _json_docs(text: Any) -> list[Any]:
    if isinstance(text, list):
        return text
    text = (text or "").strip()
    if not text:
        return []
    if text.startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _labels(value: Any) -> dict[str, str]:
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()}
    if isinstance(value, str):  # docker ps: "a=b,c=d"
        return dict(kv.split("=", 1) for kv in value.split(",") if "=" in kv)
    return {}


_EXITED = re.compile(r"^Exited \((-?\d+)\)")


def _exit_code(c: Mapping[str, Any]) -> int | None:
    """podman: ExitCode; docker ps has none, its Status says "Exited (137) 2 minutes ago"."""
    if isinstance(c.get("ExitCode"), int):
        return c["ExitCode"]
    m = _EXITED.match(str(c.get("Status") or ""))
    return int(m.group(1)) if m else None


def parse_ps(text: Any) -> list[dict[str, Any]]:
    """``ps_argv`` output: podman prints one JSON list, docker one object per line.
    Returns [{id, name, image, image_id, labels, state, status, started_at,
    exit_code}] (started_at: epoch seconds or None; docker's ps has no start time
    and no image ID; its labels are one "k=v,k=v" string)."""
    out = []
    for c in _json_docs(text):
        names = c.get("Names")
        name = names[0] if isinstance(names, list) and names else (names or "")
        started = c.get("StartedAt")
        out.append({
            "id": c.get("Id") or c.get("ID") or "",
            "name": str(name).split(",")[0].lstrip("/"),
            "image": c.get("Image") or "",
            "image_id": image_id(c.get("ImageID")),
            "labels": _labels(c.get("Labels")),
            "state": str(c.get("State") or "").lower(),
            "status": c.get("Status") or "",
            "started_at": started if isinstance(started, (int, float)) and started > 0 else None,
            "exit_code": _exit_code(c),
        })
    return out


def parse_inspect(text: Any) -> dict[str, Any] | None:
    """``<cli> container inspect NAME`` (both CLIs print a JSON list); None when absent."""
    try:
        docs = _json_docs(text)
    except ValueError:
        return None
    if not docs or not isinstance(docs[0], dict):
        return None
    c = docs[0]
    state = c.get("State") or {}
    config = c.get("Config") or {}
    return {
        "id": c.get("Id") or "",
        "name": str(c.get("Name") or "").lstrip("/"),
        "image_id": image_id(c.get("Image")),
        "image": c.get("ImageName") or config.get("Image") or "",
        "labels": _labels(config.get("Labels")),
        "state": str(state.get("Status") or "").lower(),
        "exit_code": state.get("ExitCode"),
    }


def decide(inspect_text: Any, wanted: Mapping[str, Any]) -> dict[str, Any]:
    """What to do with a unit's container.

    wanted: ``labels`` (identity + checksums), ``image_id`` ("" = do not compare).
    Returns {action, reason, state}: ``create`` (none), ``keep`` (running, same labels
    and image), ``recreate`` (not running, or spec/launcher/image changed) or
    ``foreign`` (a container of that name whose cluster/node/role/unit labels differ:
    pd-deploy did not start it and must not touch it).
    """
    c = parse_inspect(inspect_text)
    if c is None:
        return {"action": "create", "reason": "no container", "state": "absent"}
    want = {str(k): str(v) for k, v in (wanted.get("labels") or {}).items()}
    theirs = c["labels"]
    if any(theirs.get(k) != want.get(k) for k in IDENTITY_LABELS):
        shown = {k: theirs.get(k) for k in IDENTITY_LABELS if k in theirs or k in want}
        wanted_ids = {k: want.get(k) for k in IDENTITY_LABELS if k in theirs or k in want}
        return {"action": "foreign", "state": c["state"],
                "reason": f"container {c['name']} exists with labels {shown}, not "
                          f"{wanted_ids}"}
    if c["state"] != "running":
        return {"action": "recreate", "state": c["state"],
                "reason": f"container is {c['state'] or 'unknown'} (exit code {c['exit_code']})"}
    changed = [k for k in sorted(want) if k not in IDENTITY_LABELS and theirs.get(k) != want[k]]
    if changed:
        return {"action": "recreate", "state": c["state"],
                "reason": "changed: " + ", ".join(changed)}
    want_id = image_id(wanted.get("image_id"))
    if want_id and c["image_id"] != want_id:
        return {"action": "recreate", "state": c["state"],
                "reason": f"image changed: {c['image_id'][:12]} -> {want_id[:12]}"}
    return {"action": "keep", "reason": "running, up to date", "state": c["state"]}


# ------------------------------------------------------------------ image tarballs


def archive_info(path: str | os.PathLike) -> dict[str, Any]:
    """{id, tags} of a docker-archive (``docker save`` / ``podman save``), read from its
    ``manifest.json`` without loading it: the ID is the name of the config blob
    (``<hex>.json`` or ``blobs/sha256/<hex>``), which is what ``<cli> image inspect``
    reports after ``<cli> load`` in any store."""
    try:
        with tarfile.open(path) as tf:
            member = tf.extractfile("manifest.json")
            if member is None:
                raise KeyError("manifest.json")
            manifest = json.load(member)
    except KeyError:
        raise ContainerError(f"{path}: no manifest.json; pd_image_tarball must be a "
                             "docker-archive (docker save, podman save --format "
                             "docker-archive)") from None
    except (OSError, tarfile.TarError, ValueError) as exc:
        raise ContainerError(f"{path}: cannot read the image tarball: {exc}") from None
    if not isinstance(manifest, list) or not manifest or "Config" not in manifest[0]:
        raise ContainerError(f"{path}: manifest.json lists no image")
    if len(manifest) > 1:
        raise ContainerError(f"{path}: holds {len(manifest)} images; give one image per "
                             "tarball")
    config = str(manifest[0]["Config"]).rsplit("/", 1)[-1]
    if config.endswith(".json"):
        config = config[: -len(".json")]
    return {"id": config, "tags": list(manifest[0].get("RepoTags") or [])}


def fanout(needs: Mapping[str, Any], width: int = 4) -> dict[str, Any]:
    """Plan the transfer of image tarballs to the nodes that need them.

    needs: host -> tarball (controller path), in inventory order; hosts with an empty
    value need nothing. Per tarball the first host is the seed: the only one the
    controller copies to. Then, round by round, every host that holds the tarball
    serves it to at most ``width`` hosts that do not (0 = no limit: everyone fetches
    from the seed in one round), spread evenly over the holders. So 63 nodes are
    covered in 3 rounds with width 4 (1 -> 5 -> 25 -> 125).

    Returns {"seeds": {host: tarball}, "rounds": [{fetcher: holder}, ...],
    "summary": [human-readable lines]}.
    """
    width = int(width or 0)
    if width < 0:
        raise ContainerError(f"fan-out width must be >= 0, got {width}")
    groups: dict[str, list[str]] = {}
    for host, tarball in needs.items():
        if tarball:
            groups.setdefault(str(tarball), []).append(host)
    seeds: dict[str, str] = {}
    rounds: list[dict[str, str]] = []
    for tarball, hosts in groups.items():
        seeds[hosts[0]] = tarball
        holders, pending = [hosts[0]], list(hosts[1:])
        r = 0
        while pending:
            assign: dict[str, str] = {}
            slots = width if width else len(pending)
            for _ in range(slots):
                for holder in holders:
                    if pending:
                        assign[pending.pop(0)] = holder
            if len(rounds) <= r:
                rounds.append({})
            rounds[r].update(assign)
            holders += list(assign)
            r += 1
    summary = [f"{host}: {os.path.basename(tar)} copied from the controller"
               for host, tar in seeds.items()]
    for i, assign in enumerate(rounds, 1):
        by_holder: dict[str, list[str]] = {}
        for fetcher, holder in assign.items():
            by_holder.setdefault(holder, []).append(fetcher)
        summary.append(f"round {i}: " + "; ".join(
            f"{holder} -> {', '.join(fetchers)}" for holder, fetchers in by_holder.items()))
    if not seeds:
        summary.append("every node already has its image")
    return {"seeds": seeds, "rounds": rounds, "summary": summary}
