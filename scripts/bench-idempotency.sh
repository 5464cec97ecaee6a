#!/usr/bin/env bash
# A write with and without an idempotency key, side by side in one run
# (issue 12): UpdateUser as REST (PATCH /v1/users/{id}?updateMask=displayName,
# the admin, wrk HTTP/1.1), keel on PostgreSQL. Rounds alternate (no key,
# key, no key, key, ...) so that both rows see the same machine; each keyed
# call has a key of its own, so each one runs and writes its record (the
# cost a client pays for retry safety). Prints req/s, p50 and p99 per row
# (the median round) and the ratio keyed / unkeyed. A round where more than
# 1% of the calls failed fails the run; fewer are reported.
#
# Every call in flight updates a different user (a free list refilled from
# the replies), so optimistic concurrency never aborts one.
#
# Environment (defaults in brackets):
#   KEEL_BIN            use this binary instead of building one
#   BENCH_DATABASE_URL  PostgreSQL; keel works in a fresh schema, dropped at exit
#                       [$KEEL_TEST_DATABASE_URL, else postgres://postgres@127.0.0.1:5432/test]
#   BENCH_DURATION      seconds per round [5]
#   BENCH_ROUNDS        rounds per row [3]
#   BENCH_CONCURRENCY   calls in flight [20]
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${KEEL_BIN:-}" && "$KEEL_BIN" != /* ]]; then
  KEEL_BIN="$PWD/$KEEL_BIN"
fi
cd "$root"
# shellcheck source=scripts/lib.sh
source "$root/scripts/lib.sh"

server_url="${BENCH_DATABASE_URL:-${KEEL_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}}"
duration="${BENCH_DURATION:-5}"
rounds="${BENCH_ROUNDS:-3}"
concurrency="${BENCH_CONCURRENCY:-20}"

say() { printf 'bench-idempotency: %s\n' "$*" >&2; }
fail() {
  printf 'bench-idempotency: FAIL: %s\n' "$*" >&2
  exit 1
}
for setting in duration rounds concurrency; do
  [[ "${!setting}" =~ ^[0-9]+$ && "${!setting}" -ge 1 ]] || fail "$setting must be a whole number of at least 1"
done

install() {
  say "installing $* (apt-get)"
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2
}
command -v wrk >/dev/null || install wrk
command -v psql >/dev/null || install postgresql-client
command -v curl >/dev/null || install curl

if [[ -z "${KEEL_BIN:-}" ]]; then
  say "building keel (cargo build --release --bin keel)"
  KEEL_BIN="$(keel_binary --release)" || fail "cargo build --release --bin keel failed"
fi
[[ -x "$KEEL_BIN" ]] || fail "KEEL_BIN=$KEEL_BIN is not an executable file"

workdir="$(mktemp -d "${TMPDIR:-/tmp}/keel-bench-idempotency.XXXXXX")"
schema="keel_bench_idem_$$_$RANDOM"
server_pid=""
cleanup() {
  if [[ -n "$server_pid" ]]; then
    kill -TERM "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  psql -X -q "$server_url" -c "DROP SCHEMA IF EXISTS \"$schema\" CASCADE" >/dev/null 2>&1 || true
  rm -rf "$workdir"
}
trap cleanup EXIT

psql -X -q "$server_url" -c "CREATE SCHEMA \"$schema\"" >/dev/null || fail "PostgreSQL at $server_url: cannot create a schema"
port="$(free_port)"
base="http://127.0.0.1:$port"
password="correct horse battery staple"
# Per-method rate limits off: one admin's calls at full speed pass the
# default 1000 a minute within a second, and this measures the keys alone.
KEEL_RATE_LIMITER=off KEEL_LISTEN="127.0.0.1:$port" KEEL_DATA_DIR="$workdir/data" \
  KEEL_DATABASE_URL="$server_url" KEEL_DATABASE_SCHEMA="$schema" \
  KEEL_BOOTSTRAP_ADMIN_EMAIL=admin@example.com KEEL_BOOTSTRAP_ADMIN_PASSWORD="$password" \
  KEEL_ACCESS_TOKEN_TTL_SECONDS=86400 KEEL_LOG=warn KEEL_LOG_FORMAT=json \
  "$KEEL_BIN" serve >"$workdir/keel.log" 2>&1 &
server_pid=$!
for _ in $(seq 240); do
  curl -sf --max-time 2 "$base/readyz" >/dev/null && break
  kill -0 "$server_pid" 2>/dev/null || fail "keel exited: $(tail -n 5 "$workdir/keel.log")"
  sleep 0.25
done

