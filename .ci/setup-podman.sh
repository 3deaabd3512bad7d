#!/bin/sh
# Make rootful podman usable for the pd-deploy test bed on Debian 12 (bookworm).
#
#   .ci/setup-podman.sh              install what is missing, check that podman works
#   .ci/setup-podman.sh --print-env  only print the env lines (eval "$(... --print-env)")
#   .ci/setup-podman.sh --system     also install the config system-wide
#                                    (/etc/containers/containers.conf.d/pd-test.conf and,
#                                    only if absent, /etc/containers/storage.conf)
#
# Idempotent: packages already installed are not touched (no apt call at all then).
# Without --system nothing under /etc is written; the test bed selects its config
# with CONTAINERS_CONF / CONTAINERS_STORAGE_CONF pointing at tests/fixtures/.
#
# Why each package (see tests/fixtures/README.md):
#   podman      4.3.1 (bookworm); pulls conmon + containers-common.
#   runc        podman's Depends is "crun | runc" and picks crun, but crun 1.8 refuses
#               this host's hybrid cgroup v1 layout; runc 1.1 works.
#   catatonit   the init binary behind `podman run --init` (reaps, forwards signals).
#   debootstrap builds the test image (.ci/build-test-image.sh).
#   tar         podman import input (always present on Debian, listed for clarity).
# Not needed: fuse-overlayfs (vfs driver, rootful), uidmap/slirp4netns (rootful,
# --network host), buildah, netavark is only used for non-host networks.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
fixtures="$repo/tests/fixtures"
conf="$fixtures/containers.conf"
sconf="$fixtures/storage.conf"

print_env() {
    echo "export CONTAINERS_CONF=$conf"
    echo "export CONTAINERS_STORAGE_CONF=$sconf"
}

system=0
case "${1:-}" in
    --print-env) print_env; exit 0 ;;
    --system) system=1 ;;
    "") ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "usage: $0 [--print-env|--system]" >&2; exit 2 ;;
esac

if [ "$(id -u)" != 0 ]; then
    echo "setup-podman: must run as root (rootful podman test bed)" >&2
    exit 1
fi

pkgs="podman runc catatonit debootstrap tar"
missing=""
for p in $pkgs; do
    st=$(dpkg-query -W -f '${db:Status-Status}' "$p" 2>/dev/null || true)
    [ "$st" = installed ] || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "setup-podman: installing:$missing"
    export DEBIAN_FRONTEND=noninteractive
    # DPkg::Lock::Timeout: wait for a concurrent apt run instead of failing.
    apt-get -o DPkg::Lock::Timeout=600 update -qq || true
    # shellcheck disable=SC2086
    apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends $missing
fi

if [ $system = 1 ]; then
    install -d -m 0755 /etc/containers/containers.conf.d
    install -m 0644 "$conf" /etc/containers/containers.conf.d/pd-test.conf
    echo "setup-podman: wrote /etc/containers/containers.conf.d/pd-test.conf"
    if [ ! -e /etc/containers/storage.conf ]; then
        install -m 0644 "$sconf" /etc/containers/storage.conf
        echo "setup-podman: wrote /etc/containers/storage.conf"
    elif ! grep -q '^driver *= *"vfs"' /etc/containers/storage.conf; then
        echo "setup-podman: /etc/containers/storage.conf exists and is not vfs;" \
            "left alone (pass --storage-driver vfs)" >&2
    fi
fi

# Check: the config parses and selects what we expect, in a throwaway store.
eval "$(print_env)"
tmp=$(mktemp -d "${TMPDIR:-/tmp}/pd-podman-check.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
info=$(podman --root "$tmp/storage" --runroot "$tmp/run" info --format \
    '{{.Host.OCIRuntime.Name}} {{.Host.CgroupManager}} {{.Host.EventLogger}} {{.Store.GraphDriverName}}')
if [ "$info" != "runc cgroupfs file vfs" ]; then
    echo "setup-podman: unexpected podman config: $info (want: runc cgroupfs file vfs)" >&2
    exit 1
fi
echo "setup-podman: ok: $(podman --version), $info"
print_env
