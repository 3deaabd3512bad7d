#!/bin/sh
# Docker and a registry for the pd-deploy test bed on Debian 12 (bookworm), without
# ever using (or starting) the system's docker, containerd or docker-registry service.
#
#   .ci/setup-docker.sh                         install what is missing, check that a
#                                               test dockerd starts and stops
#   .ci/setup-docker.sh start NODE_DIR          start a test dockerd for one node;
#                                               prints DOCKER_HOST=unix://... etc.
#   .ci/setup-docker.sh stop NODE_DIR           remove its containers, stop exactly that
#                                               dockerd (and its containerd), remove dirs
#   .ci/setup-docker.sh registry-start DIR [ADDR [PORT]]   docker-registry on ADDR:PORT
#                                               (127.0.41.1:5000), storage in DIR/data
#   .ci/setup-docker.sh registry-stop DIR       stop it, remove its storage
#
# Then: docker -H "$DOCKER_HOST" ps      (use /usr/bin/docker, the distribution's
# client: another docker earlier on PATH may print other JSON)
#
# Idempotent: packages already installed are not touched (no apt call at all then);
# their services are never started (policy-rc.d while installing; there is no
# systemd here anyway). The implementation is tests/fixtures/docker_env.py (stdlib;
# pytest uses it directly); tests/fixtures/README.md, "Docker", explains each flag.
#
# Why each package:
#   docker.io        dockerd + the docker CLI 20.10 (bookworm); pulls containerd 1.6
#                    (dockerd starts its own instance) and tini (/usr/bin/docker-init,
#                    what `docker run --init` injects).
#   runc             the OCI runtime (also podman's; crun is not used by dockerd).
#   docker-registry  distribution 2.8: the registry the pull tests push to and pull from.
# Not needed: iptables rules (--iptables=false), the bridge (--bridge=none; units use
# the host network), apparmor (not enabled here), cgroupfs-mount (cgroups are mounted).
set -eu

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
py=/usr/bin/python3
env_py="$repo/tests/fixtures/docker_env.py"

if [ "$(id -u)" != 0 ]; then
    echo "setup-docker: must run as root (the test dockerd is rootful)" >&2
    exit 1
fi

"$(dirname "$0")/apt-install.sh" docker.io runc docker-registry

case "${1:-}" in
    "")
        exec "$py" "$env_py" check ;;
    start)
        exec "$py" "$env_py" start --dir "${2:?usage: $0 start NODE_DIR}" ;;
    stop)
        exec "$py" "$env_py" stop --dir "${2:?usage: $0 stop NODE_DIR}" ;;
    registry-start)
        exec "$py" "$env_py" registry-start --dir "${2:?usage: $0 registry-start DIR [ADDR [PORT]]}" \
            --addr "${3:-127.0.41.1}" --port "${4:-5000}" ;;
    registry-stop)
        exec "$py" "$env_py" registry-stop --dir "${2:?usage: $0 registry-stop DIR}" ;;
    -h|--help)
        sed -n '2,20p' "$0" ;;
    *)
        sed -n '2,20p' "$0" >&2
        exit 2 ;;
esac
