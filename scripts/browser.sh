#!/usr/bin/env bash
# Keel in headless Chromium: clients/ts/browser/{docs,eventsource,client}.mjs
# against the debug binary.
#
#   docs.mjs         /docs with every request to another origin blocked:
#                    Swagger UI from the binary lists the operations, no CSP
#                    error, a screenshot (docs.png in the artifacts dir);
#   eventsource.mjs  a page of another origin signs in over REST, gets a
#                    stream ticket, follows its events with `new
#                    EventSource(...)`; the connection is cut and Chromium
#                    reconnects on its own with Last-Event-ID, no gap or repeat;
#   client.mjs       the generated TypeScript client (connect-web), bundled
#                    with esbuild into a page of another origin: register,
#                    login, getCurrentUser over every transport in its list.
#
# Installs what it needs: Debian's `chromium` with apt-get when missing (as
# root, non-interactive), buf (scripts/tools.sh), the npm packages of
# clients/ts and clients/ts/browser (`npm ci`: playwright-core drives the
# system Chromium, no browser download). Builds the debug binary (unless
# KEEL_BIN points at one) and starts it in embedded mode on a fresh SQLite
# data dir on a free loopback port, in development (loopback CORS origins
# allowed). Exits non-zero on the first failure, with the server log's tail.
#
# Environment:
#   KEEL_BIN                 use this binary instead of building one
#   CHROMIUM                 the Chromium executable (default: chromium on PATH)
#   KEEL_BROWSER_ARTIFACTS   where screenshots go (default target/browser)
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
browser="$client/browser"

log() { printf 'browser: %s\n' "$*" >&2; }
fail() {
  printf 'browser: FAIL: %s\n' "$*" >&2
  exit 1
}

command -v node >/dev/null || fail "node not found (Node.js 20 or newer is needed)"
command -v npm >/dev/null || fail "npm not found"

# --- chromium ------------------------------------------------------------------
if [[ -z "${CHROMIUM:-}" ]]; then
  if ! command -v chromium >/dev/null; then
    [[ "$(id -u)" == 0 ]] || fail "chromium is missing; install it: sudo apt-get install -y --no-install-recommends chromium"
    log "installing Debian's chromium (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2 || fail "apt-get update failed"
    apt-get install -y -qq --no-install-recommends chromium >&2 </dev/null || fail "apt-get install chromium failed"
  fi
  CHROMIUM="$(command -v chromium)"
fi
export CHROMIUM
log "$("$CHROMIUM" --version 2>/dev/null | head -n 1)"

# --- tools, client, test packages ---------------------------------------------
tools_bin="$("$root/scripts/tools.sh" | tail -n 1)"
PATH="$tools_bin:$PATH"
log "npm ci (clients/ts, clients/ts/browser)"
(cd "$client" && npm ci --no-audit --no-fund --no-update-notifier --loglevel=error >&2) || fail "npm ci failed in clients/ts"
(cd "$browser" && npm ci --no-audit --no-fund --no-update-notifier --loglevel=error >&2) || fail "npm ci failed in clients/ts/browser"
log "generating clients/ts/src/gen (buf generate)"
(cd "$client" && npm run --silent generate) || fail "code generation failed"

# --- binary --------------------------------------------------------------------
if [[ -z "${KEEL_BIN:-}" ]]; then
  log "building keel (cargo build --bin keel)"
  KEEL_BIN="$(keel_binary)" || fail "cargo build --bin keel failed"
  [[ -n "$KEEL_BIN" ]] || fail "cargo build did not report a 'keel' executable"
fi
[[ -x "$KEEL_BIN" ]] || fail "KEEL_BIN=$KEEL_BIN is not an executable file"

# --- server --------------------------------------------------------------------
port="$(free_port)"
addr="127.0.0.1:$port"
url="http://$addr"
workdir="$(mktemp -d "${TMPDIR:-/tmp}/keel-browser.XXXXXX")"
data_dir="$workdir/data"
server_log="$workdir/keel.log"
mkdir -p "$data_dir"
artifacts="${KEEL_BROWSER_ARTIFACTS:-$root/target/browser}"
mkdir -p "$artifacts"
server_pid=""

cleanup() {
  local status=$?
  set +e
  if [[ -n "$server_pid" ]]; then
    kill -TERM "$server_pid" 2>/dev/null
    wait "$server_pid" 2>/dev/null
  fi
  if [[ $status -ne 0 ]]; then
    {
      echo "browser: failed (exit $status); last lines of the server log ($server_log):"
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

deadline=$((SECONDS + 30))
until python3 -c '
import sys, urllib.request
try:
    sys.exit(0 if urllib.request.urlopen(sys.argv[1], timeout=1).status == 200 else 1)
except Exception:
    sys.exit(1)
' "$url/readyz"; do
  kill -0 "$server_pid" 2>/dev/null || fail "server exited during startup"
  ((SECONDS < deadline)) || fail "$url/readyz not 200 after 30s"
  sleep 0.2
done
log "server is ready on $addr"

# --- the tests -------------------------------------------------------------------
passed=0
failed=0
for test in docs eventsource client; do
  echo "== $test.mjs"
  if (cd "$browser" && KEEL_URL="$url" KEEL_BROWSER_ARTIFACTS="$artifacts" node "$test.mjs"); then
    passed=$((passed + 1))
  else
    failed=$((failed + 1))
    log "$test.mjs failed"
  fi
  echo
done
# The server never logs a stream ticket (the eventsource test used one).
if grep -q 'ticket=[A-Za-z0-9_-]\{20,\}' "$server_log"; then
  log "a stream ticket appears in the server log"
  failed=$((failed + 1))
fi
echo "browser: screenshots in $artifacts"
echo "browser: $passed passed, $failed failed"
((failed == 0)) || exit 1
