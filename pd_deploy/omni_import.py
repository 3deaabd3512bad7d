"""`pd-deploy import omni-infer OMNI_INVENTORY -o DIR`: an Omni-Infer Ansible inventory
(groups P, D, C) -> a pd-deploy inventory directory for vLLM-Ascend (`inventory.yml`,
`group_vars/all.yml`, and `group_vars/P.yml` / `D.yml` when needed).

Omni-Infer's own files were read for facts only (field names, meanings, defaults); no text
of theirs is copied here or in the test fixtures.

* The legacy one-file layout, `tools/ansible/template/` (played by one big playbook):
  omni-ai-npu/omni-infer at c8bc2bbbaa10 (2025-08-01 snapshot):
  `template/omni_infer_inventory_used_for_{2P1D,4P1D}.yml`, `template/README.md` (field
  meanings), `template/omni_infer_server_template.yml`, `omni_infer_inventory_used_for_CI.yml`;
  later versions: `template/omni_infer_inventory_used_for_4P1D_a3_1machine2p.yml` @06cb9b4de161
  (P subgroups PA/PB, two P instances per machine), `..._1P1D_qwen3_next.yml` @40ef67d07a8d,
  `omni_infer_inventory_a5.yml` @5aadb26b3492 (etcd/mooncake ports in all.vars),
  `omni_infer_server_template_a3_ds.yml` @67e891f218fb (MODEL_PATH,
  DECODE_TENSOR_PARALLEL_SIZE, MODEL_LEN_MAX_*); zhengjinhuan/omni-infer
  `tools/ansible/template/omni_infer_inventory_used_for_1P32_1D32.yml` @1d5aa66706d0 (the
  guide's file).
* The newer role-based layout, `tools/deploy/ansible/` (roles `common` and `elastic_server`
  with the add_node / add_node_with_sync_code / delete_node / reload_proxy lifecycles):
  `DEVELOPMENT_GUIDE.md` @19b04efa21bb (inventory contract: top-level P/D/C, optional
  `P<n>`/`D<n>` subgroups, C may carry host_ip; play `vars.model_path`, profiles),
  `roles/common/tasks/set_topology.yml` @9d8518e43d58 (instances = unique host_ip, masters =
  ansible_host == host_ip), `roles/common/templates/run_vllm_prefill.sh.j2` @4c0b57a07c9b
  (prefill TP = devices per node x nodes, over ray), `run_vllm_decode.sh.j2` @19b04efa21bb
  (one decode server per device from api_port), `run_proxy.sh.j2` @0c512448d4e9,
  `roles/elastic_server/README.md` @32739ad018d2, `examples/inventory_1p1d.yml` and
  `examples/omni_infer_server_template_example.yml` (@4c0b57a07c9b, @19b04efa21bb),
  `inventories/omni_infer_inventory_used_for_{2P1D @6b4b919db7e6, 2P16_1D32 @e32274439c54,
  1P1D_single_node and 4P8_1D32 @4e0615b6936a}.yml`, `inventories/epd/..._EPD.yml`
  @24c28d9a2e0c (an E group: refused), the elastic `..._inventory_2p1d.yml` @7172ac4c5c49.
  Its inventories carry the same host fields as the legacy ones; the differences are the
  subgroups, a templated ansible_host (`single_node_ip`) and host_ip on C. Both are read.

What is kept (anything else is listed as not carried over, with the reason):

  groups P, D (and subgroups), C     -> groups P, D, C (flat)
  ansible_host                       -> ansible_host
  host_ip (P, D)                     -> host_ip (the same meaning: the instance master's IP)
  ascend_rt_visible_devices (P, D)   -> devices ("0,1,...", as Omni-Infer writes it)
  kv_rank, node_rank                 -> checked (one kv_rank per P instance, distinct
                                        node_ranks, master 0); node_rank orders the hosts of
                                        an instance, so DP start ranks follow it
  api_port of an instance master     -> pd_api_port (P.yml / D.yml, or per host when the
                                        instances differ)
  node_port of an instance master    -> pd_dp_rpc_port (MASTER_PORT: the rendezvous port the
                                        master binds)
  node_port of a C host              -> pd_proxy_port; C runs on the P (else D) host that has
                                        its ansible_host, as the guide puts C on p0
  devices per P node                 -> pd_tp of P (Omni-Infer's per-node
                                        PREFILL_TENSOR_PARALLEL_SIZE)
  ansible_* connection variables     -> kept as they are
  model_path (inventory), playbook MODEL_PATH / vars.model_path, --model-path -> pd_model_path
  playbook DECODE_TENSOR_PARALLEL_SIZE / decode profile --tp N -> pd_tp of D (default 1)
  playbook MODEL_LEN_MAX_* / profile --max-model-len N -> pd_extra_args: [--max-model-len, N]

Templated values (`"{{ base_api_port + port_offset.D + node_rank }}"`) are evaluated as
Ansible would, in a sandbox, per host; the variables they use count as used. Nothing is
written unless the whole input is understood and the written inventory loads through
Ansible and plans with pd_deploy.topology.build_plan.
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import re
import secrets
import shutil
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import yaml
from jinja2 import StrictUndefined, meta
from jinja2.sandbox import SandboxedEnvironment

ROLES = ("P", "D", "C")
ENGINE = "vllm-ascend"
CLUSTER_NAME = "omni-infer"
GROUP_KEYS = ("hosts", "children", "vars")
OWNED_FILES = ("inventory.yml", "group_vars/all.yml", "group_vars/P.yml", "group_vars/D.yml")
_JINJA = SandboxedEnvironment(undefined=StrictUndefined)

# Omni-Infer fields that are not carried over, and why (host-level ones by role).
_ROLE_REASONS = {
    ("C", "host_ip"): "a C host is no engine instance; the proxy runs on the host itself",
    ("C", "ascend_rt_visible_devices"): "a C host runs no engine",
    ("D", "kv_rank"): "pd-deploy derives the KV roles and ranks of the decode",
}
_REASONS = {
    "role": "pd-deploy takes a host's role from its group (P, D or C)",
    "e_api_port": "EPD encoder port; pd-deploy runs no encoder stage",
    "ec_port": "EPD encoder port; pd-deploy runs no encoder stage",
    "etcd_port": "port of a service Omni-Infer runs; pd-deploy's vLLM-Ascend backend runs none",
    "mooncake_master_port": "Omni-Infer's Mooncake master (KV pool); pd-deploy runs none",
    "mooncake_metrics_port": "Omni-Infer's Mooncake master (KV pool); pd-deploy runs none",
    "npu_server_list": "older name of ascend_rt_visible_devices; not read",
    "global_port_base": "only an ingredient of node_port, which no host used",
    "base_api_port": "only an ingredient of api_port, which no host used",
    "proxy_port": "only an ingredient of a C host's node_port, which no host used",
    "port_offset": "only an ingredient of node_port/api_port, which no host used",
}
_UNKNOWN = "not an Omni-Infer topology field the importer knows; not carried over"
_PLAYBOOK_REASONS: tuple[tuple[Callable[[str], bool], str], ...] = (
    (lambda k: k.startswith("DOCKER_"), "Omni-Infer's container; for containers set "
     "pd_runtime: container and pd_image (a vLLM-Ascend image)"),
    (lambda k: k.endswith("_PATH") or k.endswith("_save_path") or k == "container_workspace",
     "Omni-Infer's own paths; pd-deploy keeps state and logs under pd_base_dir"),
    (lambda k: k.endswith("_profile"), "Omni-Infer role profile (runner, scripts, args); "
     "engine flags go to pd_extra_args, environment to pd_env"),
    (lambda k: "cmd" in k, "an Omni-Infer shell step; pd-deploy plans its own processes"),
    (lambda k: k.endswith("_LB_SDK") or k == "USE_OMNI_PROXY", "Omni-Infer's proxy; pd-deploy's "
     "front door is nginx (pd_proxy_* variables)"),
    (lambda k: "CONNECTOR" in k.upper(), "pd-deploy picks the KV connector (pd_connector, "
     "default MooncakeConnectorV1 for vllm-ascend)"),
)


@dataclass(frozen=True)
class Finding:
    """An error or a field not carried over: where (host, group, "all", "playbook" or a
    path), the Omni-Infer field, and what happened."""

    where: str
    field: str
    text: str

    def __str__(self) -> str:
        return f"{self.where}: {self.field}: {self.text}"


class ImportRefused(Exception):
    """Every error found in the input; nothing was written."""

    def __init__(self, errors: list[Finding]) -> None:
        self.errors = errors
        super().__init__("\n".join(str(e) for e in errors))


# ---------------------------------------------------------------- templated variables


def _is_template(value: Any) -> bool:
    return isinstance(value, str) and ("{{" in value or "{%" in value)


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def _render(value: Any, ctx: dict[str, Any]) -> Any:
    if _is_template(value):
        return _JINJA.from_string(value).render(ctx)
    if isinstance(value, dict):
        return {k: _render(v, ctx) for k, v in value.items()}
    if isinstance(value, list):
        return [_render(v, ctx) for v in value]
    return value


class Scope:
    """The variables one host sees (all.vars < group vars < host vars, as Ansible merges
    them), rendered on demand; `used` collects every variable a rendered field needed."""

    def __init__(self, where: str, raw: dict[str, Any], errors: list[Finding]) -> None:
        self.where = where
        self.raw = raw
        self.errors = errors
        self.used: set[str] = set()
        self._done: dict[str, Any] = {}
        self._failed: set[str] = set()

    def has(self, key: str) -> bool:
        return key in self.raw

    def get(self, key: str) -> Any:
        """The rendered value; None when unset or when it cannot be evaluated (an error)."""
        return self._resolve(key, ())

    def get_lenient(self, key: str) -> Any:
        """Rendered when possible, else the raw text (Ansible renders it at run time)."""
        mark = len(self.errors)
        value = self._resolve(key, ())
        if len(self.errors) > mark:
            del self.errors[mark:]
            self._failed.discard(key)
            return self.raw.get(key)
        return value

    def _resolve(self, key: str, stack: tuple[str, ...]) -> Any:
        if key not in self.raw:
            return None
        self.used.add(key)
        if key in self._done:
            return self._done[key]
        if key in self._failed:
            return None
        if key in stack:
            return self.fail(stack[0], f"refers to itself through {' -> '.join(stack + (key,))}")
        value = self.raw[key]
        ctx: dict[str, Any] = {}
        try:
            for text in filter(_is_template, _strings(value)):
                for dep in meta.find_undeclared_variables(_JINJA.parse(text)):
                    if dep in self.raw:
                        ctx[dep] = self._resolve(dep, stack + (key,))
                        if dep in self._failed:
                            self._failed.add(key)
                            return None
            rendered = _render(value, ctx)
        except Exception as exc:  # any template or arithmetic error is an input error
            return self.fail(key, f"cannot evaluate {value!r}: {exc}")
        self._done[key] = rendered
        return rendered

    def fail(self, key: str, message: str) -> None:
        if key not in self._failed:
            self._failed.add(key)
            self.errors.append(Finding(self.where, key, message))
        return None

    def integer(self, key: str, low: int, high: int) -> int | None:
        value = self.get(key)
        if value is None:
            return None
        text = str(value).strip()
        if isinstance(value, bool) or not re.fullmatch(r"\d+", text):
            self.fail(key, f"{value!r} is not a non-negative integer")
            return None
        number = int(text)
        if not low <= number <= high:
            self.fail(key, f"{number} is outside {low}..{high}")
            return None
        return number

    def port(self, key: str) -> int | None:
        return self.integer(key, 1, 65535)

    def ip(self, key: str, missing: str) -> str | None:
        value = self.get(key)
        if value is None or value == "":
            if key not in self._failed:
                self.fail(key, missing)
            return None
        try:
            return str(ipaddress.ip_address(str(value).strip()))
        except ValueError:
            self.fail(key, f"{value!r} is not an IP address")
            return None


# ---------------------------------------------------------------- reading the inventory


@dataclass
class RawHost:
    """One host as listed: its role, the subgroup below P/D/C it is in (if any) and the
    layers of variables it sees, from all.vars to its own (origin name, vars)."""

    name: str
    role: str
    subgroup: str | None
    layers: list[tuple[str, dict[str, Any]]]
    index: int


@dataclass
class Host:
    name: str
    role: str
    subgroup: str | None
    index: int
    scope: Scope
    origin: dict[str, str]
    ip: str | None = None
    master_ip: str | None = None
    devices: list[str] | None = None
    node_rank: int | None = None
    kv_rank: int | None = None
    api_port: int | None = None
    node_port: int | None = None
    conn: dict[str, Any] = field(default_factory=dict)  # its own ansible_* variables


@dataclass
class Instance:
    role: str
    master: Host
    members: list[Host]


def _load_yaml(path: str, errors: list[Finding]) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except (OSError, UnicodeDecodeError) as exc:
        errors.append(Finding(path, "file", f"cannot read it: {exc}"))
        return None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        errors.append(Finding(path, "yaml", f"not valid YAML: {' '.join(str(exc).split())}"))
        return None


def _mapping(value: Any, where: str, key: str, errors: list[Finding]) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        errors.append(Finding(where, key, f"must be a mapping, got {type(value).__name__}"))
        return {}
    return {str(k): v for k, v in value.items()}


def parse_groups(doc: Any, errors: list[Finding]) -> tuple[dict[str, Any], list[RawHost]]:
    """all.vars and every host of groups P, D and C (with their subgroups), in order."""
    if not isinstance(doc, dict):
        errors.append(Finding("all", "all", "not an Ansible YAML inventory (a mapping "
                              "all: {vars, children: {P, D, C}})"))
        return {}, []
    top = {str(k): v for k, v in doc.items()}
    root = _mapping(top.pop("all", None), "all", "all", errors)
    for key in root:
        if key not in GROUP_KEYS:
            errors.append(Finding("all", key, "unknown key (a group has hosts, children, vars)"))
    all_vars = _mapping(root.get("vars"), "all", "vars", errors)
    if root.get("hosts"):
        errors.append(Finding("all", "hosts", "hosts directly under all are in no P/D/C group"))
    children = _mapping(root.get("children"), "all", "children", errors)
    children.update(top)  # groups may also sit at the top level of the file
    for name in children:
        if name not in ROLES:
            what = " (an EPD encoder group)" if name == "E" else ""
            errors.append(Finding("all", f"children.{name}", f"group {name}{what} has no "
                                  "pd-deploy counterpart; pd-deploy knows P, D and C"))
    hosts: list[RawHost] = []
    for role in ROLES:
        before = len(hosts)
        if role in children:
            _walk(role, role, None, children[role], [("all", all_vars)], hosts, errors)
        if len(hosts) == before:
            errors.append(Finding("all", f"children.{role}", f"group {role} is missing or has "
                                  "no hosts (Omni-Infer's inventory has groups P, D and C)"))
    return all_vars, _merge_duplicates(hosts, errors)


def _walk(role: str, name: str, subgroup: str | None, node: Any,
          layers: list[tuple[str, dict[str, Any]]], out: list[RawHost],
          errors: list[Finding]) -> None:
    group = _mapping(node, name, "group", errors)
    for key in group:
        if key not in GROUP_KEYS:
            errors.append(Finding(name, key, "unknown key (a group has hosts, children, vars)"))
    group_vars = _mapping(group.get("vars"), name, "vars", errors)
    if group_vars:
        layers = layers + [(name, group_vars)]
    for host, host_vars in _mapping(group.get("hosts"), name, "hosts", errors).items():
        own = _mapping(host_vars, host, "host", errors)
        out.append(RawHost(host, role, subgroup, layers + [(host, own)], len(out)))
    for child, child_node in _mapping(group.get("children"), name, "children", errors).items():
        _walk(role, child, subgroup or child, child_node, layers, out, errors)


def _merge_duplicates(hosts: list[RawHost], errors: list[Finding]) -> list[RawHost]:
    """A host listed in P or D and also in C is one host with both units (Ansible merges
    its variables); any other repetition is an error."""
    engine: dict[str, RawHost] = {}
    out: list[RawHost] = []
    for h in hosts:
        seen = engine.get(h.name)
        if h.role in ("P", "D"):
            if seen is not None:
                where = "both P and D" if seen.role != h.role else f"{h.role} twice"
                errors.append(Finding(h.name, "groups", f"listed in {where}"))
                continue
            engine[h.name] = h
        elif seen is not None:
            merged = dict(seen.layers[-1][1])
            merged.update(h.layers[-1][1])
            h = RawHost(h.name, "C", h.subgroup, h.layers[:-1] + [(h.name, merged)], h.index)
        elif any(o.name == h.name and o.role == "C" for o in out):
            errors.append(Finding(h.name, "groups", "listed in C twice"))
            continue
        out.append(h)
    return out


def _scope_of(raw: RawHost, errors: list[Finding]) -> tuple[Scope, dict[str, str]]:
    merged: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for where, layer in raw.layers:
        for key, value in layer.items():
            merged[key] = value
            origin[key] = where
    return Scope(raw.name, merged, errors), origin


def _devices(scope: Scope) -> list[str] | None:
    key = "ascend_rt_visible_devices"
    value = scope.get(key)
    if value is None or value == "":
        scope.fail(key, "missing (Omni-Infer requires it on P and D hosts)")
        return None
    items = [str(value)] if isinstance(value, int) else str(value).split(",")
    out: list[str] = []
    for item in items:
        text = item.strip()
        if isinstance(value, bool) or not re.fullmatch(r"\d+", text):
            scope.fail(key, f"{value!r}: malformed device id {text!r} (expected \"0,1,2\")")
            return None
        if str(int(text)) in out:
            scope.fail(key, f"{value!r}: device {int(text)} listed twice")
            return None
        out.append(str(int(text)))
    return out


def resolve_host(raw: RawHost, errors: list[Finding]) -> Host:
    scope, origin = _scope_of(raw, errors)
    host = Host(raw.name, raw.role, raw.subgroup, raw.index, scope, origin)
    host.ip = scope.ip("ansible_host", "missing (the host's IP; Omni-Infer requires it on "
                       "every host)")
    if raw.role in ("P", "D"):
        host.master_ip = scope.ip("host_ip", "missing (the IP of the instance master; "
                                  "Omni-Infer requires it on P and D hosts)")
        host.devices = _devices(scope)
        host.node_rank = scope.integer("node_rank", 0, 1 << 20)
        if raw.role == "P":
            host.kv_rank = scope.integer("kv_rank", 0, 1 << 20)
        host.api_port = scope.port("api_port")
    host.node_port = scope.port("node_port")
    for key in sorted(scope.raw):
        if key.startswith("ansible_") and key != "ansible_host":
            value = scope.get_lenient(key)
            if origin[key] != "all":
                host.conn[key] = value
    return host


# ---------------------------------------------------------------- instances


def group_instances(role: str, hosts: list[Host], errors: list[Finding]) -> list[Instance]:
    """Omni-Infer's instances (pods): hosts of a role sharing host_ip; the master is the
    host whose ansible_host is that IP. In instance order of first appearance."""
    valid = [h for h in hosts if h.role == role and h.ip and h.master_ip]
    masters: dict[str, list[Host]] = {}
    for h in valid:
        if h.ip == h.master_ip:
            masters.setdefault(h.ip, []).append(h)
    found: dict[str, Instance] = {}
    for h in valid:
        master = h if h.ip == h.master_ip else _master_of(h, role, valid, masters, errors)
        if master is None:
            continue
        inst = found.setdefault(master.name, Instance(role, master, []))
        inst.members.append(h)
    instances = list(found.values())
    for inst in instances:
        _check_instance(inst, errors)
    if role == "P":
        _check_kv_ranks(instances, errors)
    return instances


def _master_of(h: Host, role: str, valid: list[Host], masters: dict[str, list[Host]],
               errors: list[Finding]) -> Host | None:
    candidates = masters.get(h.master_ip or "", [])
    if len(candidates) == 1:
        return candidates[0]
    if len(candidates) > 1:
        names = ", ".join(c.name for c in candidates)
        errors.append(Finding(h.name, "host_ip", f"{h.master_ip} is the IP of several {role} "
                              f"instance masters ({names}); pd-deploy needs the master of a "
                              "multi-node instance on a machine of its own"))
        return None
    other = next((o for o in valid if o.ip == h.master_ip), None)
    if other is not None:
        errors.append(Finding(h.name, "host_ip", f"{h.master_ip} is {other.name}'s IP, but "
                              f"{other.name} is no instance master (its host_ip is "
                              f"{other.master_ip})"))
    else:
        errors.append(Finding(h.name, "host_ip", f"{h.master_ip} is not the ansible_host of "
                              f"any {role} host (host_ip names the instance master)"))
    return None


def _check_instance(inst: Instance, errors: list[Finding]) -> None:
    master = inst.master
    if master.node_rank not in (None, 0):
        errors.append(Finding(master.name, "node_rank", f"{master.node_rank}: the instance "
                              "master (ansible_host == host_ip) must have node_rank 0"))
    ranks: dict[int, str] = {}
    for h in inst.members:
        if h.node_rank is not None:
            if h.node_rank in ranks:
                errors.append(Finding(h.name, "node_rank", f"{h.node_rank} is also "
                                      f"{ranks[h.node_rank]}'s in the instance of {master.name}"))
            ranks.setdefault(h.node_rank, h.name)
        if h is master:
            continue
        if h.subgroup != master.subgroup:
            errors.append(Finding(h.name, "host_ip", f"puts it (group {h.subgroup or h.role}) "
                                  f"into the instance of {master.name} (group "
                                  f"{master.subgroup or master.role}); an instance lies in one "
                                  "group"))
        if inst.role == "P" and h.kv_rank != master.kv_rank:
            errors.append(Finding(h.name, "kv_rank", f"{h.kv_rank} differs from "
                                  f"{master.kv_rank} of its instance master {master.name}"))
        if inst.role == "P" and h.devices and master.devices and \
                len(h.devices) != len(master.devices):
            errors.append(Finding(h.name, "ascend_rt_visible_devices", f"{len(h.devices)} "
                                  f"devices, but its instance master {master.name} has "
                                  f"{len(master.devices)}; a multi-node prefill needs equal "
                                  "nodes"))
    inst.members.sort(key=lambda h: (h is not master, h.node_rank is None, h.node_rank or 0,
                                     h.index))


def _check_kv_ranks(instances: list[Instance], errors: list[Finding]) -> None:
    owner: dict[int, str] = {}
    for inst in instances:
        rank = inst.master.kv_rank
        if rank is None:
            continue
        if rank in owner:
            errors.append(Finding(inst.master.name, "kv_rank", f"{rank} is also the kv_rank of "
                                  f"the instance of {owner[rank]}; each P instance has its own"))
        owner.setdefault(rank, inst.master.name)


def proxy_targets(c_hosts: list[Host], engine: list[Host], errors: list[Finding]
                  ) -> list[tuple[Host, str]]:
    """(C host, the host that runs its proxy): the P (else D) host on the same machine,
    as the guides put C on p0, else the C host itself."""
    out: list[tuple[Host, str]] = []
    taken: dict[str, str] = {}
    names = {h.name for h in engine}
    for c in c_hosts:
        if c.ip is None:
            continue
        if c.name in names:
            target = c.name
        else:
            same = [h for h in engine if h.ip == c.ip]
            same.sort(key=lambda h: h.role != "P")
            target = same[0].name if same else c.name
        if target in taken:
            errors.append(Finding(c.name, "ansible_host", f"{c.ip}: {taken[target]} already runs "
                                  f"the proxy on {target}; pd-deploy runs one proxy per host"))
            continue
        taken[target] = c.name
        out.append((c, target))
    return out


# ---------------------------------------------------------------- the playbook (optional)


@dataclass
class PlaybookFacts:
    model_path: str | None = None
    decode_tp: int | None = None
    max_model_len: dict[str, int] = field(default_factory=dict)  # role -> --max-model-len
    dropped: list[Finding] = field(default_factory=list)


_TP = re.compile(r"(?:^|\s)--tp(?:\s+|=)(\S+)")
_MAX_LEN = re.compile(r"(?:^|\s)--max-model-len(?:\s+|=)(\S+)")


def read_playbook(path: str, errors: list[Finding]) -> PlaybookFacts:
    """MODEL_PATH / model_path, the decode TP and --max-model-len of an Omni-Infer playbook
    (legacy: play environment; role-based: play vars and run_server_*_profile.args)."""
    facts = PlaybookFacts()
    doc = _load_yaml(path, errors)
    if doc is None:
        return facts
    if not isinstance(doc, list) or not all(isinstance(p, dict) for p in doc):
        errors.append(Finding(path, "yaml", "not an Ansible playbook (a list of plays)"))
        return facts
    for play in doc:
        env = _mapping(play.get("environment"), "playbook", "environment", errors)
        pvars = _mapping(play.get("vars"), "playbook", "vars", errors)
        scope = Scope("playbook", {**pvars, **env}, errors)
        _play_facts(scope, env, pvars, facts, errors)
        for section, keys in (("environment", env), ("vars", pvars)):
            for key in keys:
                if key not in _PLAYBOOK_USED:
                    facts.dropped.append(Finding("playbook", f"{section}.{key}",
                                                 _playbook_reason(key)))
    return facts


_PLAYBOOK_USED = ("MODEL_PATH", "model_path", "DECODE_TENSOR_PARALLEL_SIZE",
                  "MODEL_LEN_MAX_PREFILL", "MODEL_LEN_MAX_DECODE")


def _playbook_reason(key: str) -> str:
    if key in ("run_server_prefill_profile", "run_server_decode_profile"):
        return ("Omni-Infer role profile; only --max-model-len (and the decode's --tp) were "
                "read from its args; other engine flags go to pd_extra_args, environment to "
                "pd_env")
    for match, reason in _PLAYBOOK_REASONS:
        if match(key):
            return reason
    return "Omni-Infer playbook setting; not carried over"


def _play_facts(scope: Scope, env: dict[str, Any], pvars: dict[str, Any],
                facts: PlaybookFacts, errors: list[Finding]) -> None:
    for key in ("MODEL_PATH", "model_path"):
        if scope.has(key):
            _agree(facts, "model_path", _text(scope, key), key, errors)
    if "DECODE_TENSOR_PARALLEL_SIZE" in env:
        _agree(facts, "decode_tp", scope.integer("DECODE_TENSOR_PARALLEL_SIZE", 1, 1024),
               "environment.DECODE_TENSOR_PARALLEL_SIZE", errors)
    for role, key in (("P", "MODEL_LEN_MAX_PREFILL"), ("D", "MODEL_LEN_MAX_DECODE")):
        if key in env:
            value = scope.integer(key, 1, 1 << 30)
            if value is not None:
                facts.max_model_len[role] = value
    for role, key in (("P", "run_server_prefill_profile"), ("D", "run_server_decode_profile")):
        profile = pvars.get(key)
        args = profile.get("args") if isinstance(profile, dict) else None
        if not isinstance(args, list):
            continue
        line = " ".join(str(a) for a in args)
        where = f"vars.{key}.args"
        for flag, pattern in (("--max-model-len", _MAX_LEN), ("--tp", _TP)):
            m = pattern.search(line)
            if m is None or (flag == "--tp" and role == "P"):
                continue
            if not m.group(1).isdigit():
                errors.append(Finding("playbook", where, f"{flag} {m.group(1)!r} is not an "
                                      "integer"))
            elif flag == "--tp":
                _agree(facts, "decode_tp", int(m.group(1)), where, errors)
            else:
                facts.max_model_len[role] = int(m.group(1))


def _text(scope: Scope, key: str) -> str | None:
    value = scope.get(key)
    if value is not None and not isinstance(value, str):
        scope.fail(key, f"must be a path, got {value!r}")
        return None
    return value or None


def _agree(facts: PlaybookFacts, attr: str, value: Any, where: str,
           errors: list[Finding]) -> None:
    if value is None:
        return
    old = getattr(facts, attr)
    if old is not None and old != value:
        errors.append(Finding("playbook", where, f"{value!r} disagrees with {old!r} set "
                              "elsewhere in the playbook"))
        return
    setattr(facts, attr, value)


# ---------------------------------------------------------------- the pd-deploy inventory


@dataclass
class Imported:
    """What the import produced: file texts, what was not carried over, notes."""

    files: dict[str, str]
    dropped: list[Finding]
    notes: list[str]


def _instance_vars(insts: list[Instance], tp_of: Callable[[Instance], int | None]
                   ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Instance settings: in group_vars when every instance agrees, else per host."""
    values = {
        "pd_tp": [tp_of(i) for i in insts],
        "pd_api_port": [i.master.api_port for i in insts],
        "pd_dp_rpc_port": [i.master.node_port for i in insts],
    }
    group: dict[str, Any] = {}
    per_host: dict[str, dict[str, Any]] = {}
    for name, vals in values.items():
        if None not in vals and len(set(vals)) == 1:
            if not (name == "pd_tp" and vals[0] == 1):
                group[name] = vals[0]
            continue
        for inst, value in zip(insts, vals):
            if value is None:
                continue
            for h in inst.members:
                per_host.setdefault(h.name, {})[name] = value
    return group, per_host