field() { python3 -c 'import json, sys
value = json.load(sys.stdin)
for key in sys.argv[1:]:
    value = value[key]
print(value)' "$@"; }
admin_token="$(curl -sf -H 'content-type: application/json' \
  -d "{\"email\":\"admin@example.com\",\"password\":\"$password\"}" "$base/v1/auth/login" | field data tokens accessToken)" ||
  fail "the admin's login failed"

# The users the writes update: copies of the admin row with fresh ids.
users=$((2 * concurrency))
python3 -c 'import uuid, sys
for _ in range(int(sys.argv[1])): print(uuid.uuid4())' "$users" >"$workdir/users.txt"
{
  echo "SET search_path = \"$schema\";"
  n=0
  while read -r id; do
    n=$((n + 1))
    echo "INSERT INTO users (id, user_id, email, email_key, display_name, display_name_key, role, password_hash, version, created_at, updated_at)
      SELECT '$id', '$id', 'w$n@example.com', 'w$n@example.com', 'W$n', 'w$n', 'user', password_hash, 1, now(), now()
      FROM users WHERE email_key = 'admin@example.com';"
  done <"$workdir/users.txt"
} | psql -X -q -v ON_ERROR_STOP=1 "$server_url" >/dev/null || fail "seeding the users failed"

# wrk: UpdateUser with a free list of users; `keyed` adds a new key per call.
cat >"$workdir/update.lua" <<'EOF'
local free, n, tag, token, keyed = {}, 0, "", "", false
init = function(args)
  token, keyed = args[1], args[3] == "keyed"
  math.randomseed(os.time())
  tag = os.time() .. "-" .. math.random(1000000000)
  for line in io.lines(args[2]) do free[#free + 1] = line end
end
request = function()
  local id = table.remove(free) or "00000000-0000-7000-8000-000000000000"
  n = n + 1
  local headers = { ["authorization"] = "Bearer " .. token, ["content-type"] = "application/json" }
  if keyed then headers["idempotency-key"] = "bench-" .. tag .. "-" .. n end
  return wrk.format("PATCH", "/v1/users/" .. id .. "?updateMask=displayName", headers,
    '{"displayName":"Bench ' .. tag .. "-" .. n .. '"}')
end
response = function(status, headers, body)
  local id = body:match('"user":{"id":"([0-9a-f-]+)"')
  if id then free[#free + 1] = id end
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('{"requests":%d,"duration_us":%d,"errors":%d,"p50_us":%d,"p99_us":%d}\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
EOF

run() { # run MODE SECONDS OUT
  wrk -t1 -c"$concurrency" -d"$2s" --timeout 10s -s "$workdir/update.lua" "$base" -- \
    "$admin_token" "$workdir/users.txt" "$1" >"$3" 2>&1 || fail "wrk failed: $(tail -n 5 "$3")"
}
say "warm-up"
run plain 2 "$workdir/warm-plain"
run keyed 2 "$workdir/warm-keyed"
for round in $(seq "$rounds"); do
  for mode in plain keyed; do
    say "round $round: $mode (${duration} s, $concurrency in flight)"
    run "$mode" "$duration" "$workdir/$mode-$round"
  done
done
records="$(psql -X -qAt "$server_url" -c "SELECT count(*) FROM \"$schema\".kernel_idempotency")"

python3 - "$workdir" "$rounds" "$records" <<'EOF'
import json, statistics, sys
workdir, rounds, records = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rows = {}
for mode in ("plain", "keyed"):
    results = []
    for r in range(1, rounds + 1):
        line = [l for l in open(f"{workdir}/{mode}-{r}") if l.startswith("{")][-1]
        result = json.loads(line)
        if result["errors"] > result["requests"] / 100:
            sys.exit(f"bench-idempotency: FAIL: {mode} round {r}: {result['errors']} of {result['requests']} calls failed")
        if result["errors"]:
            print(f"bench-idempotency: WARNING: {mode} round {r}: {result['errors']} of {result['requests']} calls failed", file=sys.stderr)
        result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
        results.append(result)
    rows[mode] = sorted(results, key=lambda result: result["rps"])[len(results) // 2]
    rows[mode]["all"] = [round(result["rps"]) for result in results]
print("| write (UpdateUser, REST) | req/s (median round) | p50 ms | p99 ms | rounds req/s |")
print("|---|---|---|---|---|")
for mode, label in (("plain", "without a key"), ("keyed", "with a new key each call")):
    row = rows[mode]
    print(f"| {label} | {row['rps']:.0f} | {row['p50_us'] / 1000:.2f} | {row['p99_us'] / 1000:.2f} | {row['all']} |")
ratio = rows["keyed"]["rps"] / rows["plain"]["rps"]
print(f"\nratio keyed / unkeyed: {ratio:.2f} (target 0.8); {records} idempotency records written")
EOF
