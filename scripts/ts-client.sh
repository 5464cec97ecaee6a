#!/usr/bin/env bash
# End-to-end test of the `keel` binary over grpc-web, from the TypeScript
# client in clients/ts (@connectrpc/connect-web + protobuf-es, run with node).
#
# Installs the client's npm packages (`npm ci`), generates its code from
# proto/ with buf and protoc-gen-es, type-checks it, builds the debug binary
# (unless KEEL_BIN points at one), starts it in embedded mode (SQLite in a
# fresh temporary data dir) on a free loopback port, waits for /readyz, then
# runs the client, which prints a transcript of every call. Exits non-zero on
# the first failure, printing the tail of the server log.
#
# Needs node (20 or newer), npm, python3 and cargo; everything else
# (buf, the npm packages) is installed here.
#
# Environment:
#   KEEL_BIN                 use this binary instead of building one
#   KEEL_TS_READY_TIMEOUT    seconds to wait for readiness (default 30)
#   KEEL_LOG                 server log filter (default "info")
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${KEEL_BIN:-}" && "$KEEL_BIN" != /* ]]; then
  KEEL_BIN="$PWD/$KEEL_BIN"
fi
cd "$root"
# shellcheck source=scripts/lib.sh
source "$root/scripts/lib.sh"
client="$root/clients/ts"

ready_timeout="${KEEL_TS_READY_TIMEOUT:-30}"

log() { printf 'ts-client: %s\n' "$*" >&2; }
fail() {
  printf 'ts-client: FAIL: %s\n' "$*" >&2
  exit 1
}

command -v node >/dev/null || fail "node not found (Node.js 20 or newer is needed)"
command -v npm >/dev/null || fail "npm not found"
node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 20 ? 0 : 1)' ||
  fail "node $(node --version) is too old; the client needs Node.js 20 or newer"

# --- tools and client ----------------------------------------------------------
tools_bin="$("$root/scripts/tools.sh" | tail -n 1)"
PATH="$tools_bin:$PATH"
command -v buf >/dev/null || fail "buf not found in $tools_bin"

log "npm ci (clients/ts)"
# stdout stays the transcript: npm's summary goes to stderr with the progress.
(cd "$client" && npm ci --no-audit --no-fund --no-update-notifier --loglevel=error >&2) || fail "npm ci failed in clients/ts"
log "generating clients/ts/src/gen from proto/ (buf generate, protoc-gen-es)"
(cd "$client" && npm run --silent generate) || fail "code generation failed"
log "type-checking the client (tsc --noEmit)"
(cd "$client" && npm run --silent typecheck) || fail "the client does not type-check against the generated code"

# --- binary ------------------------------------------------------------------
if [[ -z "${KEEL_BIN:-}" ]]; then
  log "building keel (cargo build --bin keel)"
  # Ask cargo where it put the executable instead of guessing the target dir.
  KEEL_BIN="$(keel_binary)" || fail "cargo build --bin keel failed"
  [[ -n "$KEEL_BIN" ]] || fail "cargo build did not report a 'keel' executable"
fi
[[ -x "$KEEL_BIN" ]] || fail "KEEL_BIN=$KEEL_BIN is not an executable file"

# --- server ------------------------------------------------------------------
port="$(free_port)"
addr="127.0.0.1:$port"
url="http://$addr"

workdir="$(mktemp -d "${TMPDIR:-/tmp}/keel-ts-client.XXXXXX")"
data_dir="$workdir/data"
server_log="$workdir/keel.log"
mkdir -p "$data_dir"
server_pid=""

# Stops the server: SIGTERM, then SIGKILL after $1 seconds. Sets server_status,
# and server_killed=1 when SIGKILL was needed.
server_status=""
server_killed=0
stop_server() {
  local grace="$1" i
  [[ -n "$server_pid" ]] || return 0
  kill -TERM "$server_pid" 2>/dev/null || true
  for ((i = 0; i < grace * 10; i++)); do
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$server_pid" 2>/dev/null; then
    log "server did not stop within ${grace}s of SIGTERM; killing it"
    kill -KILL "$server_pid" 2>/dev/null || true
    server_killed=1
  fi
  server_status=0
  wait "$server_pid" 2>/dev/null || server_status=$?
  server_pid=""
}

cleanup() {
  local status=$?
  set +e
  stop_server 5
  if [[ $status -ne 0 ]]; then
    {
      echo "ts-client: failed (exit $status); last lines of the server log ($server_log):"
      tail -n 60 "$server_log" 2>/dev/null | sed 's/^/  | /'
    } >&2
  fi
  rm -rf "$workdir"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log "starting $KEEL_BIN serve on $addr (data dir $data_dir)"
# A clean, embedded-mode environment: whatever cluster settings the caller's
# shell carries (database, Redis, production keys) must not leak in.
env \
  -u KEEL_DATABASE_URL -u KEEL_REDIS_URL -u KEEL_AUTH_KEYS_FILE \
  -u KEEL_BOOTSTRAP_ADMIN_EMAIL -u KEEL_BOOTSTRAP_ADMIN_PASSWORD \
  KEEL_ENV=development \
  KEEL_LISTEN="$addr" \
  KEEL_DATA_DIR="$data_dir" \
  KEEL_LOG="${KEEL_LOG:-info}" \
  KEEL_LOG_FORMAT=json \
  "$KEEL_BIN" serve </dev/null >"$server_log" 2>&1 &
server_pid=$!

# --- readiness ---------------------------------------------------------------
# python3 rather than curl: the script needs no more than node, npm, python3
# and cargo.
ready() {
  python3 - "$url/readyz" <<'PY'
import sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=1) as r:
        sys.exit(0 if r.status == 200 else 1)
except Exception:
    sys.exit(1)
PY
}
deadline=$((SECONDS + ready_timeout))
while ! ready; do
  if ! kill -0 "$server_pid" 2>/dev/null; then
    server_status=0
    wait "$server_pid" 2>/dev/null || server_status=$?
    server_pid=""
    fail "server exited during startup (status $server_status)"
  fi
  if ((SECONDS >= deadline)); then
    fail "$url/readyz not 200 after ${ready_timeout}s"
  fi
  sleep 0.2
done
log "server is ready on $addr"

# --- the client ----------------------------------------------------------------
echo "\$ KEEL_URL=$url npm start   # in clients/ts"
(cd "$client" && KEEL_URL="$url" npm run --silent start) || fail "the TypeScript client failed"
echo

echo "== shutdown"
echo "\$ kill -TERM $server_pid"
stop_server 15
echo "server exited with status $server_status"
((server_killed == 0)) || fail "server ignored SIGTERM (no graceful shutdown within 15s)"
if [[ "$server_status" -ne 0 ]]; then
  log "warning: server exit status on SIGTERM was $server_status, not 0"
fi
echo

echo "ts-client: ok"