def _host_entry(h: Host, master: Host, extra: dict[str, Any]) -> dict[str, Any]:
    entry: dict[str, Any] = {"ansible_host": h.ip, "host_ip": master.ip,
                             "devices": ",".join(h.devices or [])}
    entry.update(h.conn)
    entry.update(extra)
    return entry


def _non_master_drops(inst: Instance) -> list[Finding]:
    """api_port / node_port of non-master nodes that differ from the master's: pd-deploy
    has one value per instance."""
    out: list[Finding] = []
    m = inst.master
    for h in inst.members[1:]:
        if h.api_port is not None and h.api_port != m.api_port:
            what = ("pd-deploy gives every node of the instance the API ports pd_api_port + j "
                    f"from {m.api_port} (its master {m.name}'s)")
            if inst.role == "P":
                what = (f"a non-master prefill node serves no API in Omni-Infer; {what}")
            out.append(Finding(h.name, "api_port", f"{h.api_port} not kept: {what}"))
        if h.node_port is not None and h.node_port != m.node_port:
            out.append(Finding(h.name, "node_port", f"{h.node_port} not kept: pd-deploy binds "
                               f"one rendezvous port (pd_dp_rpc_port {m.node_port}) on the "
                               f"instance master {m.name}"))
    return out


def _dropped_fields(hosts: list[Host], all_scope: Scope, all_vars: dict[str, Any]
                    ) -> list[Finding]:
    """Every Omni-Infer variable that no kept field used, once, where it is defined."""
    used: set[tuple[str, str]] = {("all", k) for k in all_scope.used}
    defined: list[tuple[str, str, str | None]] = [("all", k, None) for k in all_vars]
    for h in hosts:
        used |= {(h.origin[k], k) for k in h.scope.used}
        used |= {(h.origin[k], k) for k in h.scope.raw if k.startswith("ansible_")}
        for k, where in h.origin.items():
            item = (where, k, h.role if where == h.name else None)
            if item not in defined and (where, k, None) not in defined:
                defined.append(item)
    out = []
    for where, key, role in defined:
        if (where, key) in used or key.startswith("ansible_"):
            continue
        reason = _ROLE_REASONS.get((role or "", key)) or _REASONS.get(key, _UNKNOWN)
        out.append(Finding(where, key, reason))
    return out


