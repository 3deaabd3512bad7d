#!/usr/bin/env bash
# Install the REAL `vllm serve` argument parser (vllm 0.33.0) on a CPU-only machine,
# in a venv of its own, for tests/conformance.
#
#   .ci/install-vllm.sh [VENV_DIR]          (default: <repo>/.venv-vllm)
#
# - torch comes from the local CPU wheel directory only ($PD_TORCH_WHEEL_DIR, default
#   /opt/wheels, --no-index): a CUDA torch is never downloaded.
# - Everything else is .ci/requirements-vllm.txt, installed with --no-deps (pinned,
#   minimal subset; see the file's header) from the configured package index.
# - Idempotent: a stamp in the venv records the requirements/layout/python it was built
#   from; when it matches, nothing is done (well under a second). When it does not, the
#   venv is rebuilt from scratch (a venv we did not create is never deleted).
# - Concurrent callers serialise on a lock file in $TMPDIR (one per VENV_DIR).
# - PD_VLLM_BASE_PYTHON: interpreter for the venv (default python3.11, else python3;
#   must be 3.11, the torch wheel is cp311). PD_VLLM_REINSTALL=1 forces a rebuild.
# Tests find the venv with PD_VLLM_PYTHON=VENV_DIR/bin/python (their default is
# <repo>/.venv-vllm/bin/python).
set -euo pipefail

self=$(readlink -f "$0")
repo=$(dirname "$(dirname "$self")")
venv=${1:-$repo/.venv-vllm}
venv=$(readlink -m "$venv")
req=$repo/.ci/requirements-vllm.txt
wheels=${PD_TORCH_WHEEL_DIR:-/opt/wheels}

t0=$(date +%s)
log() { echo "install-vllm: [$(($(date +%s) - t0))s] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
# pip.conf's file:// extra indexes lack most projects; pip says so once per project.
quiet_pip() { grep -v "^WARNING: Location 'file:.*' is ignored" >&2 || true; }

[ -f "$req" ] || die "missing $req"
torch_pin=$(grep -E '^torch==' "$req" | head -n1)
vllm_pin=$(grep -E '^vllm==' "$req" | head -n1)
[ -n "$torch_pin" ] && [ -n "$vllm_pin" ] || die "$req must pin torch== and vllm=="

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
stamp_file=$venv/.pd-install-vllm.stamp
owner_file=$venv/.pd-install-vllm.owner   # written as soon as we create the venv

up_to_date() {
    [ -z "${PD_VLLM_REINSTALL:-}" ] && [ -x "$venv/bin/python" ] && [ -f "$stamp_file" ] \
        && [ "$(cat "$stamp_file")" = "$stamp_want" ]
}
if up_to_date; then
    log "up to date: $venv ($vllm_pin, $torch_pin)"
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

log "installing $torch_pin from $wheels (local CPU wheel, --no-index)"
[ -d "$wheels" ] || die "torch wheel directory $wheels not found (set PD_TORCH_WHEEL_DIR)"
"${pip[@]}" --no-index --find-links "$wheels" "$torch_pin" 2>&1 | quiet_pip \
    || die "no $torch_pin wheel in $wheels (a CUDA build from PyPI is deliberately not used)"

log "installing $vllm_pin and its parser subset from $req (--no-deps)"
# torch is already satisfied by the local CPU wheel, so pip does not look it up again.
"${pip[@]}" --only-binary :all: -r "$req" 2>&1 | quiet_pip

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

log "smoke test: importing vllm.entrypoints.cli.serve (VLLM_TARGET_DEVICE=cpu)"
VLLM_TARGET_DEVICE=cpu "$venv/bin/python" -c \
    'import vllm.entrypoints.cli.serve, vllm.engine.arg_utils, vllm.config' \
    || die "the vllm parser does not import; a requirement is missing from $req"

echo "$stamp_want" >"$stamp_file"
log "done in $(($(date +%s) - start)) s: $venv ($vllm_pin, $torch_pin)"
