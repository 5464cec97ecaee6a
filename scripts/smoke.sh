#!/usr/bin/env bash
# End-to-end smoke test of the `keel` binary over real gRPC, with grpcurl.
#
# Builds the release binary (unless KEEL_BIN points at one), starts it in
# embedded mode (SQLite in a fresh temporary data dir) on a free loopback port,
# waits for grpc.health.v1.Health to report SERVING, then walks a user through
# Register -> Login -> GetCurrentUser and prints a transcript of every call.
# Exits non-zero on the first failure, printing the tail of the server log.
#
# Environment:
#   KEEL_BIN                 use this binary instead of building one
#   KEEL_SMOKE_PROFILE       release (default) or debug: what to build when
#                            KEEL_BIN is unset (CI takes the debug binary its
#                            test step built: a release build adds ~6 minutes)
#   KEEL_SMOKE_READY_TIMEOUT seconds to wait for readiness (default 30)
#   KEEL_LOG                 server log filter (default "info")
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${KEEL_BIN:-}" && "$KEEL_BIN" != /* ]]; then
  KEEL_BIN="$PWD/$KEEL_BIN"
fi
cd "$root"
# shellcheck source=scripts/lib.sh
source "$root/scripts/lib.sh"

ready_timeout="${KEEL_SMOKE_READY_TIMEOUT:-30}"

fail() {
  printf 'smoke: FAIL: %s\n' "$*" >&2
  exit 1
}

# --- tools -------------------------------------------------------------------
tools_bin="$("$root/scripts/tools.sh" | tail -n 1)"
PATH="$tools_bin:$PATH"
command -v grpcurl >/dev/null || fail "grpcurl not found in $tools_bin"

# --- binary ------------------------------------------------------------------
if [[ -z "${KEEL_BIN:-}" ]]; then
  echo "smoke: building keel (${KEEL_SMOKE_PROFILE:-release} profile)" >&2
  # Ask cargo where it put the executable instead of guessing the target dir
  # (CARGO_TARGET_DIR, .cargo/config.toml, ...). Diagnostics and progress still
  # go to stderr; the JSON messages on stdout are only parsed.
  case "${KEEL_SMOKE_PROFILE:-release}" in
    release) KEEL_BIN="$(keel_binary --release)" || fail "cargo build --release --bin keel failed" ;;
    debug) KEEL_BIN="$(keel_binary)" || fail "cargo build --bin keel failed" ;;
    *) fail "KEEL_SMOKE_PROFILE=${KEEL_SMOKE_PROFILE} (release or debug)" ;;
  esac
  [[ -n "$KEEL_BIN" ]] || fail "cargo build did not report a 'keel' executable"
fi
[[ -x "$KEEL_BIN" ]] || fail "KEEL_BIN=$KEEL_BIN is not an executable file"

# --- server ------------------------------------------------------------------
port="$(free_port)"
addr="127.0.0.1:$port"

workdir="$(mktemp -d "${TMPDIR:-/tmp}/keel-smoke.XXXXXX")"
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
    echo "smoke: server did not stop within ${grace}s of SIGTERM; killing it" >&2
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
      echo "smoke: failed (exit $status); last lines of the server log ($server_log):"
      tail -n 60 "$server_log" 2>/dev/null | sed 's/^/  | /'
    } >&2
  fi
  rm -rf "$workdir"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

echo "smoke: starting $KEEL_BIN serve on $addr (data dir $data_dir)" >&2
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
  KEEL_REFLECTION=true \
  "$KEEL_BIN" serve </dev/null >"$server_log" 2>&1 &
server_pid=$!

# --- readiness ---------------------------------------------------------------
deadline=$((SECONDS + ready_timeout))
while :; do
  if ! kill -0 "$server_pid" 2>/dev/null; then
    server_status=0
    wait "$server_pid" 2>/dev/null || server_status=$?
    server_pid=""
    fail "server exited during startup (status $server_status)"
  fi
  if health="$(grpcurl -plaintext -connect-timeout 1 -max-time 2 "$addr" grpc.health.v1.Health/Check 2>/dev/null)" &&
    grep -q '"SERVING"' <<<"$health"; then
    break
  fi
  if ((SECONDS >= deadline)); then
    fail "server not SERVING on $addr after ${ready_timeout}s"
  fi
  sleep 0.2
done
echo "smoke: server is SERVING on $addr" >&2

# --- transcript helpers --------------------------------------------------------
token=""