def _default_notes(model: _Model) -> list[str]:
    """Ports Omni-Infer left unset: pd-deploy's defaults apply."""
    notes = []
    for inst in model.instances["P"] + model.instances["D"]:
        m = inst.master
        if m.api_port is None:
            notes.append(f"{m.name} has no api_port: its instance gets pd-deploy's default "
                         "pd_api_port (7100)")
        if m.node_port is None:
            notes.append(f"{m.name} has no node_port: its instance gets pd-deploy's default "
                         "pd_dp_rpc_port (12321)")
    if model.proxies and model.proxies[0][0].node_port is None:
        notes.append(f"{model.proxies[0][0].name} has no node_port: the proxy listens on "
                     "pd-deploy's default pd_proxy_port (7000)")
    return notes


def _notes(p_insts: list[Instance], decode_tp_from: str | None, model_path: str,
           playbook: str | None) -> list[str]:
    notes = []
    for inst in p_insts:
        n, per = len(inst.members), len(inst.master.devices or [])
        if n > 1:
            notes.append(f"prefill instance of {inst.master.name} ({n} nodes): Omni-Infer runs "
                         f"one TP{per * n} engine over them (ray); pd-deploy plans DP{n} x "
                         f"TP{per} (one vllm serve per DP rank; pd_tp never spans nodes)")
    if decode_tp_from is None:
        notes.append("decode pd_tp is 1, Omni-Infer's default DECODE_TENSOR_PARALLEL_SIZE "
                     "(it lives in the playbook: pass --playbook to read it)")
    notes.append("KV transfer: pd-deploy's default connector for vllm-ascend "
                 "(MooncakeConnectorV1, pd_connector) replaces Omni-Infer's "
                 "LLMDataDistConnector and its ranktables")
    notes.append(f"served model name: pd-deploy defaults to the basename of pd_model_path "
                 f"({os.path.basename(model_path.rstrip('/'))!r}); set pd_served_model_name "
                 "to the name your clients send")
    notes.append("runtime: pd-deploy's default pd_runtime is process; Omni-Infer ran docker "
                 "(set pd_runtime: container and pd_image to a vLLM-Ascend image)")
    if playbook is None:
        notes.append("engine flags (max-model-len, memory use, extra args) live in Omni-Infer's "
                     "playbook; add them to pd_extra_args in group_vars/P.yml and D.yml")
    return notes


