#!/usr/bin/env bash
# Install the REAL `vllm serve` argument parser on a CPU-only machine, in a venv of its
# own, for tests/conformance. Two pairs, one requirements file each:
#
#   .ci/install-vllm.sh [VENV_DIR [REQUIREMENTS]]
#   .ci/install-vllm.sh                      # vLLM 0.33.0 (NVIDIA/NIXL flavour):
#                                            #   <repo>/.venv-vllm, .ci/requirements-vllm.txt
#   .ci/install-vllm.sh .venv-vllm-ascend .ci/requirements-vllm-ascend.txt
#                                            # vLLM 0.23.0 + vLLM-Ascend 0.23.0.post1
#
# REQUIREMENTS may also come from $PD_VLLM_REQUIREMENTS (the argument wins).
# - torch comes from the local CPU wheel directory only ($PD_TORCH_WHEEL_DIR, default
#   /opt/wheels, --no-index): a CUDA torch is never downloaded.
# - Everything else is the requirements file, installed with --no-deps (pinned, minimal
#   subset; see the file's header) from the configured package index, wheels only.
#   A pin marked `# pd-install: sdist` (vllm-ascend: PyPI has no wheel of it) is built
#   last from its source distribution: --no-build-isolation (its build requirements, e.g.
#   torch-npu, are not installable here; setuptools/setuptools-scm come from the file),
#   COMPILE_CUSTOM_KERNELS=0 (pure Python, no kernel build) and SOC_VERSION
#   ($PD_VLLM_SOC_VERSION, default ascend910_9391, Atlas A3; vllm-ascend's setup.py would
#   otherwise ask npu-smi).
# - Idempotent: a stamp in the venv records the requirements/layout/python it was built
#   from; when it matches, nothing is done (well under a second). When it does not, the
#   venv is rebuilt from scratch (a venv we did not create is never deleted).
# - Concurrent callers serialise on a lock file in $TMPDIR (one per VENV_DIR).
# - PD_VLLM_BASE_PYTHON: interpreter for the venv (default python3.11, else python3;
#   must be 3.11, the torch wheel is cp311). PD_VLLM_REINSTALL=1 forces a rebuild.
# - The smoke test builds the real serve parser the way tests/conformance/vllm_check.py
#   does: vllm-ascend's plugins kept out with VLLM_PLUGINS (they import torch_npu), the CPU
#   platform selected when vllm cannot infer one (0.23 ignores VLLM_TARGET_DEVICE), and
#   with vllm-ascend: `import vllm_ascend` and its KV connector names registered.
# Tests find the venvs with PD_VLLM_PYTHON=<.venv-vllm>/bin/python and
# PD_VLLM_ASCEND_PYTHON=<.venv-vllm-ascend>/bin/python (their defaults, under <repo>).
set -euo pipefail

self=$(readlink -f "$0")
repo=$(dirname "$(dirname "$self")")
venv=${1:-$repo/.venv-vllm}
venv=$(readlink -m "$venv")
req=${2:-${PD_VLLM_REQUIREMENTS:-$repo/.ci/requirements-vllm.txt}}
req=$(readlink -m "$req")
wheels=${PD_TORCH_WHEEL_DIR:-/opt/wheels}
soc_version=${PD_VLLM_SOC_VERSION:-ascend910_9391}

