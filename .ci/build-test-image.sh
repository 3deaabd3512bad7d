#!/bin/bash
# Build the pd-deploy test image and save it as a docker-archive tarball.
#
#   .ci/build-test-image.sh OUT_TARBALL        (root; run .ci/setup-podman.sh first)
#
# debootstrap --variant=minbase bookworm + python3, python3-aiohttp, nginx, the njs
# module, procps, iproute2, ca-certificates; docs/man/locales/apt lists stripped;
# `podman import` with CMD/ENV/LABEL; `podman save --format docker-archive`.
# The image is tagged $PD_TEST_IMAGE (default localhost/pd-test:bookworm). Its ID is
# in the tarball's manifest.json ("Config": "<id>.json") and is the same in every
# store it is loaded into. pd_launcher is NOT in the image: bind-mount the repo's
# package read-only at /opt/pd_launcher (PYTHONPATH=/opt is set).
#
# Cache: if OUT_TARBALL exists and is newer than this script, nothing is done
# (set PD_TEST_IMAGE_REBUILD=1 to force). Debian packages are cached in
# $PD_DEBOOTSTRAP_CACHE (default /var/cache/pd-deploy/debootstrap).
# Mirror: $PD_DEBIAN_MIRROR, else the first bookworm URI in /etc/apt/sources.list*.
set -euo pipefail

out=${1:?usage: $0 OUT_TARBALL}
self=$(readlink -f "$0")
repo=$(dirname "$(dirname "$self")")
image=${PD_TEST_IMAGE:-localhost/pd-test:bookworm}
cache=${PD_DEBOOTSTRAP_CACHE:-/var/cache/pd-deploy/debootstrap}
suite=bookworm
packages=python3,python3-aiohttp,nginx,libnginx-mod-http-js,procps,iproute2,ca-certificates

log() { echo "build-test-image: $*" >&2; }

image_id_of() {  # docker-archive -> image ID (sha256 of the config blob)
    tar -xOf "$1" manifest.json | python3 -c \
        'import json,sys; print("sha256:" + json.load(sys.stdin)[0]["Config"].split(".")[0].split("/")[-1])'
}

up_to_date() { [ -s "$out" ] && [ "$out" -nt "$self" ] && [ -z "${PD_TEST_IMAGE_REBUILD:-}" ]; }
if up_to_date; then
    log "up to date: $out ($(image_id_of "$out"))"
    exit 0
fi
[ "$(id -u)" = 0 ] || { log "must run as root (debootstrap, rootful podman)"; exit 1; }
# Concurrent callers (parallel test sessions): one builds, the others wait and reuse.
mkdir -p "$(dirname "$out")"   # readlink -f is empty while the parent is missing
touch "$out.lock"     # mtime = when we started waiting
exec 9>>"$out.lock"
flock 9
if [ -s "$out" ] && [ "$out" -nt "$self" ] && [ "$out" -nt "$out.lock" ]; then
    log "built by a concurrent run: $out ($(image_id_of "$out"))"
    exit 0
fi
for c in debootstrap podman tar python3; do
    command -v "$c" >/dev/null || { log "missing $c: run .ci/setup-podman.sh"; exit 1; }
done

find_mirror() {
    local f uri
    # deb822 (.sources): a stanza whose Suites has "bookworm" (not only -security).
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -e "$f" ] || continue
        uri=$(awk -v s="$suite" '
            BEGIN { RS=""; FS="\n" }
            {
                u=""; ok=0
                for (i = 1; i <= NF; i++) {
                    if ($i ~ /^URIs:/) { split($i, a, /[ \t]+/); u=a[2] }
                    if ($i ~ /^Suites:/) { n=split($i, b, /[ \t]+/);
                        for (j = 2; j <= n; j++) if (b[j] == s) ok=1 }
                }
                if (ok && u != "") { print u; exit }
            }' "$f")
        [ -n "$uri" ] && { echo "$uri"; return; }
    done
    # one-line format
    uri=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
        awk -v s="$suite" '$1 == "deb" { u=""; for (i = 2; i <= NF; i++) {
            if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; continue }
            if (u == "") u=$i; else { if ($i == s) { print u; exit } break } } }')
    [ -n "$uri" ] && { echo "$uri"; return; }
    echo http://deb.debian.org/debian
}
mirror=${PD_DEBIAN_MIRROR:-$(find_mirror)}