def _yaml(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, width=1000)


def _header(source: str, playbook: str | None, what: str, dropped: list[Finding]) -> str:
    lines = [f"# {what}", f"# Imported from the Omni-Infer inventory {source}"]
    if playbook:
        lines.append(f"# and its playbook {playbook}")
    lines.append("# by `pd-deploy import omni-infer` (engine: vLLM-Ascend).")
    if dropped:
        lines.append("# Omni-Infer fields not carried over:")
        lines += [f"#   {d}" for d in dropped]
    return "\n".join(lines) + "\n---\n"


@dataclass
class _Model:
    all_vars: dict[str, Any]
    hosts: list[Host]
    instances: dict[str, list[Instance]]
    proxies: list[tuple[Host, str]]
    all_scope: Scope


def _read_inventory(path: str, errors: list[Finding]) -> _Model | None:
    doc = _load_yaml(path, errors)
    if doc is None:
        return None
    all_vars, raws = parse_groups(doc, errors)
    hosts = [resolve_host(r, errors) for r in raws]
    instances = {role: group_instances(role, hosts, errors) for role in ("P", "D")}
    engine = [h for h in hosts if h.role in ("P", "D")]
    proxies = proxy_targets([h for h in hosts if h.role == "C"], engine, errors)
    return _Model(all_vars, hosts, instances, proxies, Scope("all", all_vars, errors))


