#!/usr/bin/env bash
# Builds and tests the Python client (clients/python, package keel-client)
# against a real keel.
#
# Creates a venv (clients/python/.venv), installs the pinned tools of
# clients/python/requirements.txt, builds and installs the package - its
# messages and grpcio stubs are generated from proto/ during the build -,
# runs `mypy --strict` over the package and its tests, builds the debug
# binary (unless KEEL_BIN points at one) and runs pytest: the tests start
# that binary themselves (embedded mode, temporary SQLite data dir, a free
# port; see clients/python/tests/conftest.py).
#
# Needs python3 (3.10 or newer) and cargo; everything else comes from PyPI.
#
# Environment:
#   KEEL_BIN       use this binary instead of building one
#   KEEL_PY_VENV   where the venv lives (default: clients/python/.venv)
#   PYTHON         interpreter for the venv (default: python3)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${KEEL_BIN:-}" && "$KEEL_BIN" != /* ]]; then
  KEEL_BIN="$PWD/$KEEL_BIN"
fi
cd "$root"
# shellcheck source=scripts/lib.sh
source "$root/scripts/lib.sh"
client="$root/clients/python"
venv="${KEEL_PY_VENV:-$client/.venv}"

log() { printf 'python-client: %s\n' "$*" >&2; }
fail() {
  printf 'python-client: FAIL: %s\n' "$*" >&2
  exit 1
}

# --- venv and tools ------------------------------------------------------------
if [[ ! -x "$venv/bin/python" ]]; then
  log "creating $venv"
  "${PYTHON:-python3}" -m venv "$venv" || fail "python3 -m venv failed"
fi
py="$venv/bin/python"
"$py" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' ||
  fail "$("$py" --version) is too old; the client needs Python 3.10 or newer"
log "pip install -r clients/python/requirements.txt"
"$py" -m pip install --quiet --disable-pip-version-check -r "$client/requirements.txt" ||
  fail "installing the pinned requirements failed"

# --- the package ---------------------------------------------------------------
# The build requirements are the pinned ones just installed (no isolated
# build env: same versions, no second download). A stale build/ could hold
# code generated from an older proto/.
log "building and installing keel-client (code generated from proto/)"
rm -rf "$client/build"
"$py" -m pip install --quiet --disable-pip-version-check --no-build-isolation --no-deps --force-reinstall "$client" ||
  fail "building keel-client failed"
rm -rf "$client/build" "$client"/src/*.egg-info

# mypy checks the installed package (with its generated code), not src/.
log "mypy --strict (keel_client and tests)"
(cd "$client" && "$venv/bin/mypy" --strict -p keel_client -p tests) || fail "mypy --strict found errors"

# --- binary ------------------------------------------------------------------
if [[ -z "${KEEL_BIN:-}" ]]; then
  log "building keel (cargo build --bin keel)"
  KEEL_BIN="$(keel_binary)" || fail "cargo build --bin keel failed"
  [[ -n "$KEEL_BIN" ]] || fail "cargo build did not report a 'keel' executable"
fi
[[ -x "$KEEL_BIN" ]] || fail "KEEL_BIN=$KEEL_BIN is not an executable file"

# --- tests ---------------------------------------------------------------------
log "pytest against $KEEL_BIN"
(cd "$client" && KEEL_BIN="$KEEL_BIN" "$venv/bin/pytest" -p no:cacheprovider -v) || fail "pytest failed"
echo "python-client: ok"
