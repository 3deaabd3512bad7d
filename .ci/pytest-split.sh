#!/usr/bin/env bash
# The whole pytest suite as two concurrent streams, so CI uses both cores:
#   A: tests/integration + tests/fixtures (Ansible runs, containers, sshd; each
#      integration test owns its loopback subnet, 127.0.<n>.0/24)
#   B: everything else (unit, launcher, emulator, proxy, conformance: 127.0.0.1 and
#      127.0.1.x, never an integration subnet; bench smoke runs and tests/day2, which
#      run playbooks too, each on a subnet of its own: 127.0.77, 127.0.8, 127.0.80)
# Each stream is sequential, as before; the machine was ~40% idle during a single
# sequential run (user+sys 34.5 min in 29.4 min wall on 2 cores).
#
#   .ci/pytest-split.sh PYTEST [ARGS...]   ARGS go to both streams (e.g. -k, -x)
#
# Output: each stream to its own log, printed when both are done, then the slowest
# tests of each; exit status non-zero if either stream failed. PD_TEST_SERIAL=1 runs
# one stream after the other (same output) for debugging.
set -uo pipefail
pytest=$1
shift
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
logs=$(mktemp -d "${TMPDIR:-/tmp}/pd-pytest.XXXXXX")
trap 'rm -rf "$logs"' EXIT
common=(-q -rs --durations=15 "$@")
a=(tests/integration tests/fixtures)
b=(tests --ignore=tests/integration --ignore=tests/fixtures)

t0=$(date +%s)
if [ -n "${PD_TEST_SERIAL:-}" ]; then
    "$pytest" "${common[@]}" "${a[@]}" >"$logs/a.log" 2>&1; rc_a=$?
    "$pytest" "${common[@]}" "${b[@]}" >"$logs/b.log" 2>&1; rc_b=$?
else
    "$pytest" "${common[@]}" "${a[@]}" >"$logs/a.log" 2>&1 &
    pid_a=$!
    "$pytest" "${common[@]}" "${b[@]}" >"$logs/b.log" 2>&1
    rc_b=$?
    wait "$pid_a"; rc_a=$?
fi
for s in a b; do
    echo "===================== stream $s: $( [ $s = a ] && echo "${a[*]}" || echo "${b[*]}" )"
    cat "$logs/$s.log"
done
echo "pytest-split: stream A rc=$rc_a, stream B rc=$rc_b, wall $(($(date +%s) - t0)) s"
[ "$rc_a" -eq 0 ] && [ "$rc_b" -eq 0 ]