def build_files(model: _Model, source: str, playbook: str | None, facts: PlaybookFacts,
                model_path: str) -> Imported:
    p_insts, d_insts = model.instances["P"], model.instances["D"]
    decode_tp = facts.decode_tp or 1
    dropped = _dropped_fields(model.hosts, model.all_scope, model.all_vars)
    for inst in p_insts + d_insts:
        dropped += _non_master_drops(inst)
    dropped += _merged_proxy_drops(model)
    dropped += facts.dropped

    all_yml: dict[str, Any] = {"pd_cluster_name": CLUSTER_NAME, "pd_engine": ENGINE,
                               "pd_model_path": model_path}
    first_c = model.proxies[0][0] if model.proxies else None
    if first_c is not None and first_c.node_port is not None:
        all_yml["pd_proxy_port"] = first_c.node_port
    for key in sorted(model.all_vars):
        if key.startswith("ansible_"):
            all_yml[key] = model.all_scope.get_lenient(key)

    groups: dict[str, dict[str, Any]] = {"P": {}, "D": {}, "C": {}}
    group_vars: dict[str, dict[str, Any]] = {}
    for role, insts, tp_of in (("P", p_insts, lambda i: len(i.master.devices or [])),
                               ("D", d_insts, lambda i: decode_tp)):
        common, per_host = _instance_vars(insts, tp_of)
        if role in facts.max_model_len:
            common["pd_extra_args"] = ["--max-model-len", str(facts.max_model_len[role])]
        if common:
            group_vars[role] = common
        for inst in insts:
            for h in inst.members:
                groups[role][h.name] = _host_entry(h, inst.master, per_host.get(h.name, {}))
    for c, target in model.proxies:
        entry: dict[str, Any] | None = None
        if target == c.name and target not in groups["P"] and target not in groups["D"]:
            entry = {"ansible_host": c.ip, **c.conn}
        if first_c is not None and c.node_port not in (None, first_c.node_port):
            entry = dict(entry or {}, pd_proxy_port=c.node_port)
        groups["C"][target] = entry

    inventory = {"all": {"children": {g: {"hosts": hosts} for g, hosts in groups.items()}}}
    files = {
        "inventory.yml": _header(source, playbook, "pd-deploy inventory (groups P, D, C).",
                                 dropped) + _yaml(inventory),
        "group_vars/all.yml": _header(source, playbook, "Cluster-wide settings.", [])
        + _yaml(all_yml),
    }
    for role, data in group_vars.items():
        what = "Prefill instances." if role == "P" else "Decode instances."
        files[f"group_vars/{role}.yml"] = _header(source, playbook, what, []) + _yaml(data)
    notes = _default_notes(model)
    notes += _notes(p_insts, "playbook" if facts.decode_tp else None, model_path, playbook)
    return Imported(files, dropped, notes)


