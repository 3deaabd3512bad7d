#!/usr/bin/env bash
# Install the Debian packages pd-deploy's demo and tests need, only those missing.
# Usage: .ci/install-deps.sh [demo|test]   (demo: nginx + njs + etcd; test: everything)
set -euo pipefail
what=${1:-test}
# etcd-server, redis-server: the real coordinators the xLLM and FastDeploy backends start
pkgs=(nginx libnginx-mod-http-js iproute2 procps curl etcd-server redis-server)
if [ "$what" = test ]; then
  pkgs+=(openssh-server openssh-client podman runc catatonit debootstrap uidmap tar)
  # docker.io (dockerd 20.10, its own containerd, tini as docker-init) and the
  # distribution's registry: one test dockerd per emulated node and a loopback
  # registry, started and stopped by the tests (.ci/setup-docker.sh), never as services
  pkgs+=(docker.io docker-registry)
fi
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all Debian packages present"
  exit 0
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# Packages must not start their services (the distribution's nginx and sshd are not
# ours, and we never stop what we did not start): a temporary policy-rc.d says so.
policy=/usr/sbin/policy-rc.d
made_policy=""
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
  $sudo chmod +x "$policy"
  made_policy=1
fi
trap '[ -n "$made_policy" ] && $sudo rm -f "$policy"' EXIT
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
