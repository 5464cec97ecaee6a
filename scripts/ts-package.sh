#!/usr/bin/env bash
# The TypeScript package as a team gets it: packs clients/ts (@keel/client:
# the generated code of every module plus createKeelClient) with `npm pack`,
# installs the tarball into an empty temporary project, type-checks
# clients/ts/examples/first-call.ts there with tsc (strict, no skipLibCheck:
# the package's own declarations are checked too), and runs it with node
# against a real keel: the debug binary (unless KEEL_BIN points at one) in
# embedded mode on a temporary data dir and a free port. The example must
# print the email of the user it logged in as. Then
# clients/ts/examples/session-check.ts, built the same way, checks the
# session handling of createKeelClient on that server (its access tokens
# live 4 s): one refresh for eight concurrent calls, decoded BadRequest
# details, logout.
#
# Needs node (20 or newer), npm, python3 and cargo; buf and the npm packages
# are installed here.
#
# Environment:
#   KEEL_BIN                 use this binary instead of building one
#   KEEL_TS_READY_TIMEOUT    seconds to wait for readiness (default 30)
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

log() { printf 'ts-package: %s\n' "$*" >&2; }
fail() {
  printf 'ts-package: FAIL: %s\n' "$*" >&2
  exit 1
}

command -v node >/dev/null || fail "node not found (Node.js 20 or newer is needed)"
command -v npm >/dev/null || fail "npm not found"

workdir="$(mktemp -d "${TMPDIR:-/tmp}/keel-ts-package.XXXXXX")"
server_pid=""
cleanup() {
  local status=$?
  set +e
  if [[ -n "$server_pid" ]]; then
    kill -TERM "$server_pid" 2>/dev/null
    wait "$server_pid" 2>/dev/null
  fi
  if [[ $status -ne 0 && -f "$workdir/keel.log" ]]; then
    echo "ts-package: failed (exit $status); last lines of the server log:" >&2
    tail -n 40 "$workdir/keel.log" | sed 's/^/  | /' >&2
  fi
  rm -rf "$workdir"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- pack ----------------------------------------------------------------------
tools_bin="$("$root/scripts/tools.sh" | tail -n 1)"
PATH="$tools_bin:$PATH"
log "npm ci, generate (buf), pack (clients/ts)"
(cd "$client" && npm ci --no-audit --no-fund --no-update-notifier --loglevel=error >&2) || fail "npm ci failed in clients/ts"
(cd "$client" && npm run --silent generate) || fail "code generation failed"
rm -rf "$client/dist"
tarball="$(cd "$client" && npm pack --silent --pack-destination "$workdir" | tail -n 1)"
[[ -f "$workdir/$tarball" ]] || fail "npm pack did not write a tarball"
contents="$(tar -tzf "$workdir/$tarball")"
log "packed $tarball: $(wc -l <<<"$contents") files"
# (a here-string, not a pipe: grep -q would close it early under pipefail)
grep -qx 'package/dist/gen/keel/events/v1/queries_pb.d.ts' <<<"$contents" ||
  fail "the tarball lacks the generated events module"

# --- an empty project that installs it -------------------------------------------
project="$workdir/project"
mkdir -p "$project"
cat >"$project/package.json" <<JSON
{ "name": "keel-first-call", "private": true, "type": "module",
  "dependencies": { "@keel/client": "file:../$tarball" } }
JSON
(cd "$project" && npm install --no-audit --no-fund --no-update-notifier --loglevel=error >&2) ||
  fail "npm install of the tarball failed"
[[ ! -e "$project/node_modules/@keel/client/src" ]] || fail "the package ships its sources"

# --- server ----------------------------------------------------------------------
if [[ -z "${KEEL_BIN:-}" ]]; then
  log "building keel (cargo build --bin keel)"
  KEEL_BIN="$(keel_binary)" || fail "cargo build --bin keel failed"
  [[ -n "$KEEL_BIN" ]] || fail "cargo build did not report a 'keel' executable"
fi
port="$(free_port)"
url="http://127.0.0.1:$port"
mkdir -m 700 "$workdir/data"
env -u KEEL_DATABASE_URL -u KEEL_REDIS_URL -u KEEL_AUTH_KEYS_FILE \
  -u KEEL_BOOTSTRAP_ADMIN_EMAIL -u KEEL_BOOTSTRAP_ADMIN_PASSWORD \
  KEEL_ENV=development KEEL_LISTEN="127.0.0.1:$port" KEEL_DATA_DIR="$workdir/data" \
  KEEL_LOG=info KEEL_LOG_FORMAT=json KEEL_ACCESS_TOKEN_TTL_SECONDS=4 \
  "$KEEL_BIN" serve </dev/null >"$workdir/keel.log" 2>&1 &
server_pid=$!

# Readiness, then the user the example logs in as (registered over REST:
# the example's five lines are the first call, not the sign-up).
python3 - "$url" "$ready_timeout" <<'PY' || fail "keel did not become ready, or registering failed"
import json, sys, time, urllib.request
url, timeout = sys.argv[1], float(sys.argv[2])
deadline = time.monotonic() + timeout
while True:
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=1) as r:
            if r.status == 200:
                break
    except Exception:
        pass
    if time.monotonic() > deadline:
        sys.exit(f"{url}/readyz not 200 after {timeout}s")
    time.sleep(0.2)
body = json.dumps({"email": "ada@example.com", "password": "correct horse battery staple",
                   "display_name": "Ada"}).encode()
request = urllib.request.Request(url + "/v1/auth/register", data=body,
                                 headers={"content-type": "application/json"})
with urllib.request.urlopen(request, timeout=30) as r:
    assert r.status == 201, r.status
PY
log "keel ready on $url, ada@example.com registered"

# --- the example: type-check, then run ------------------------------------------------
# The example as the README shows it, pointed at this server.
sed "s|http://127.0.0.1:8080|$url|" "$client/examples/first-call.ts" >"$project/first-call.ts"
cp "$client/examples/tsconfig.json" "$client/examples/session-check.ts" "$project/"
echo "\$ cat first-call.ts"
cat "$project/first-call.ts"
log "tsc (the installed package's types, strict)"
(cd "$project" && "$client/node_modules/.bin/tsc" -p .) || fail "the example does not type-check against the installed package"
echo "\$ node dist/first-call.js"
first_call_status=0
output="$(cd "$project" && node dist/first-call.js)" || first_call_status=$?
echo "$output"
((first_call_status == 0)) || fail "the example failed (exit $first_call_status)"
[[ "$output" == "ada@example.com" ]] || fail "the example printed '$output', not ada@example.com"
echo "\$ node dist/session-check.js $url ada@example.com ***"
(cd "$project" && node dist/session-check.js "$url" ada@example.com "correct horse battery staple") ||
  fail "createKeelClient's session handling failed"
echo "ts-package: ok"