def _merged_proxy_drops(model: _Model) -> list[Finding]:
    """ansible_* variables of a C host that now runs on another host and differ there."""
    by_name = {h.name: h for h in model.hosts if h.role in ("P", "D")}
    out = []
    for c, target in model.proxies:
        host = by_name.get(target)
        if host is None or host.name == c.name:
            continue
        for key, value in c.conn.items():
            if host.conn.get(key) != value:
                out.append(Finding(c.name, key, f"its proxy runs on {target} (same machine), "
                                   f"whose own connection settings apply"))
    return out


# ---------------------------------------------------------------- writing


def _check_output(out: str, force: bool) -> list[Finding]:
    if not os.path.lexists(out):
        return []
    if not os.path.isdir(out):
        return [Finding(out, "-o", "exists and is not a directory")]
    if os.listdir(out) and not force:
        return [Finding(out, "-o", "exists and is not empty; pass --force to replace the "
                        "imported files in it")]
    return []


def _write_tree(root: str, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)


def _stage_dir(out: str) -> str:
    """A new directory next to `out` (same file system: the commit is a rename), made
    with the usual permissions (umask), unlike tempfile.mkdtemp's 0700."""
    target = os.path.abspath(out)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    while True:
        stage = f"{os.path.dirname(target)}/.{os.path.basename(target)}.import-" \
                f"{secrets.token_hex(4)}"
        try:
            os.mkdir(stage)
            return stage
        except FileExistsError:
            continue


