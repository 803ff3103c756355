#!/usr/bin/env bash
# Smoke test of the README's main command: starts strata-sidecar on its defaults (with a
# private runtime directory so it cannot collide with a running one), waits for its ready
# line, checks the socket's mode and the metrics endpoint, stops it with SIGTERM and
# checks it exits 0 and removes its sockets.
#
#   scripts/sidecar-smoke.sh target/release/strata-sidecar
set -euo pipefail
bin=${1:?usage: sidecar-smoke.sh <strata-sidecar binary>}
run=$(mktemp -d)
out=$(mktemp)
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$run" "$out"' EXIT
XDG_RUNTIME_DIR=$run "$bin" --metrics 127.0.0.1:0 >"$out" 2>&1 &
pid=$!
for _ in $(seq 1 200); do
    grep -q '^strata-sidecar ready' "$out" && break
    kill -0 "$pid" 2>/dev/null || { cat "$out"; echo "error: strata-sidecar exited" >&2; exit 1; }
    sleep 0.05
done
line=$(grep '^strata-sidecar ready' "$out") || { cat "$out"; echo "error: no ready line" >&2; exit 1; }
echo "$line"
sock=$run/strata/sidecar.sock
[ -S "$sock" ] || { echo "error: no socket at $sock" >&2; exit 1; }
mode=$(stat -c %a "$sock")
[ "$mode" = 600 ] || { echo "error: socket mode is $mode, not 600" >&2; exit 1; }
metrics=$(sed -n 's/.* metrics=\([^ ]*\).*/\1/p' <<<"$line")
exec 3<>"/dev/tcp/${metrics%:*}/${metrics##*:}"
printf 'GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n' >&3
grep -q '^strata_cache_capacity_bytes{tier="host"} ' <&3 || { echo "error: no host capacity metric" >&2; exit 1; }
exec 3<&-
kill -TERM "$pid"
status=0
wait "$pid" || status=$?
[ "$status" = 0 ] || { cat "$out"; echo "error: exit status $status after SIGTERM" >&2; exit 1; }
[ ! -e "$sock" ] || { echo "error: socket left behind" >&2; exit 1; }
echo "sidecar smoke: ready, socket 0600, metrics served, clean SIGTERM exit"
