#!/bin/sh
# Throwaway sshd for the SSH path of the pd-deploy test bed (never the system sshd).
#
#   .ci/setup-sshd.sh                      install openssh-server/-client if missing, check
#   .ci/setup-sshd.sh start DIR [PORT]     start a test sshd on 127.0.1.1..12:PORT (2222)
#                                          with keys/config in DIR; prints PD_SSH_* vars
#   .ci/setup-sshd.sh stop DIR             stop exactly the sshd recorded in DIR/sshd.pid
#
# Then:  ssh -F DIR/ssh_config 127.0.1.3 python3 -c 'print(1)'
# or:    ssh -i DIR/id_ed25519 -p 2222 -o StrictHostKeyChecking=no \
#            -o UserKnownHostsFile=/dev/null root@127.0.1.3 python3 -c 'print(1)'
# The implementation is tests/fixtures/sshd.py (stdlib; pytest uses it directly).
set -eu

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
py=/usr/bin/python3

if [ "$(id -u)" != 0 ]; then
    echo "setup-sshd: must run as root" >&2
    exit 1
fi

"$(dirname "$0")/apt-install.sh" openssh-server openssh-client
# Privilege separation directory; sshd refuses to start without it.
install -d -m 0755 /run/sshd

case "${1:-}" in
    "")
        /usr/sbin/sshd -V 2>&1 | head -n 1 | sed 's/^/setup-sshd: ok: /' ;;
    start)
        dir=${2:?usage: $0 start DIR [PORT]}
        exec "$py" "$repo/tests/fixtures/sshd.py" start --dir "$dir" --port "${3:-2222}" ;;
    stop)
        dir=${2:?usage: $0 stop DIR}
        exec "$py" "$repo/tests/fixtures/sshd.py" stop --dir "$dir" ;;
    *)
        sed -n '2,12p' "$0" >&2
        exit 2 ;;
esac