def _verify(stage: str) -> tuple[list[Finding], Any]:
    """Load the staged inventory as ansible-playbook does and plan it."""
    from pd_deploy.inventory import load_inventory
    from pd_deploy.settings import PlanInvalid
    from pd_deploy.topology import build_plan

    try:
        groups, hostvars = load_inventory(os.path.join(stage, "inventory.yml"))
        return [], build_plan(groups, hostvars)
    except PlanInvalid as exc:
        return [Finding(e.host or "all", e.field, "pd-deploy's planner refuses the imported "
                        f"inventory: {e.message}") for e in exc.errors], None


def _commit(stage: str, out: str, files: dict[str, str]) -> list[str]:
    """Move the staged files into place (a rename when `out` is new). Returns notes: our
    files a re-import no longer needs (removed) and foreign files that still apply."""
    if not os.path.lexists(out):
        os.rename(stage, out)
        return []
    notes = []
    for rel in files:
        os.makedirs(os.path.dirname(os.path.join(out, rel)), exist_ok=True)
        os.replace(os.path.join(stage, rel), os.path.join(out, rel))
    for rel in OWNED_FILES:
        if rel not in files and os.path.exists(os.path.join(out, rel)):
            os.remove(os.path.join(out, rel))
            notes.append(f"removed the stale {rel}")
    for sub in ("group_vars", "host_vars"):
        folder = os.path.join(out, sub)
        names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
        for name in names:
            if f"{sub}/{name}" not in OWNED_FILES:
                notes.append(f"{sub}/{name} was already there and still applies")
    shutil.rmtree(stage, ignore_errors=True)
    return notes


