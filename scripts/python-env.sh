#!/usr/bin/env bash
# Creates (idempotently) the Python virtualenv used by tests/python/*: .cache/pyenv at the
# repository root, with pinned grpcio, grpcio-reflection and protobuf (binary wheels only).
#
#   scripts/python-env.sh            # then: .cache/pyenv/bin/python tests/python/...
#
# A marker file inside the venv records the pinned set; when it matches, the script returns
# at once. Needs `python3` with the venv module (Debian: python3-venv, installed here with
# apt-get when running as root).
set -euo pipefail

# Pinned versions (grpcio-reflection 1.85.1 wants protobuf >=7.35.1,<8; grpcio wants
# typing-extensions ~=4.12, pinned too so installs are reproducible).
PINS=(
  "grpcio==1.85.1"
  "grpcio-reflection==1.85.1"
  "protobuf==7.36.2"
  "typing-extensions==4.16.0"
)

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.cache/pyenv"
MARKER="$VENV/.strata-pins"
PYTHON="${PYTHON:-python3}"

say() { echo "python-env: $*"; }
die() { echo "python-env: error: $*" >&2; exit 1; }

WANT="$("$PYTHON" --version 2>&1 || true) ${PINS[*]}"
if [[ -f "$MARKER" && -x "$VENV/bin/python" && "$(cat "$MARKER")" == "$WANT" ]]; then
  say "up to date ($VENV)"
  exit 0
fi

command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found; install Python 3 (3.9 or newer)"

# `python3 -m venv --help` works without ensurepip on Debian, so probe ensurepip as well.
if ! "$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1; then
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    say "python venv module missing; installing python3-venv with apt-get"
    apt-get update -qq || die "apt-get update failed"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv \
      || die "apt-get install python3-venv failed"
    "$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1 \
      || die "python3-venv installed but '$PYTHON -m venv' still unusable ($PYTHON may not be the system python)"
  else
    die "'$PYTHON -m venv' is unavailable; install it (Debian/Ubuntu: sudo apt-get install python3-venv) and rerun"
  fi
fi

say "creating virtualenv at $VENV"
rm -rf "$VENV"
mkdir -p "$ROOT/.cache"
"$PYTHON" -m venv "$VENV" || die "'$PYTHON -m venv $VENV' failed"

say "installing ${PINS[*]}"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --only-binary=:all: "${PINS[@]}" \
  || die "pip install failed (no network, or no wheel for $("$PYTHON" --version 2>&1) on this platform?)"

"$VENV/bin/python" -c 'import grpc, grpc_reflection, google.protobuf' \
  || die "installed packages do not import"

echo "$WANT" >"$MARKER"
say "ready ($VENV)"
