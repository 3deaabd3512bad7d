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
exec "$(dirname "$0")/apt-install.sh" "${pkgs[@]}"
