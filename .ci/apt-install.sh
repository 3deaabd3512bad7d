#!/usr/bin/env bash
# Install the Debian packages given that are missing, without starting their services.
#
#   .ci/apt-install.sh PKG [PKG ...]
#
# Idempotent: no apt call at all when every package is installed. Packages must not
# start their services (the distribution's nginx, sshd, dockerd, registry are not ours,
# and we never stop what we did not start): a policy-rc.d that says so exists while
# apt runs, unless the machine already has one. Waits for a concurrent apt run.
set -euo pipefail
[ $# -gt 0 ] || { echo "usage: $0 PKG [PKG ...]" >&2; exit 2; }
missing=()
for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "apt-install: all present: $*"
    exit 0
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "apt-install: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
policy=/usr/sbin/policy-rc.d
made_policy=""
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
    $sudo chmod +x "$policy"
    made_policy=1
fi
trap '[ -z "$made_policy" ] || $sudo rm -f "$policy"' EXIT
apt=($sudo apt-get -o DPkg::Lock::Timeout=600)
"${apt[@]}" update -qq || true
"${apt[@]}" install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
