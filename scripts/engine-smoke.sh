#!/usr/bin/env bash
# Smoke test of the serving engine: starts `strata-engine serve` on its defaults (port 0, the
# default model), waits for its ready line, asks one chat completion and checks its shape
# and usage, checks /health and /metrics, stops it with SIGTERM and checks it exits 0.
#
#   scripts/engine-smoke.sh target/release/strata-engine
set -euo pipefail
bin=${1:?usage: engine-smoke.sh <strata-engine binary>}
out=$(mktemp)
trap 'kill "$pid" 2>/dev/null || true; rm -f "$out"' EXIT
"$bin" serve --port 0 >"$out" 2>&1 &
pid=$!
for _ in $(seq 1 1200); do
    grep -q '^strata: ready' "$out" && break
    kill -0 "$pid" 2>/dev/null || { cat "$out"; echo "error: strata-engine serve exited" >&2; exit 1; }
    sleep 0.1
done
grep -q '^strata: ready' "$out" || { cat "$out"; echo "error: no ready line" >&2; exit 1; }
base=$(sed -n 's/^strata: serving model .* at \(http:[^ ]*\)\/v1$/\1/p' "$out")
[ -n "$base" ] || { cat "$out"; echo "error: no address line" >&2; exit 1; }
grep '^strata: KV pool' "$out"
curl -sf "$base/health" >/dev/null || { echo "error: /health failed" >&2; exit 1; }
reply=$(curl -sf "$base/v1/chat/completions" -H 'Content-Type: application/json' \
    -d '{"model": "default", "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 16, "temperature": 0}')
python3 - "$reply" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
text = r["choices"][0]["message"]["content"]
u = r["usage"]
assert r["object"] == "chat.completion", r
assert text and u["completion_tokens"] > 0 and u["prompt_tokens"] > 0, r
assert u["prompt_tokens_details"]["cached_tokens"] == 0, r
print(f"engine smoke: {u['prompt_tokens']} prompt tokens -> {text!r}")
PY
curl -sf "$base/metrics" | grep -q '^strata:generation_tokens_total [1-9]' \
    || { echo "error: /metrics does not count the generated tokens" >&2; exit 1; }
kill -TERM "$pid"
status=0
wait "$pid" || status=$?
[ "$status" = 0 ] || { cat "$out"; echo "error: exit status $status after SIGTERM" >&2; exit 1; }
echo "engine smoke: ready, chat completion served, metrics counted, clean SIGTERM exit"