def import_omni(inventory: str, out: str, *, playbook: str | None = None,
                model_path: str | None = None, force: bool = False) -> tuple[Imported, Any]:
    """Import an Omni-Infer inventory into the directory `out`; returns what was written
    and the plan of it. Raises ImportRefused with every error; then nothing is written."""
    errors = _check_output(out, force)
    model = _read_inventory(inventory, errors)
    facts = read_playbook(playbook, errors) if playbook else PlaybookFacts()
    inv_model = None
    if model is not None and model.all_scope.has("model_path"):
        inv_model = model.all_scope.get("model_path")
    chosen = model_path or facts.model_path or inv_model
    if not chosen and model is not None:
        errors.append(Finding("all", "model_path", "no model path: Omni-Infer keeps it in its "
                              "playbook (environment.MODEL_PATH or vars.model_path); pass "
                              "--playbook or --model-path"))
    if errors or model is None:
        raise ImportRefused(errors)
    source = os.path.abspath(inventory)
    result = build_files(model, source, os.path.abspath(playbook) if playbook else None,
                         facts, str(chosen))
    for other, where in ((facts.model_path, "the playbook's"), (inv_model, "the inventory's")):
        if other and other != chosen:
            result.notes.append(f"pd_model_path is {chosen}, not {where} {other}")
    stage = _stage_dir(out)
    try:
        _write_tree(stage, result.files)
        problems, plan = _verify(stage)
        if problems:
            raise ImportRefused(problems)
        result.notes += _commit(stage, out, result.files)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return result, plan


# ---------------------------------------------------------------- CLI


def _summary(plan: Any) -> list[str]:
    lines = []
    for inst in plan.instances:
        lines.append(f"  {inst.name}: master {inst.master} ({inst.master_ip}), hosts "
                     f"{', '.join(inst.hosts)}: DP{inst.dp_size} x TP{inst.tp}")
    for proxy in plan.proxies:
        lines.append(f"  proxy on {proxy.host}: {proxy.listen}")
    return lines


def import_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="pd-deploy import",
        description="Turn another tool's inventory into a pd-deploy inventory directory.")
    parser.add_argument("source", choices=("omni-infer",), help="where the inventory comes from")
    parser.add_argument("inventory", metavar="OMNI_INVENTORY",
                        help="Omni-Infer's Ansible inventory (groups P, D, C)")
    parser.add_argument("-o", "--output", required=True, metavar="DIR",
                        help="directory to write (inventory.yml, group_vars/)")
    parser.add_argument("--playbook", metavar="OMNI_PLAYBOOK",
                        help="Omni-Infer's playbook: read the model path, the decode TP and "
                        "--max-model-len from it")
    parser.add_argument("--model-path", help="pd_model_path (overrides the playbook's)")
    parser.add_argument("--force", action="store_true",
                        help="replace the imported files in an existing, non-empty DIR")
    args = parser.parse_args(argv)
    try:
        result, plan = import_omni(args.inventory, args.output, playbook=args.playbook,
                                   model_path=args.model_path, force=args.force)
    except ImportRefused as exc:
        sys.stderr.write(f"import: {len(exc.errors)} error(s) in {args.inventory}"
                         f"{' / ' + args.playbook if args.playbook else ''}; nothing "
                         "written:\n")
        for err in exc.errors:
            sys.stderr.write(f"  - {err}\n")
        return 1
    out = [f"imported {args.inventory} into {args.output}/ (vLLM-Ascend): "
           f"{', '.join(result.files)}"]
    out += _summary(plan)
    out.append(f"Omni-Infer fields not carried over ({len(result.dropped)}):")
    out += [f"  {d}" for d in result.dropped] or ["  (none)"]
    out.append("notes:")
    out += [f"  - {n}" for n in result.notes]
    out.append(f"review the plan: pd-deploy plan -i {os.path.join(args.output, 'inventory.yml')}")
    print("\n".join(out))
    return 0
