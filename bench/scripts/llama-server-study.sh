#!/usr/bin/env bash
# TTFT studies of llama.cpp's llama-server with SmolLM2-135M-Instruct, driven by
# strata-bench: a multi-turn chat study and a long-document QA study. Builds llama.cpp once
# (bench/scripts/build-llamacpp.sh), fetches the model (scripts/fetch-model.sh), starts
# llama-server on a free loopback port, and writes each study's report (report.txt), result
# JSON, per-request CSV and plots (PNG + SVG) under bench/results/<study>/.
# Run from anywhere; the machine should be otherwise idle.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
threads=${THREADS:-2}
model=$(scripts/fetch-model.sh)
server=$(dirname "$(bench/scripts/build-llamacpp.sh | tail -n 1)")/llama-server
[ -x "$server" ] || { echo "llama-server was not built: $server" >&2; exit 1; }
cargo build --release -q -p strata-bench
bench=target/release/strata-bench
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
log=$(mktemp)
# 4 slots of 4,096 tokens; llama-server keeps each slot's prompt KV (its per-slot cache).
"$server" -m "$model" --host 127.0.0.1 --port "$port" -c 16384 -np 4 -t "$threads" >"$log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 1 120); do
    curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
    kill -0 $pid 2>/dev/null || { cat "$log" >&2; echo "llama-server exited" >&2; exit 1; }
    sleep 0.5
done
version=$("$server" --version 2>&1 | grep -m1 version || true)
echo "llama-server ($version) on port $port, $threads threads" >&2

study() {
    local name=$1; shift
    local out=bench/results/$name
    rm -rf "$out"; mkdir -p "$out"
    {
        echo "# $name: llama-server ($version), SmolLM2-135M-Instruct Q4_1, -c 16384 -np 4 -t $threads"
        echo "# strata-bench run $*"
        "$bench" run --base-url "http://127.0.0.1:$port" --tokenizer "$model" --label llama-server \
            --save-result "$out/result.json" --csv "$out/requests.csv" --plots "$out" "$@"
    } | tee "$out/report.txt"
}

# One request in flight, so TTFT can be checked against the server's own timings.prompt_ms.
study multi-turn --max-parallel 1 multi-turn --clients 4 --rounds 6 --first-len 512 --new-tokens 64 --output-len 32
study long-doc-qa --max-parallel 1 long-doc-qa --documents 4 --questions 3 --doc-len 2048 --question-len 32 --output-len 16 --repeat-mode tile
# Throughput against request rate: shared-prefix prompts at three Poisson rates.
study rate-sweep --max-parallel 4 --request-rates 0.5,1,2 shared-prefix --groups 2 --prompts-per-group 8 --system-len 256 --question-len 32 --output-len 16
