#!/usr/bin/env bash
# schemathesis (pinned) against the debug keel binary: every operation of
# /openapi.json with `--checks all`, three times — unauthenticated, as a
# user, and as an admin that it may delete (a fresh one each run, from
# KEEL_BOOTSTRAP_ADMIN_*) — with a fixed seed and a bounded number of
# examples. Zero failures, "schema-valid request rejected" included: the
# server accepts everything its schema allows.
#
# The event stream (`GET /v1/events/stream`) never ends on its own, so its
# answers are not read to the end: it is excluded from the response checks
# (schema, content type, headers) and, when authenticated, run with a short
# request timeout answered by the stream's first bytes.
#
# Needs python3 and cargo. Installs schemathesis into a venv
# (KEEL_SCHEMATHESIS_VENV, default <repo>/.venv-schemathesis).
#
# Environment:
#   KEEL_BIN                     use this binary instead of building one
#   KEEL_SCHEMATHESIS_EXAMPLES   examples per operation and run (default 25)
#   KEEL_SCHEMATHESIS_SEED       hypothesis seed (default 20261203)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${KEEL_BIN:-}" && "$KEEL_BIN" != /* ]]; then
  KEEL_BIN="$PWD/$KEEL_BIN"
fi
cd "$root"
# shellcheck source=scripts/lib.sh
source "$root/scripts/lib.sh"

version="4.32.5"
examples="${KEEL_SCHEMATHESIS_EXAMPLES:-25}"
seed="${KEEL_SCHEMATHESIS_SEED:-20261203}"
venv="${KEEL_SCHEMATHESIS_VENV:-$root/.venv-schemathesis}"

log() { printf 'schemathesis: %s\n' "$*" >&2; }
fail() {
  printf 'schemathesis: FAIL: %s\n' "$*" >&2
  exit 1
}

# --- schemathesis ----------------------------------------------------------------
if ! "$venv/bin/schemathesis" --version 2>/dev/null | grep -q "$version"; then
  log "installing schemathesis==$version into $venv"
  [[ -x "$venv/bin/python" ]] || python3 -m venv "$venv" >&2
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "schemathesis==$version" >&2
fi
st=("$venv/bin/schemathesis" --config-file "$root/scripts/schemathesis.toml")

# --- binary ------------------------------------------------------------------------
if [[ -z "${KEEL_BIN:-}" ]]; then
  log "building keel (cargo build --bin keel)"
  KEEL_BIN="$(keel_binary)" || fail "cargo build --bin keel failed"
  [[ -n "$KEEL_BIN" ]] || fail "cargo build did not report a 'keel' executable"
fi
[[ -x "$KEEL_BIN" ]] || fail "KEEL_BIN=$KEEL_BIN is not an executable file"

workdir="$(mktemp -d "${TMPDIR:-/tmp}/keel-schemathesis.XXXXXX")"
server_pid=""
cleanup() {
  local status=$?
  set +e
  if [[ -n "$server_pid" ]]; then
    kill -TERM "$server_pid" 2>/dev/null
    wait "$server_pid" 2>/dev/null
  fi
  if [[ $status -ne 0 ]]; then
    echo "schemathesis: failed (exit $status); last lines of the server log:" >&2
    tail -n 40 "$workdir/keel.log" 2>/dev/null | sed 's/^/  | /' >&2
  fi
  rm -rf "$workdir"
  exit "$status"
}
trap cleanup EXIT

# start_server: a fresh embedded keel (new data dir, so a new bootstrap admin).
# Per-method rate limits off: a run makes ~1,400 calls as one caller, beyond
# the default 1000 a minute, and judges the contract, not the limiter.
start_server() {
  local port
  port="$(free_port)"
  url="http://127.0.0.1:$port"
  rm -rf "$workdir/data"
  mkdir -p "$workdir/data"
  env \
    -u KEEL_DATABASE_URL -u KEEL_REDIS_URL -u KEEL_AUTH_KEYS_FILE \
    KEEL_ENV=development \
    KEEL_RATE_LIMITER=off \
    KEEL_LISTEN="127.0.0.1:$port" \
    KEEL_DATA_DIR="$workdir/data" \
    KEEL_LOG="${KEEL_LOG:-warn}" \
    KEEL_BOOTSTRAP_ADMIN_EMAIL="admin@schemathesis.example" \
    KEEL_BOOTSTRAP_ADMIN_PASSWORD="schemathesis admin passphrase" \
    "$KEEL_BIN" serve </dev/null >>"$workdir/keel.log" 2>&1 &
  server_pid=$!
  wait_ready "$url/readyz" "$server_pid" 30 || fail "keel did not become ready"
}

stop_server() {
  kill -TERM "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
  server_pid=""
}

# login EMAIL PASSWORD: prints an access token.
login() {
  python3 - "$url" "$1" "$2" <<'PY'
import json, sys, urllib.request
url, email, password = sys.argv[1:]
body = json.dumps({"email": email, "password": password}).encode()
request = urllib.request.Request(f"{url}/v1/auth/login", body, {"content-type": "application/json"})
with urllib.request.urlopen(request, timeout=10) as response:
    print(json.load(response)["data"]["tokens"]["accessToken"])
PY
}

# register EMAIL PASSWORD: a user account.
register() {
  python3 - "$url" "$1" "$2" <<'PY'
import json, sys, urllib.request
url, email, password = sys.argv[1:]
body = json.dumps({"email": email, "password": password, "displayName": "schemathesis"}).encode()
request = urllib.request.Request(f"{url}/v1/auth/register", body, {"content-type": "application/json"})
urllib.request.urlopen(request, timeout=10).read()
PY
}

stream='^/v1/events/stream$'
# run NAME [schemathesis options...]: every operation but the stream with
# every check, then the stream without the response checks.
run() {
  local name="$1"
  shift
  log "$name: every operation, --checks all ($examples examples, seed $seed)"
  "${st[@]}" run "$url/openapi.json" --url "$url" \
    --checks all --seed "$seed" --max-examples "$examples" \
    --exclude-path-regex "$stream" \
    --no-color --suppress-health-check all \
    "$@" || fail "$name: schemathesis found failures"
  log "$name: the event stream, without the response checks"
  "${st[@]}" run "$url/openapi.json" --url "$url" \
    --checks all --exclude-checks response_schema_conformance,content_type_conformance,response_headers_conformance \
    --seed "$seed" --max-examples "$examples" \
    --include-path-regex "$stream" \
    --request-timeout 2 \
    --no-color --suppress-health-check all \
    "$@" || fail "$name: schemathesis found failures on the event stream"
}

start_server
run unauthenticated
stop_server

start_server
register "user@schemathesis.example" "schemathesis user passphrase"
token="$(login "user@schemathesis.example" "schemathesis user passphrase")"
run user --header "Authorization: Bearer $token"
stop_server

start_server
token="$(login "admin@schemathesis.example" "schemathesis admin passphrase")"
run admin --header "Authorization: Bearer $token"
stop_server

echo "schemathesis: ok"