t0=$(date +%s)
log() { echo "install-vllm: [$(($(date +%s) - t0))s] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
# pip.conf's file:// extra indexes lack most projects; pip says so once per project.
quiet_pip() { grep -v "^WARNING: Location 'file:.*' is ignored" >&2 || true; }

[ -f "$req" ] || die "missing $req"
torch_pin=$(grep -E '^torch==' "$req" | head -n1)
vllm_pin=$(grep -E '^vllm==' "$req" | head -n1)
[ -n "$torch_pin" ] && [ -n "$vllm_pin" ] || die "$req must pin torch== and vllm=="
# Pins built from their source distribution (`NAME==VERSION  # pd-install: sdist`).
sdist_re='^[A-Za-z0-9_.-]+==[^[:space:]#]+[[:space:]]*#[[:space:]]*pd-install:[[:space:]]*sdist'
mapfile -t sdist_pins < <(grep -E "$sdist_re" "$req" | sed -E 's/[[:space:]]*#.*//')

base_py=${PD_VLLM_BASE_PYTHON:-}
if [ -z "$base_py" ]; then
    base_py=$(command -v python3.11 || command -v python3 || true)
fi
[ -n "$base_py" ] || die "no python3.11 found (set PD_VLLM_BASE_PYTHON)"
py_ver=$("$base_py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[ "$py_ver" = 3.11 ] || die "$base_py is Python $py_ver; need 3.11 (the torch wheel is cp311)"

# What the venv is built from; any change rebuilds it. Bump `layout` when a change to
# this script changes what ends up in the venv.
layout=1
stamp_want="req=$(sha256sum <"$req" | cut -c1-16) layout=$layout py=$py_ver"
[ ${#sdist_pins[@]} -eq 0 ] || stamp_want+=" soc=$soc_version"
stamp_file=$venv/.pd-install-vllm.stamp
owner_file=$venv/.pd-install-vllm.owner   # written as soon as we create the venv

up_to_date() {
    [ -z "${PD_VLLM_REINSTALL:-}" ] && [ -x "$venv/bin/python" ] && [ -f "$stamp_file" ] \
        && [ "$(cat "$stamp_file")" = "$stamp_want" ]
}
if up_to_date; then
    log "up to date: $venv ($vllm_pin${sdist_pins:+, ${sdist_pins[*]}}, $torch_pin)"
    exit 0
fi

mkdir -p "$(dirname "$venv")"
lock=${TMPDIR:-/tmp}/pd-install-vllm.$(echo "$venv" | sha256sum | cut -c1-16).lock
exec 9>>"$lock"
flock 9
if up_to_date; then
    log "installed by a concurrent run: $venv"
    exit 0
fi

start=$(date +%s)
if [ -e "$venv" ]; then
    if [ -f "$owner_file" ]; then
        log "rebuilding $venv (first install unfinished, or requirements/layout/python changed)"
        old=$venv.old.$$          # deleted at exit, after the new venv is in place
        mv "$venv" "$old"
        trap 'rm -rf "$old"' EXIT
    elif [ -d "$venv" ] && [ -z "$(ls -A "$venv")" ]; then
        rmdir "$venv"
    else
        die "$venv exists and is not a venv built by this script; remove it or pick another VENV_DIR"
    fi
fi

export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PIP_PROGRESS_BAR=off
log "creating $venv with $base_py"
"$base_py" -m venv "$venv"
echo "$self" >"$owner_file"
echo '*' >"$venv/.gitignore"   # keeps git status clean wherever the venv lives
# --no-compile: byte-compiling ~2 GB of sources dominates the install time; the few
# modules the parser imports are compiled on first use.
pip=("$venv/bin/python" -m pip install --quiet --no-deps --no-cache-dir --no-compile)

step=$(date +%s)
log "installing $torch_pin from $wheels (local CPU wheel, --no-index)"
[ -d "$wheels" ] || die "torch wheel directory $wheels not found (set PD_TORCH_WHEEL_DIR)"
"${pip[@]}" --no-index --find-links "$wheels" "$torch_pin" 2>&1 | quiet_pip \
    || die "no $torch_pin wheel in $wheels (a CUDA build from PyPI is deliberately not used)"
log "torch step took $(($(date +%s) - step)) s"

step=$(date +%s)
log "installing $vllm_pin and its parser subset from $(basename "$req") (--no-deps, wheels)"
# torch is already satisfied by the local CPU wheel, so pip does not look it up again.
wheel_req=$venv/.pd-install-vllm.wheels.txt
grep -vE "$sdist_re" "$req" >"$wheel_req"
"${pip[@]}" --only-binary :all: -r "$wheel_req" 2>&1 | quiet_pip
rm -f "$wheel_req"
log "wheel step took $(($(date +%s) - step)) s"

for pin in "${sdist_pins[@]}"; do
    step=$(date +%s)
    log "building $pin from its sdist (no kernels, SOC_VERSION=$soc_version)"
    COMPILE_CUSTOM_KERNELS=0 SOC_VERSION=$soc_version \
        "${pip[@]}" --no-build-isolation --no-binary "${pin%%==*}" "$pin" 2>&1 | quiet_pip \
        || die "building $pin from its sdist failed (see pip's output above)"
    log "$pin took $(($(date +%s) - step)) s"
done

# Guard: nothing CUDA slipped in, torch is the CPU build, the pins are what is installed.
"$venv/bin/python" - "$req" <<'EOF'
import importlib.metadata as md
import re
import sys

bad = []
for dist in md.distributions():
    name = dist.metadata["Name"].lower()
    if name.startswith(("nvidia-", "triton", "cuda-")):
        bad.append(f"unexpected CUDA package {name}")
torch_v = md.version("torch")
if not torch_v.endswith("+cpu"):
    bad.append(f"torch {torch_v} is not the CPU build")
for line in open(sys.argv[1]):
    m = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)", line)
    if m:
        got = md.version(m.group(1)).split("+")[0]
        if got != m.group(2):
            bad.append(f"{m.group(1)}: want {m.group(2)}, got {got}")
if bad:
    sys.exit("install-vllm: " + "; ".join(bad))
EOF

log "smoke test: building the serve parser (VLLM_TARGET_DEVICE=cpu, CPU platform)"
VLLM_TARGET_DEVICE=cpu VLLM_NO_USAGE_STATS=1 "$venv/bin/python" - <<'EOF' \
    || die "the vllm parser does not build; a requirement is missing from $req"
import importlib.metadata as md
import importlib.util
import os

# vllm-ascend's plugins import torch_npu: keep them out (VLLM_PLUGINS is an allow-list).
eps = [ep for g in ("vllm.general_plugins", "vllm.platform_plugins")
       for ep in md.entry_points(group=g)]
ascend = [ep for ep in eps if ep.value.startswith("vllm_ascend")]
if ascend and "VLLM_PLUGINS" not in os.environ:
    os.environ["VLLM_PLUGINS"] = ",".join(sorted({ep.name for ep in eps if ep not in ascend}))
# Before vllm.engine / vllm.entrypoints bind it: vllm 0.23 cannot infer a CPU platform.
import vllm.platforms as platforms

if platforms.current_platform.is_unspecified():
    from vllm.platforms.cpu import CpuPlatform

    platforms.current_platform = CpuPlatform()
import vllm.config
import vllm.engine.arg_utils
from vllm.entrypoints.cli.serve import ServeSubcommand

try:
    from vllm.utils.argparse_utils import FlexibleArgumentParser
except ImportError:
    from vllm.utils import FlexibleArgumentParser
parser = FlexibleArgumentParser(prog="vllm")
ServeSubcommand().subparser_init(parser.add_subparsers(dest="subparser"))
ns = parser.parse_args(["serve", "/nonexistent/model", "--port", "7100"])
assert ns.port == 7100, ns
if importlib.util.find_spec("vllm_ascend") is not None:
    assert {ep.name for ep in ascend} >= {"ascend", "ascend_kv_connector"}, ascend
    import vllm_ascend
    import vllm_ascend.distributed.kv_transfer as kv_transfer
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    assert vllm_ascend.register() == "vllm_ascend.platform.NPUPlatform"
    kv_transfer.register_connector()
    assert "MooncakeConnectorV1" in KVConnectorFactory._registry
EOF

echo "$stamp_want" >"$stamp_file"
log "done in $(($(date +%s) - start)) s: $venv ($vllm_pin${sdist_pins:+, ${sdist_pins[*]}}, $torch_pin)"
