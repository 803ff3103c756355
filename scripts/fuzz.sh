#!/usr/bin/env bash
# Runs Strata's fuzz targets (fuzz/, cargo-fuzz + libFuzzer) one after another.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# SECONDS per target (default 600); every target when none is named. Each target is built
# (under the shared cargo lock, /tmp/strata-cargo.lock, when `flock` exists), then run with
# `-max_total_time=SECONDS` on its corpus (fuzz/corpus/<target>: the committed seeds plus
# what earlier runs found). Prints per target the runs executed and whether it found a
# crash; logs and crash inputs go to fuzz/artifacts/<target>/. Exits non-zero if any target
# crashed (or failed to build).
set -uo pipefail

ALL=(gguf safetensors gguf_tokenizer sidecar_config shm_handshake disk_recovery sidecar_service)
SERVER=" sidecar_service shm_handshake sidecar_config "
ENGINE=" gguf safetensors gguf_tokenizer "

secs=${1:-600}
[ $# -gt 0 ] && shift
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=("${ALL[@]}")
if ! [[ $secs =~ ^[0-9]+$ ]] || [ "$secs" -eq 0 ]; then
    echo "usage: $0 [SECONDS] [TARGET...]   (targets: ${ALL[*]})" >&2
    exit 2
fi
for t in "${targets[@]}"; do
    if [[ " ${ALL[*]} " != *" $t "* ]]; then
        echo "unknown target $t (targets: ${ALL[*]})" >&2
        exit 2
    fi
done

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root/fuzz" || exit 2

lock=()
if command -v flock >/dev/null; then
    lock=(flock "${STRATA_CARGO_LOCK:-/tmp/strata-cargo.lock}")
fi

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "error: the nightly Rust toolchain is missing; cargo-fuzz needs it:" >&2
    echo "       rustup toolchain install nightly" >&2
    exit 2
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz is missing: installing it"
    "${lock[@]}" cargo install cargo-fuzz || {
        echo "error: could not install cargo-fuzz" >&2
        exit 2
    }
fi

triple=$(rustc +nightly -vV | sed -n 's/^host: //p')
failed=0
summary=()
for t in "${targets[@]}"; do
    # Only the crates the target fuzzes: a change in progress elsewhere does not stop it.
    feat=(--no-default-features)
    [[ $SERVER == *" $t "* ]] && feat+=(--features server)
    [[ $ENGINE == *" $t "* ]] && feat+=(--features engine)
    echo "== $t: building"
    if ! "${lock[@]}" cargo +nightly fuzz build "${feat[@]}" "$t"; then
        summary+=("$t: BUILD FAILED")
        failed=1
        continue
    fi
    art="artifacts/$t"
    mkdir -p "$art" "corpus/$t"
    log="$art/run-$(date +%Y%m%d-%H%M%S).log"
    before=$(ls "$art" | grep -cE '^(crash|timeout|oom|leak|slow-unit)-')
    echo "== $t: fuzzing for $secs s (log: fuzz/$log)"
    start=$(date +%s)
    LSAN_OPTIONS="suppressions=$root/fuzz/lsan.supp${LSAN_OPTIONS:+:$LSAN_OPTIONS}" \
        nice -n 10 "target/$triple/release/$t" "corpus/$t" \
        -max_total_time="$secs" -timeout=60 -rss_limit_mb=4096 -print_final_stats=1 \
        -artifact_prefix="$art/" >"$log" 2>&1
    rc=$?
    took=$(($(date +%s) - start))
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    [ -z "$runs" ] && runs=$(sed -n 's/^Done \([0-9]*\) runs.*/\1/p' "$log" | tail -1)
    [ -z "$runs" ] && runs=$(grep -oE '^#[0-9]+' "$log" | tail -1 | tr -d '#')
    runs=${runs:-0}
    after=$(ls "$art" | grep -cE '^(crash|timeout|oom|leak|slow-unit)-')
    crashes=$(ls -t "$art" | grep -E '^(crash|timeout|oom|leak)-' | head -n $((after - before)) | tr '\n' ' ')
    line="$t: ${took}s, $runs runs, $((runs / (took > 0 ? took : 1))) exec/s"
    if [ $rc -ne 0 ] || [ "$after" -gt "$before" ]; then
        line="$line, CRASH (exit $rc) ${crashes:+-> fuzz/$art/}$crashes"
        failed=1
        grep -m1 -E 'panicked at|ERROR: (AddressSanitizer|libFuzzer|LeakSanitizer)' "$log" | sed 's/^/    /'
    else
        line="$line, no crash"
    fi
    echo "== $line"
    summary+=("$line")
done

echo
echo "== summary"
printf '%s\n' "${summary[@]}"
exit $failed