# Quotes one argument for display so the transcript can be pasted into a shell.
# The access token is shown as "$TOKEN" rather than in full.
show_arg() {
  local a="$1"
  if [[ -n "$token" && "$a" == *"$token"* ]]; then
    a="${a//"$token"/\$TOKEN}"
    printf '"%s"' "$a"
  elif [[ "$a" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$a"
  else
    printf "'%s'" "${a//\'/\'\\\'\'}"
  fi
}

show_cmd() {
  local first=1 a
  printf '$ '
  for a in "$@"; do
    ((first)) || printf ' '
    first=0
    show_arg "$a"
  done
  printf '\n'
}

# Prints command output with long token values (accessToken, refreshToken, ...)
# shortened: the transcript stays readable and does not carry credentials.
show_output() {
  sed -E 's/("[A-Za-z_]*[Tt]oken" *: *")([^"]{12})[^"]{4,}"/\1\2..."/g' <<<"$1"
  echo
}

# run CMD...: shows the command, runs it, prints its output, leaves it in $out.
# Fails the smoke test if the command fails.
out=""
run() {
  show_cmd "$@"
  local rc=0
  out="$("$@" 2>&1)" || rc=$?
  show_output "$out"
  ((rc == 0)) || fail "command exited with status $rc: $*"
}

# run_expect_fail CMD...: as run, but the command must fail; status in $rc_out.
rc_out=0
run_expect_fail() {
  show_cmd "$@"
  rc_out=0
  out="$("$@" 2>&1)" || rc_out=$?
  show_output "$out"
  ((rc_out != 0)) || fail "command was expected to fail but succeeded: $*"
}

# json_get PATH: reads JSON on stdin, prints the value at a dotted PATH.
# grpcurl prints proto field names (access_token) while the proto3 JSON mapping
# uses lowerCamelCase (accessToken): each key is looked up in either spelling.
json_get() {
  python3 -c '
import json, re, sys
def spellings(key):
    snake = re.sub(r"(?<=[a-z0-9])([A-Z])", lambda m: "_" + m.group(1).lower(), key)
    camel = re.sub(r"_([a-z0-9])", lambda m: m.group(1).upper(), key)
    return [key, snake, camel]
try:
    value = json.load(sys.stdin)
    for key in sys.argv[1].split("."):
        value = value[next((k for k in spellings(key) if k in value), key)]
except (ValueError, KeyError, TypeError) as e:
    sys.exit("json_get %s: %s: %s" % (sys.argv[1], type(e).__name__, e))
print(value)
' "$1"
}

expect_contains() { # expect_contains HAYSTACK NEEDLE WHAT
  grep -qF -- "$2" <<<"$1" || fail "$3: expected to find '$2'"
}

# --- the walk ------------------------------------------------------------------
grpc=(grpcurl -plaintext -max-time 20)
suffix="$(python3 -c 'import secrets; print(secrets.token_hex(6))')"
email="smoke-$suffix@example.com"
password="correct horse battery staple"
display_name="Smoke Test $suffix"

echo "== reflection"
run "${grpc[@]}" "$addr" list
for svc in grpc.health.v1.Health keel.identity.v1.IdentityCommandService keel.identity.v1.IdentityQueryService; do
  expect_contains "$out" "$svc" "service list"
done

run "${grpc[@]}" "$addr" describe keel.identity.v1.IdentityCommandService
expect_contains "$out" "rpc Register" "describe IdentityCommandService"
expect_contains "$out" "rpc Login" "describe IdentityCommandService"

echo "== register"
req="$(python3 -c 'import json, sys; print(json.dumps({"email": sys.argv[1], "password": sys.argv[2], "display_name": sys.argv[3]}))' \
  "$email" "$password" "$display_name")"
run "${grpc[@]}" -d "$req" "$addr" keel.identity.v1.IdentityCommandService/Register
got="$(json_get user.email <<<"$out")" || fail "Register response has no user.email"
[[ "$got" == "$email" ]] || fail "Register returned email '$got', expected '$email'"

echo "== login"
req="$(python3 -c 'import json, sys; print(json.dumps({"email": sys.argv[1], "password": sys.argv[2]}))' \
  "$email" "$password")"
run "${grpc[@]}" -d "$req" "$addr" keel.identity.v1.IdentityCommandService/Login
token="$(json_get tokens.accessToken <<<"$out")" || fail "Login response has no tokens.accessToken"
[[ -n "$token" ]] || fail "Login returned an empty access token"
got="$(json_get user.email <<<"$out")" || fail "Login response has no user.email"
[[ "$got" == "$email" ]] || fail "Login returned email '$got', expected '$email'"
printf '$ TOKEN=...  # tokens.access_token from the Login response above\n\n'

echo "== current user"
run "${grpc[@]}" -H "authorization: Bearer $token" "$addr" keel.identity.v1.IdentityQueryService/GetCurrentUser
got="$(json_get user.email <<<"$out")" || fail "GetCurrentUser response has no user.email"
[[ "$got" == "$email" ]] || fail "GetCurrentUser returned email '$got', expected '$email'"

echo "== current user without credentials (must be Unauthenticated)"
run_expect_fail "${grpc[@]}" "$addr" keel.identity.v1.IdentityQueryService/GetCurrentUser
expect_contains "$out" "Code: Unauthenticated" "GetCurrentUser without authorization"

echo "== the same over REST, with curl"
run curl -sS -X POST "http://$addr/v1/auth/login" -H 'content-type: application/json' \
  -d "{\"email\": \"$email\", \"password\": \"$password\"}" -o /dev/null -w '%{http_code}\n'
expect_contains "$out" "200" "REST login"
run curl -sS "http://$addr/v1/users/me" -H "authorization: Bearer $token"
expect_contains "$out" "\"email\":\"$email\"" "REST GET /v1/users/me"
run curl -sS -o /dev/null -w '%{http_code}\n' "http://$addr/v1/users/me"
expect_contains "$out" "401" "REST GET /v1/users/me without a token"
run curl -sS -o /dev/null -w '%{http_code}\n' "http://$addr/openapi.json"
expect_contains "$out" "200" "GET /openapi.json"
echo

echo "== shutdown"
show_cmd kill -TERM "$server_pid"
stop_server 15
echo "server exited with status $server_status"
((server_killed == 0)) || fail "server ignored SIGTERM (no graceful shutdown within 15s)"
if [[ "$server_status" -ne 0 ]]; then
  echo "smoke: warning: server exit status on SIGTERM was $server_status, not 0" >&2
fi
echo

echo "smoke: ok"