start=$(date +%s)
mkdir -p "$cache"
work=$(mktemp -d "${TMPDIR:-/var/tmp}/pd-test-image.XXXXXX")
export CONTAINERS_CONF="$repo/tests/fixtures/containers.conf"
export CONTAINERS_STORAGE_CONF="$repo/tests/fixtures/storage.conf"
bstore=(--root "$work/build/storage" --runroot "$work/build/run")
vstore=(--root "$work/verify/storage" --runroot "$work/verify/run")
cleanup() {
    podman "${bstore[@]}" rm -af >/dev/null 2>&1 || true
    podman "${vstore[@]}" rm -af >/dev/null 2>&1 || true
    rm -rf "$work"
    [ -z "${tmp_out:-}" ] || rm -f "$tmp_out"
}
trap cleanup EXIT

log "debootstrap $suite from $mirror (cache $cache)"
root="$work/rootfs"
if ! debootstrap --variant=minbase --include="$packages" --cache-dir="$cache" \
        "$suite" "$root" "$mirror" >"$work/debootstrap.log" 2>&1; then
    tail -n 30 "$work/debootstrap.log" >&2
    [ -f "$root/debootstrap/debootstrap.log" ] && tail -n 30 "$root/debootstrap/debootstrap.log" >&2
    exit 1
fi
t_boot=$(($(date +%s) - start))

# Strip what a test container never reads; keep dpkg from re-adding it later.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/cache/debconf/*-old \
    "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/* \
    "$root"/usr/share/locale/* "$root"/usr/share/lintian "$root"/usr/share/linda \
    "$root"/var/lib/dpkg/*-old "$root"/etc/resolv.conf "$root"/etc/hostname
find "$root/var/log" -type f -delete
cat >"$root/etc/dpkg/dpkg.cfg.d/01-pd-test-nodoc" <<'EOF'
path-exclude /usr/share/doc/*
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
EOF
cat >"$root/etc/apt/sources.list" <<EOF
deb $mirror $suite main
EOF

tar --numeric-owner --xattrs -C "$root" -cf "$work/rootfs.tar" .
script_sum=$(sha256sum "$self" | cut -c1-16)
podman "${bstore[@]}" import -q \
    --change 'CMD ["/bin/bash"]' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PYTHONPATH=/opt' \
    --change 'ENV PYTHONUNBUFFERED=1' \
    --change 'ENV PYTHONDONTWRITEBYTECODE=1' \
    --change 'WORKDIR /' \
    --change 'STOPSIGNAL SIGTERM' \
    --change "LABEL pd.test-image=$suite" \
    --change "LABEL pd.test-image.script=$script_sum" \
    "$work/rootfs.tar" "$image" >/dev/null
id=$(podman "${bstore[@]}" image inspect --format '{{.Id}}' "$image")
tmp_out="$out.tmp.$$"
rm -f "$tmp_out"
podman "${bstore[@]}" save -q --format docker-archive -o "$tmp_out" "$image"

# Verify from the tarball, in a second store: same ID, tools present, launcher runs.
podman "${vstore[@]}" load -q -i "$tmp_out" >/dev/null
vid=$(podman "${vstore[@]}" image inspect --format '{{.Id}}' "$image")
tid=$(image_id_of "$tmp_out")
if [ "$vid" != "$id" ] || [ "sha256:$id" != "$tid" ]; then
    log "image ID mismatch: built $id, loaded $vid, manifest $tid"
    exit 1
fi
podman "${vstore[@]}" run --rm --network host \
    -v "$repo/pd_launcher:/opt/pd_launcher:ro" "$image" sh -euc '
        python3 -c "import aiohttp, sys; print(\"python\", sys.version.split()[0], \"aiohttp\", aiohttp.__version__)"
        nginx -V 2>&1 | head -n 1
        test -f /usr/lib/nginx/modules/ngx_http_js_module.so
        test -f /etc/nginx/modules-enabled/50-mod-http-js.conf
        python3 -m pd_launcher --help >/dev/null
        echo "njs module ok, pd_launcher ok"' >&2
mv -f "$tmp_out" "$out"
flock -u 9   # waiters may go now (children such as conmon may still hold fd 9)
log "wrote $out: $image $id, $(du -m "$out" | cut -f1) MB," \
    "debootstrap ${t_boot}s, total $(($(date +%s) - start))s"
