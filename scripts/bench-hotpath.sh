#!/usr/bin/env bash
# The hot path on PostgreSQL, keel beside the database's own limit, in one run
# (issue 9). Prints one table:
#
#   | call | req/s | limit (pgbench, same statements, same concurrency) | ratio |
#   | keel CPU µs/call | p50 | p99 | RSS | db xacts/call | db CPU µs/call | targets |
#
# Rows:
#   - GetCurrentUser as REST (GET /v1/users/me, wrk, HTTP/1.1), native gRPC
#     and grpc-web (h2load, h2c), each with the bench user's bearer token;
#   - GetUser by id as REST (GET /v1/users/{id}, the admin reading the user);
#   - UpdateUser changing display_name as REST (PATCH /v1/users/{id}
#     ?updateMask=displayName, the admin; every call in flight updates a
#     different user, so optimistic concurrency never aborts one);
#   - idle: database transactions per second while keel has nothing to do
#     (pg_stat_database of keel's own database, the probe's queries removed);
#   - the limits, pgbench -M prepared at the same concurrency on the same rows:
#     the two-statement read keel runs for an authenticated read today (the
#     session joined with its user by session id, then the user by id),
#     measured before, between and after the read rows (each read row is
#     compared with the mean of the runs beside it); the write transaction
#     (session+user lookup, BEGIN, SELECT user, UPDATE users ... WHERE id AND
#     version, INSERT INTO events, COMMIT; the events row goes to a copy of
#     keel's events table, same indexes, so keel's relay never sees it).
#
# Every read row's limit is the two-statement read, so doing less database
# work than today shows as a ratio above 1. keel is idle while pgbench runs.
# The write's target is the write with its outbox row: while keel's
# UpdateUser writes none, its row says so (and the ratio flatters keel).
#
# Measured per row: keel's CPU (utime+stime of all its threads, /proc/PID/stat)
# over the load / successful calls; VmRSS at the end of the load and the peak
# VmHWM (/proc/PID/status); p50/p99 from the load tool; database transactions
# per call (xact_commit+xact_rollback of keel's database); the CPU of the
# PostgreSQL backends connected to keel's database per call (sampled every
# 0.2 s, approximate). Other processes' CPU on the machine is measured too: a
# WARNING says when the machine was busy (parallel builds), since the
# figures are then noisy.
#
# Checks: every call of every load succeeded (HTTP 2xx, no socket error or
# timeout; gRPC and grpc-web: every reply body exactly the size of a
# successful one, which a gRPC error has not); each call once with curl before
# and after the load; each UpdateUser and each pgbench write changed its row
# (users.version). Any failure exits non-zero.
#
# Setup: a fresh PostgreSQL database (CREATE DATABASE keel_bench_<pid>, keel in
# its schema `keel`; dropped at exit). When the role may not create databases,
# a fresh schema in the given database instead (then other clients of that
# database count in the idle and per-call transaction figures: a WARNING says
# so). keel on a free loopback port with a bootstrap admin; one user registers
# and logs in over REST; the users the write row updates are inserted with SQL.
#
# Installs what it needs when missing (apt-get): wrk, h2load (nghttp2-client),
# pgbench and psql (postgresql-client), curl, taskset (util-linux), python3.
# Builds the release binary unless KEEL_BIN is set.
#
# Environment (defaults in brackets):
#   KEEL_BIN              use this binary instead of building one
#   BENCH_DATABASE_URL    the PostgreSQL server (and database to connect to
#                         first) [$KEEL_TEST_DATABASE_URL, else
#                         postgres://postgres@127.0.0.1:5432/test]
#   BENCH_REDIS_URL       also give keel this KEEL_REDIS_URL [unset: in-process bus]
#   BENCH_RATE_LIMITS     KEEL_RATE_LIMITS of keel [default=1000000000/60: counted, never refused]
#   BENCH_DURATION        seconds of load per row [10]
#   BENCH_WARMUP          seconds of warm-up per row, not measured [2]
#   BENCH_CONCURRENCY     calls in flight, keel and pgbench alike [50]
#   BENCH_H2_STREAMS      gRPC / grpc-web: streams per HTTP/2 connection; the
#                         connections are BENCH_CONCURRENCY / this [10]
#   BENCH_IDLE_SECONDS    length of the idle measurement [60]
#   BENCH_IDLE_SETTLE     seconds keel rests before it [12: PostgreSQL flushes an idle backend's statistics within 10 s]
#   BENCH_WRITE_USERS     users the write row spreads over [2 x concurrency]
#   BENCH_KEEL_CPUS       taskset -c list for keel [unset: not pinned]
#   BENCH_LOAD_CPUS       taskset -c list for wrk, h2load, pgbench [unset: not pinned]
#   BENCH_OUT             also write the table (Markdown) to this file
#   BENCH_KEEP            1: keep the work dir (server log, tool outputs) [0]
#   BENCH_TRACING         1: the tracing rows (below) [1]; 0 skips them;
#                         only: the tracing rows alone (no other row or table)
#   BENCH_TRACING_ROUNDS  rounds of the three tracing rows [1]
#   BENCH_SINK_BIN        the OTLP sink binary [built: cargo build --release
#                         -p keel-server --example otlp_sink]
#
# Observability rows (issue 13), after the others: the REST read of rest-me
# again, on keel restarted on the same database four times: metrics off
# (KEEL_METRICS=false) and tracing off; metrics on (the default) and tracing
# off; then spans exported (KEEL_OTLP_ENDPOINT) at KEEL_TRACE_SAMPLE_RATIO 1.0
# and 0.01 to a local OTLP sink that accepts and drops them
# (crates/server/examples/otlp_sink.rs). The metrics row's ratio is against
# metrics off, each traced row's against tracing off (metrics on), in the
# same round; with BENCH_TRACING_ROUNDS > 1 the rows
# are the means of the rounds and the per-round ratios are printed too.
# A second table prints them.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${KEEL_BIN:-}" && "$KEEL_BIN" != /* ]]; then
  KEEL_BIN="$PWD/$KEEL_BIN"
fi
if [[ -n "${BENCH_OUT:-}" && "$BENCH_OUT" != /* ]]; then
  BENCH_OUT="$PWD/$BENCH_OUT"
fi
cd "$root"
# shellcheck source=scripts/lib.sh
source "$root/scripts/lib.sh"

server_url="${BENCH_DATABASE_URL:-${KEEL_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}}"
duration="${BENCH_DURATION:-10}"
warmup="${BENCH_WARMUP:-2}"
concurrency="${BENCH_CONCURRENCY:-50}"
h2_streams="${BENCH_H2_STREAMS:-10}"
idle_seconds="${BENCH_IDLE_SECONDS:-60}"
idle_settle="${BENCH_IDLE_SETTLE:-12}"
write_users="${BENCH_WRITE_USERS:-$((2 * concurrency))}"
keel_cpus="${BENCH_KEEL_CPUS:-}"
load_cpus="${BENCH_LOAD_CPUS:-}"
tracing="${BENCH_TRACING:-1}"
tracing_rounds="${BENCH_TRACING_ROUNDS:-1}"
started=$SECONDS

say() { printf 'bench-hotpath: %s\n' "$*" >&2; }
fail() {
  printf 'bench-hotpath: FAIL: %s\n' "$*" >&2
  exit 1
}

for setting in duration warmup concurrency h2_streams idle_seconds idle_settle write_users; do
  [[ "${!setting}" =~ ^[0-9]+$ ]] || fail "$setting must be a whole number, not '${!setting}'"
done
((duration >= 1 && concurrency >= 1 && h2_streams >= 1)) || fail "duration, concurrency and streams must be at least 1"
((concurrency % h2_streams == 0)) || fail "BENCH_CONCURRENCY ($concurrency) must be a multiple of BENCH_H2_STREAMS ($h2_streams)"
((write_users >= concurrency)) || fail "BENCH_WRITE_USERS ($write_users) must be at least BENCH_CONCURRENCY ($concurrency)"
h2_connections=$((concurrency / h2_streams))

# --- tools -------------------------------------------------------------------
apt_updated=0
apt_install() {
  say "installing $* (apt-get)"
  if [[ $apt_updated == 0 ]]; then
    apt-get update -qq >&2
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2
}
command -v curl >/dev/null || apt_install curl
command -v taskset >/dev/null || apt_install util-linux
command -v python3 >/dev/null || apt_install python3
command -v wrk >/dev/null || apt_install wrk
command -v h2load >/dev/null || apt_install nghttp2-client
{ command -v pgbench >/dev/null && command -v psql >/dev/null; } || apt_install postgresql-client
pgbench --help 2>&1 | grep -- '--log-prefix' >/dev/null || fail "pgbench is too old (needs --log-prefix and \\gset: PostgreSQL 12 or later)"

# The load tools run pinned to BENCH_LOAD_CPUS when it is set.
load_pin=()
[[ -z "$load_cpus" ]] || load_pin=(taskset -c "$load_cpus")

# --- binary ------------------------------------------------------------------
if [[ -n "${KEEL_BIN:-}" ]]; then
  binary_label="$KEEL_BIN"
else
  binary_label="built from $(git -C "$root" describe --always --dirty 2>/dev/null || echo 'this tree')"
  say "building keel (cargo build --release --bin keel)"
  KEEL_BIN="$(keel_binary --release)" || fail "cargo build --release --bin keel failed"
  [[ -n "$KEEL_BIN" ]] || fail "cargo build did not report a 'keel' executable"
fi
[[ -x "$KEEL_BIN" ]] || fail "KEEL_BIN=$KEEL_BIN is not an executable file"

# --- work dir, cleanup -------------------------------------------------------
workdir="$(mktemp -d "${TMPDIR:-/tmp}/keel-bench-hotpath.XXXXXX")"
mkdir -p "$workdir/data"
server_log="$workdir/keel.log"
server_pid=""
sink_pid=""
db_mode=""     # database | schema
db_name=""     # the database keel uses
keel_schema="" # the schema keel works in
db_url=""      # URL of the database keel uses

cleanup() {
  local status=$?
  if [[ -n "$sink_pid" ]]; then
    kill -TERM "$sink_pid" 2>/dev/null || true
    wait "$sink_pid" 2>/dev/null || true
  fi
  if [[ -n "$server_pid" ]] && kill -0 "$server_pid" 2>/dev/null; then
    kill -TERM "$server_pid" 2>/dev/null || true
    for _ in $(seq 50); do
      kill -0 "$server_pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  case "$db_mode" in
  database)
    psql -X -q "$server_url" -c "DROP DATABASE IF EXISTS \"$db_name\" WITH (FORCE)" >/dev/null 2>&1 ||
      say "could not drop database $db_name"
    ;;
  schema)
    psql -X -q "$server_url" -c "DROP SCHEMA IF EXISTS \"$keel_schema\" CASCADE" \
      -c "DROP SCHEMA IF EXISTS \"${keel_schema}_limit\" CASCADE" >/dev/null 2>&1 ||
      say "could not drop schemas $keel_schema and ${keel_schema}_limit"
    ;;
  esac
  if [[ $status != 0 && -s "$server_log" ]]; then
    say "server log (last 20 lines):"
    tail -n 20 "$server_log" >&2
  fi
  if [[ "${BENCH_KEEP:-0}" == 1 || $status != 0 ]]; then
    say "work dir kept: $workdir"
  else
    rm -rf "$workdir"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- database ----------------------------------------------------------------
psql -X -qAt "$server_url" -c 'SELECT 1' >/dev/null 2>"$workdir/psql.err" ||
  fail "PostgreSQL at $server_url does not answer: $(cat "$workdir/psql.err")"
suffix="$$_$RANDOM"
if psql -X -q "$server_url" -c "CREATE DATABASE \"keel_bench_$suffix\"" >/dev/null 2>"$workdir/psql.err"; then
  db_mode=database
  db_name="keel_bench_$suffix"
  keel_schema="keel"
  db_url="$(python3 - "$server_url" "$db_name" <<'EOF'
import sys, urllib.parse
url = urllib.parse.urlsplit(sys.argv[1])
print(urllib.parse.urlunsplit(url._replace(path="/" + sys.argv[2])))
EOF
)"
else
  say "WARNING: cannot create a database ($(head -n 1 "$workdir/psql.err")); using a fresh schema in the given one"
  db_mode=schema
  db_url="$server_url"
  db_name="$(psql -X -qAt "$server_url" -c 'SELECT current_database()')"
  keel_schema="keel_bench_$suffix"
fi
limit_schema="${keel_schema}_limit"
[[ "$db_mode" == database ]] && limit_schema="bench_limit"
sql() { psql -X -qAt -v ON_ERROR_STOP=1 "$db_url" "$@"; }
sql -c "CREATE SCHEMA \"$keel_schema\"" -c "CREATE SCHEMA \"$limit_schema\""

# --- server ------------------------------------------------------------------
port="$(free_port)"
base="http://127.0.0.1:$port"
admin_email="admin-$suffix@example.com"
admin_password="bench admin password $RANDOM$RANDOM"
email="bench-$suffix@example.com"
password="correct horse battery staple"

server_alive() {
  kill -0 "$server_pid" 2>/dev/null && return 0
  local status=0
  wait "$server_pid" || status=$?
  say "keel exited with status $status$( ((status > 128)) && echo " (signal $((status - 128)))")"
  server_pid=""
  return 1
}

say "database $db_name, schema $keel_schema; keel on $base${keel_cpus:+, pinned to cores $keel_cpus}"
# The per-method limiter stays in the path (in process, or on Redis with
# BENCH_REDIS_URL), with a limit the load never reaches: one user's calls
# at full speed pass the default 1000 a minute within a second.
rate_limits="${BENCH_RATE_LIMITS:-default=1000000000/60}"
redis_env=()
[[ -z "${BENCH_REDIS_URL:-}" ]] || redis_env=("KEEL_REDIS_URL=$BENCH_REDIS_URL")
keel_cmd=("$KEEL_BIN" serve)
[[ -z "$keel_cpus" ]] || keel_cmd=(taskset -c "$keel_cpus" "${keel_cmd[@]}")
# env and taskset exec keel: $! is keel's pid.
env KEEL_LISTEN="127.0.0.1:$port" KEEL_DATA_DIR="$workdir/data" \
  KEEL_DATABASE_URL="$db_url" KEEL_DATABASE_SCHEMA="$keel_schema" \
  KEEL_BOOTSTRAP_ADMIN_EMAIL="$admin_email" KEEL_BOOTSTRAP_ADMIN_PASSWORD="$admin_password" \
  KEEL_ACCESS_TOKEN_TTL_SECONDS=86400 KEEL_RATE_LIMITS="$rate_limits" KEEL_LOG=warn KEEL_LOG_FORMAT=json "${redis_env[@]}" \
  "${keel_cmd[@]}" >"$server_log" 2>&1 &
server_pid=$!
for _ in $(seq 240); do
  curl -sf --max-time 2 "$base/readyz" >/dev/null && break
  server_alive || fail "keel exited before it was ready"
  sleep 0.25
done
curl -sf --max-time 2 "$base/readyz" >/dev/null || fail "keel not ready after 60 s"

# --- the admin, the bench user, the users the write row updates --------------
json_field() { python3 -c 'import json, sys
value = json.load(sys.stdin)
for key in sys.argv[1:]:
    value = value[key]
print(value)' "$@"; }
# The `sid` claim of an access token (the session it belongs to).
token_session() { python3 -c 'import base64, json, sys
payload = sys.argv[1].split(".")[1]
print(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["sid"])' "$1"; }
login() {
  curl -sf --max-time 20 -H 'content-type: application/json' \
    -d "{\"email\":\"$1\",\"password\":\"$2\"}" "$base/v1/auth/login" | json_field data tokens accessToken
}
curl -sf --max-time 20 -H 'content-type: application/json' \
  -d "{\"email\":\"$email\",\"password\":\"$password\",\"displayName\":\"Bench\"}" \
  "$base/v1/auth/register" >/dev/null || fail "register failed"
token="$(login "$email" "$password")" || fail "login of the bench user failed"
admin_token="$(login "$admin_email" "$admin_password")" || fail "login of the bootstrap admin failed"
user_id="$(curl -sf --max-time 10 -H "authorization: Bearer $token" "$base/v1/users/me" | json_field data user id)" ||
  fail "GET /v1/users/me failed"
session_id="$(token_session "$token")"
admin_session_id="$(token_session "$admin_token")"

# The write row's users: copies of the bench user (same password hash) with
# UUIDv7 ids; the limit schema lists them by number for pgbench's clients.
python3 - "$write_users" >"$workdir/write-users.tsv" <<'EOF'
import os, sys, time, uuid
ms = int(time.time() * 1000)
for n in range(int(sys.argv[1])):
    raw = bytearray(ms.to_bytes(6, "big") + os.urandom(10))
    raw[6] = 0x70 | (raw[6] & 0x0F)  # version 7
    raw[8] = 0x80 | (raw[8] & 0x3F)  # RFC 4122 variant
    print(f"{n}\t{uuid.UUID(bytes=bytes(raw))}")
EOF
cut -f2 "$workdir/write-users.tsv" >"$workdir/write-users.txt"
sql -c "SET search_path = \"$keel_schema\"" \
  -c "CREATE TABLE \"$limit_schema\".write_users (n integer PRIMARY KEY, id uuid NOT NULL)" \
  -c "\\copy \"$limit_schema\".write_users FROM '$workdir/write-users.tsv'" \
  -c "INSERT INTO users (id, user_id, email, email_key, display_name, display_name_key, role, password_hash,
        version, created_at, updated_at)
      SELECT w.id, w.id, 'bench-write-' || w.n || '-$suffix@example.com', 'bench-write-' || w.n || '-$suffix@example.com',
        'Writer ' || w.n, 'writer ' || w.n, 'user', u.password_hash, 1, now(), now()
      FROM \"$limit_schema\".write_users w, users u WHERE u.id = '$user_id'" \
  -c "CREATE TABLE \"$limit_schema\".events (LIKE events INCLUDING ALL)" ||
  fail "seeding the write users failed"

# --- the calls -----------------------------------------------------------------
grpc_path="/keel.identity.v1.IdentityQueryService/GetCurrentUser"
frame="$workdir/empty-message.bin"
printf '\0\0\0\0\0' >"$frame" # uncompressed, length 0: the empty request message

# check NAME: one call with curl; fails unless it succeeded. For gRPC and
# grpc-web prints the size of the reply body, which every call under load
# must match.
check() {
  local name="$1" head="$workdir/$1.head" body="$workdir/$1.body"
  case "$name" in
  grpc | grpc-web)
    if [[ "$name" == grpc ]]; then
      curl -sS --max-time 10 --http2-prior-knowledge -D "$head" -o "$body" \
        -H "authorization: Bearer $token" -H 'content-type: application/grpc' -H 'te: trailers' \
        --data-binary "@$frame" "$base$grpc_path" || fail "$name: curl failed"
      # curl -D writes the trailers after the headers.
      grep -qi '^grpc-status: 0' "$head" || fail "$name: no grpc-status 0: $(tr -d '\r' <"$head")"
    else
      curl -sS --max-time 10 --http2-prior-knowledge -D "$head" -o "$body" \
        -H "authorization: Bearer $token" -H 'content-type: application/grpc-web+proto' \
        -H 'x-grpc-web: 1' --data-binary "@$frame" "$base$grpc_path" || fail "$name: curl failed"
      # The trailers travel in the body, in a frame flagged 0x80.
      python3 - "$body" <<'EOF' || fail "$name: not a successful grpc-web reply"
import sys
data = open(sys.argv[1], "rb").read()
messages, trailers = 0, b""
while data:
    flag, size = data[0], int.from_bytes(data[1:5], "big")
    payload, data = data[5:5 + size], data[5 + size:]
    if flag & 0x80:
        trailers += payload
    else:
        messages += 1
status = [line.split(b":", 1)[1].strip() for line in trailers.split(b"\r\n") if line.lower().startswith(b"grpc-status:")]
sys.exit(0 if messages == 1 and status == [b"0"] else 1)
EOF
    fi
    head -n 1 "$head" | grep -q '^HTTP/2 200' || fail "$name: not HTTP/2 200: $(head -n 1 "$head")"
    wc -c <"$body" | tr -d ' '
    ;;
  rest-me)
    curl -sS --max-time 10 -o "$body" -H "authorization: Bearer $token" "$base/v1/users/me" || fail "$name: curl failed"
    [[ "$(json_field data user email <"$body")" == "$email" ]] || fail "$name: not the user: $(cat "$body")"
    ;;
  rest-get-user)
    curl -sS --max-time 10 -o "$body" -H "authorization: Bearer $admin_token" "$base/v1/users/$user_id" ||
      fail "$name: curl failed"
    [[ "$(json_field data user email <"$body")" == "$email" ]] || fail "$name: not the user: $(cat "$body")"
    ;;
  rest-update-user)
    local id name_
    id="$(tail -n 1 "$workdir/write-users.txt")"
    name_="Bench check $RANDOM"
    curl -sS --max-time 10 -o "$body" -X PATCH -H "authorization: Bearer $admin_token" \
      -H 'content-type: application/json' -d "{\"displayName\":\"$name_\"}" \
      "$base/v1/users/$id?updateMask=displayName" || fail "$name: curl failed"
    [[ "$(json_field data user displayName <"$body")" == "$name_" ]] || fail "$name: not updated: $(cat "$body")"
    ;;
  esac
}

declare -A expected_size
for name in rest-me grpc grpc-web rest-get-user rest-update-user; do
  expected_size[$name]="$(check "$name")"
done

# --- measuring -----------------------------------------------------------------
# probe.py: `watch` samples the CPU of keel, of PostgreSQL's processes and of
# the whole machine over one load; `wrk`, `h2load`, `pgbench` turn a load
# tool's output into {calls, seconds, p50_ms, p99_ms, problems}; `report`
# prints the table.
cat >"$workdir/probe.py" <<'EOF'
import json, os, resource, signal, sys, time

HZ = os.sysconf("SC_CLK_TCK")


def proc_ticks(pid):
    """utime + stime of a process (all its threads), in clock ticks."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])


def proc_seconds(pid):
    """CPU time of a single-threaded process (a PostgreSQL backend), from
    schedstat in nanoseconds: /proc/PID/stat counts whole clock ticks, too
    coarse for 50 backends sampled 5 times a second."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        ticks = proc_ticks(pid)
        return None if ticks is None else ticks / HZ


def proc_comm(pid):
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return None


def proc_cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").split()
    except OSError:
        return []


def machine():
    """Busy and all ticks of all cores."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:9]]
    return sum(values) - values[3] - values[4], sum(values)


def memory(pid):
    found = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    found[key] = int(value.split()[0])
    except OSError:
        pass
    return found


class Stop(Exception):
    pass


def watch(out, keel_pid, dbname):
    """Samples until SIGTERM, then writes the CPU seconds of keel, of the
    PostgreSQL backends of `dbname` ("ours"), of PostgreSQL's own processes
    ("aux"), of other databases' backends, of this probe, and of the machine."""

    def stop(*_):
        raise Stop()

    signal.signal(signal.SIGTERM, stop)
    kinds, first, last = {}, {}, {}

    def kind_of(pid):
        words = proc_cmdline(pid)
        if dbname in words:
            return "ours"
        if any(("(" in w and w.endswith(")")) or w == "[local]" for w in words):
            return "other"
        return "aux"  # postmaster, checkpointer, walwriter, autovacuum, ...

    def scan(initial):
        for entry in os.listdir("/proc"):
            if entry.isdigit() and entry not in first and proc_comm(entry) == "postgres":
                used = proc_seconds(entry)
                if used is not None:
                    # A process found later started during the window.
                    first[entry] = used if initial else 0.0
                    last[entry] = used

    def sample():
        for pid in list(first):
            used = proc_seconds(pid)
            if used is not None:
                last[pid] = used
            if kinds.get(pid, "aux") == "aux":
                kinds[pid] = kind_of(pid)

    busy0, total0 = machine()
    keel0 = proc_ticks(keel_pid)
    wall0 = time.monotonic()
    scan(True)
    sample()
    open(out + ".ready", "w").close()
    rounds = 0
    try:
        while True:
            time.sleep(0.2)
            rounds += 1
            if rounds % 5 == 0:
                scan(False)
            sample()
    except Stop:
        pass
    keel1 = proc_ticks(keel_pid)
    busy1, total1 = machine()
    wall = time.monotonic() - wall0
    sample()
    pg = {"ours": 0.0, "aux": 0.0, "other": 0.0}
    for pid in first:
        pg[kinds.get(pid, "aux")] += last[pid] - first[pid]
    usage = resource.getrusage(resource.RUSAGE_SELF)
    mem = memory(keel_pid)
    result = {
        "seconds": wall,
        "cores": os.cpu_count(),
        "machine_busy": (busy1 - busy0) / HZ,
        "machine_total": (total1 - total0) / HZ,
        "keel": None if keel0 is None or keel1 is None else (keel1 - keel0) / HZ,
        "pg_ours": pg["ours"],
        "pg_aux": pg["aux"],
        "pg_other": pg["other"],
        "probe": usage.ru_utime + usage.ru_stime,
        "rss_kb": mem.get("VmRSS"),
        "hwm_kb": mem.get("VmHWM"),
    }
    json.dump(result, open(out, "w"))


def percentile(values, p):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def parse_wrk(path):
    """The JSON line the done() of the Lua script prints (latency in µs)."""
    lines = [line for line in open(path) if line.startswith("{")]
    if not lines:
        return {"problems": [f"wrk printed no summary: {open(path).read()[-500:]}"]}
    s = json.loads(lines[-1])
    problems = []
    errors = {k: s[k] for k in ("connect", "read", "write", "timeout") if s[k]}
    if errors:
        problems.append(f"socket errors {errors}")
    if s["status"]:
        problems.append(f"{s['status']} replies with an HTTP error status")
    calls = s["requests"] - s["status"]
    if calls <= 0:
        problems.append("no successful call")
    return {"calls": calls, "seconds": s["duration_us"] / 1e6,
            "p50_ms": s["p50_us"] / 1000, "p99_ms": s["p99_us"] / 1000, "problems": problems}


def parse_h2load(path, log, expected_size, concurrency):
    text = open(path).read()
    problems, found = [], {}
    import re
    m = re.search(r"finished in ([\d.]+)s", text)
    r = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout", text)
    c = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text)
    t = re.search(r"traffic: .*?\((\d+)\) total, .*?\((\d+)\) headers.*?, .*?\((\d+)\) data", text)
    if not (m and r and c and t):
        return {"problems": [f"cannot read h2load's output: {text[-500:]}"]}
    seconds = float(m.group(1))
    total, started, done, succeeded, failed, errored, timeout = map(int, r.groups())
    ok, s3, s4, s5 = map(int, c.groups())
    data = int(t.group(3))
    if failed or errored or timeout:
        problems.append(f"{failed} failed, {errored} errored, {timeout} timed out")
    if s3 or s4 or s5:
        problems.append(f"HTTP statuses: {ok} 2xx, {s3} 3xx, {s4} 4xx, {s5} 5xx")
    # A gRPC / grpc-web error is HTTP 200 without the reply message: the data
    # falls short of done x the size of a successful reply. Calls cut off at
    # the deadline may have received their data already (at most one per stream).
    if not (done * expected_size <= data <= (done + concurrency) * expected_size):
        problems.append(f"{data} bytes of replies for {done} calls, expected {expected_size} each: some calls failed")
    latencies, statuses = [], {}
    for line in open(log):
        parts = line.split()
        if len(parts) >= 3:
            statuses[parts[1]] = statuses.get(parts[1], 0) + 1
            latencies.append(int(parts[2]))
    bad = {k: v for k, v in statuses.items() if not k.startswith("2")}
    if bad:
        problems.append(f"logged statuses {bad}")
    if succeeded <= 0:
        problems.append("no successful call")
    return {"calls": succeeded, "seconds": seconds, "p50_ms": (percentile(latencies, 50) or 0) / 1000,
            "p99_ms": (percentile(latencies, 99) or 0) / 1000, "problems": problems}


def parse_pgbench(path, log_prefix):
    import glob, re
    text = open(path).read()
    problems = []
    n = re.search(r"number of transactions actually processed: (\d+)", text)
    f = re.search(r"number of failed transactions: (\d+)", text)
    tps = re.search(r"tps = ([\d.]+) \(without initial connection time\)", text)
    if n and int(n.group(1)) == 0:
        return {"calls": 0, "seconds": 0, "p50_ms": 0, "p99_ms": 0, "problems": ["no successful call"]}
    if not (n and tps):
        return {"problems": [f"cannot read pgbench's output: {text[-500:]}"]}
    if f and int(f.group(1)):
        problems.append(f"{f.group(1)} failed transactions")
    if "aborted" in text:
        problems.append("a client aborted: " + " | ".join(l for l in text.splitlines() if "abort" in l)[:500])
    latencies = []
    for name in glob.glob(log_prefix + ".*"):
        for line in open(name):
            parts = line.split()
            if len(parts) >= 3 and parts[2].isdigit():
                latencies.append(int(parts[2]))
    calls = int(n.group(1))
    rate = float(tps.group(1))
    return {"calls": calls, "seconds": calls / rate if rate else 0, "p50_ms": (percentile(latencies, 50) or 0) / 1000,
            "p99_ms": (percentile(latencies, 99) or 0) / 1000, "problems": problems}


if __name__ == "__main__":
    command = sys.argv[1]
    if command == "watch":
        watch(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    elif command == "wrk":
        print(json.dumps(parse_wrk(sys.argv[2])))
    elif command == "h2load":
        print(json.dumps(parse_h2load(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))))
    elif command == "pgbench":
        print(json.dumps(parse_pgbench(sys.argv[2], sys.argv[3])))
EOF

# Transactions committed and rolled back in keel's database so far. Each of
# these probes adds 2 to the count (its connection's start and its query).
probe_xacts=2
xacts() { sql -c "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = current_database()"; }

# Runs a command and writes the CPU seconds it used (user + system) to $1.
cpu_seconds_of() {
  python3 - "$@" <<'EOF'
import resource, subprocess, sys
status = subprocess.call(sys.argv[2:])
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
open(sys.argv[1], "w").write(f"{usage.ru_utime + usage.ru_stime:.3f}\n")
sys.exit(status)
EOF
}

probe_pid=""
probe_start() {
  rm -f "$1" "$1.ready"
  python3 "$workdir/probe.py" watch "$1" "$server_pid" "$db_name" &
  probe_pid=$!
  for _ in $(seq 100); do
    [[ -e "$1.ready" ]] && return 0
    sleep 0.05
  done
  fail "the CPU probe did not start"
}
probe_stop() {
  kill -TERM "$probe_pid"
  wait "$probe_pid" || fail "the CPU probe failed"
  probe_pid=""
}

# The tools. Each: TOOL SECONDS OUT [args]; writes the tool's output to OUT and
# its CPU seconds to OUT.cpu; a bounded run (timeout) on the load cores.
wrk_run() {
  local seconds="$1" out="$2"
  shift 2
  cpu_seconds_of "$out.cpu" timeout --kill-after=5 $((seconds + 30)) \
    "${load_pin[@]}" \
    wrk -t1 -c"$concurrency" -d"${seconds}s" --timeout 10s "$@" >"$out" 2>&1 ||
    fail "wrk failed or timed out: $(tail -n 5 "$out")"
}
h2load_run() {
  local seconds="$1" out="$2"
  shift 2
  rm -f "$out.log"
  cpu_seconds_of "$out.cpu" timeout --kill-after=5 $((seconds + 30)) \
    "${load_pin[@]}" \
    h2load -t1 -c"$h2_connections" -m"$h2_streams" -D"$seconds" --log-file="$out.log" "$@" >"$out" 2>&1 ||
    fail "h2load failed or timed out: $(tail -n 5 "$out")"
}
pgbench_run() {
  local seconds="$1" out="$2"
  shift 2
  rm -f "$out".log.*
  PGOPTIONS="-c search_path=$keel_schema" cpu_seconds_of "$out.cpu" timeout --kill-after=5 $((seconds + 60)) \
    "${load_pin[@]}" \
    pgbench -n -M prepared -c"$concurrency" -j1 -T"$seconds" -l --log-prefix="$out.log" "$@" "$db_url" >"$out" 2>&1 ||
    fail "pgbench failed or timed out: $(tail -n 5 "$out")"
}

# measure ROW TOOL ARGS...: a warm-up, then the measured load with the probes
# around it; writes ROW.result (the tool's figures) and ROW.json (with CPU,
# memory and database transactions).
measure() {
  local row="$1" tool="$2" out="$workdir/$1" x0 x1
  shift 2
  server_alive || fail "$row: keel is gone"
  if ((warmup > 0)); then
    say "$row: ${warmup} s warm-up"
    "${tool}_run" "$warmup" "$out.warmup" "$@"
    parse "$tool" "$out.warmup" >"$out.warmup.result"
  fi
  sleep 1.2 # idle backends publish their statistics after at most 1 s
  x0="$(xacts)"
  say "$row: ${duration} s"
  probe_start "$out.probe"
  "${tool}_run" "$duration" "$out" "$@"
  probe_stop
  server_alive || fail "$row: keel is gone"
  sleep 1.2
  x1="$(xacts)"
  parse "$tool" "$out" >"$out.result"
  python3 - "$out" "$((x1 - x0 - probe_xacts))" <<'EOF'
import json, os, sys
out, xacts = sys.argv[1], int(sys.argv[2])
row = json.load(open(out + ".result"))
row["probe"] = json.load(open(out + ".probe"))
row["load_cpu"] = float(open(out + ".cpu").read())
row["xacts"] = xacts
if os.path.exists(out + ".warmup.result"):
    warm = json.load(open(out + ".warmup.result"))
    # A short warm-up on a slow machine may end before a call completes.
    row["problems"] += [f"warm-up: {p}" for p in warm["problems"] if p != "no successful call"]
json.dump(row, open(out + ".json", "w"))
EOF
}
parse() {
  local tool="$1" out="$2"
  case "$tool" in
  wrk) python3 "$workdir/probe.py" wrk "$out" ;;
  h2load) python3 "$workdir/probe.py" h2load "$out" "$out.log" "$h2load_size" "$concurrency" ;;
  pgbench) python3 "$workdir/probe.py" pgbench "$out" "$out.log" ;;
  esac
}
# Adds KEY=VALUE (numbers) to ROW.json.
annotate() {
  python3 - "$workdir/$1.json" "${@:2}" <<'EOF'
import json, sys
row = json.load(open(sys.argv[1]))
for item in sys.argv[2:]:
    key, _, value = item.partition("=")
    row[key] = float(value)
json.dump(row, open(sys.argv[1], "w"))
EOF
}

# wrk: the summary as one JSON line (latency in µs).
cat >"$workdir/report.lua" <<'EOF'
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('{"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,"p50_us":%d,"p99_us":%d,"max_us":%d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.max))
end
EOF
# wrk: UpdateUser as the admin. Every call takes a user that no call in flight
# has (a free list, refilled from the reply), so optimistic concurrency
# (UPDATE ... WHERE version) never aborts one; the display name is new each
# time, so every call writes.
cat - "$workdir/report.lua" >"$workdir/update-user.lua" <<'EOF'
local free, n, tag, token = {}, 0, "", ""
init = function(args)
  token = args[1]
  math.randomseed(os.time())
  tag = os.time() .. "-" .. math.random(1000000)
  for line in io.lines(args[2]) do free[#free + 1] = line end
end
request = function()
  -- None free: a call failed and took its user with it; this one fails too (404).
  local id = table.remove(free) or "00000000-0000-7000-8000-000000000000"
  n = n + 1
  return wrk.format("PATCH", "/v1/users/" .. id .. "?updateMask=displayName",
    { ["authorization"] = "Bearer " .. token, ["content-type"] = "application/json" },
    '{"displayName":"Bench ' .. tag .. "-" .. n .. '"}')
end
response = function(status, headers, body)
  local id = body:match('"user":{"id":"([0-9a-f-]+)"')
  if id then free[#free + 1] = id end
end
EOF

# pgbench: the statements keel runs today (PostgreSQL's log, log_statement=all),
# with the same rows. The two-statement read of an authenticated call:
session_join='SELECT "sessions"."id" AS "A_id", "sessions"."user_id" AS "A_user_id", "sessions"."created_at" AS "A_created_at", "sessions"."updated_at" AS "A_updated_at", "sessions"."last_refreshed_at" AS "A_last_refreshed_at", "sessions"."expires_at" AS "A_expires_at", "sessions"."revoked_at" AS "A_revoked_at", "sessions"."user_agent" AS "A_user_agent", "sessions"."ip_address" AS "A_ip_address", "users"."id" AS "B_id", "users"."user_id" AS "B_user_id", "users"."email" AS "B_email", "users"."email_key" AS "B_email_key", "users"."display_name" AS "B_display_name", "users"."display_name_key" AS "B_display_name_key", "users"."role" AS "B_role", "users"."password_hash" AS "B_password_hash", "users"."version" AS "B_version", "users"."created_at" AS "B_created_at", "users"."updated_at" AS "B_updated_at" FROM "sessions" LEFT JOIN "users" ON "sessions"."user_id" = "users"."id" WHERE "sessions"."id" = :sid LIMIT 1'
user_by_id='SELECT "users"."id", "users"."user_id", "users"."email", "users"."email_key", "users"."display_name", "users"."display_name_key", "users"."role", "users"."password_hash", "users"."version", "users"."created_at", "users"."updated_at" FROM "users" WHERE "users"."id" = :uid LIMIT 1'
printf '%s;\n%s;\n' "$session_join" "$user_by_id" >"$workdir/read.sql"
# The write: the caller's session and user (outside the transaction, as keel
# does), then BEGIN, the user, the UPDATE keel writes (every column, guarded
# by the version), the outbox row, COMMIT. Each pgbench client updates its own
# user (numbered by :client_id), as each call in flight does under wrk.
# Payload: a protobuf of an event's typical size (a user id and a name).
outbox_payload="\\x0a24$(printf '%s' "$user_id" | od -An -tx1 | tr -d ' \n')1205$(printf 'Bench' | od -An -tx1 | tr -d ' \n')"
cat >"$workdir/write.sql" <<EOF
\\if :loaded = 0
SELECT id AS uid FROM "$limit_schema".write_users WHERE n = :client_id \\gset
\\set loaded 1
\\endif
\\set name random(1, 1000000000)
$session_join;
BEGIN;
${user_by_id} \\gset u_
\\set next_version :u_version + 1
UPDATE "users" SET "email" = :u_email, "email_key" = :u_email_key, "display_name" = :name, "display_name_key" = :name, "role" = :u_role, "password_hash" = :u_password_hash, "version" = :next_version, "updated_at" = now() WHERE "users"."id" = :uid AND "users"."version" = :u_version;
INSERT INTO "$limit_schema"."events" ("event_id", "sequence", "event_name", "event_version", "occurred_at", "user_id", "aggregate_id", "payload_type", "payload", "idempotency_key", "audited", "published_at") VALUES (gen_random_uuid(), NULL, 'identity.user.updated', '1.0', now(), :uid, :uid, 'keel.identity.v1.UserUpdated', :payload, NULL, false, NULL);
COMMIT;
EOF
# Sum of the write users' versions, and rows of keel's events table.
write_versions() { sql -c "SELECT sum(u.version) FROM \"$keel_schema\".users u JOIN \"$limit_schema\".write_users w USING (id)"; }
count_rows() { sql -c "SELECT count(*) FROM \"$1\".events"; }

# The login flood: `rate` sign-ins per second for `seconds`, each from one of
# 40 loopback source addresses (127.0.0.2-41) for one of the write users
# (same password as the bench user), so that no per-address or
# per-account-and-address limit refuses them: every one is a real Argon2id
# verification and a session write. Writes how many succeeded.
cat >"$workdir/flood.py" <<'EOF'
import concurrent.futures, http.client, json, sys, time
host, port, rate, seconds, users_file, password, out = sys.argv[1:8]
port, rate, seconds = int(port), float(rate), float(seconds)
emails = [line.strip() for line in open(users_file) if line.strip()]
addresses = [f"127.0.0.{n}" for n in range(2, 42)]
def login(i):
    started = time.monotonic()
    try:
        conn = http.client.HTTPConnection(host, port, timeout=20, source_address=(addresses[i % len(addresses)], 0))
        body = json.dumps({"email": emails[i % len(emails)], "password": password})
        conn.request("POST", "/v1/auth/login", body, {"content-type": "application/json"})
        status = conn.getresponse().status
        conn.close()
    except OSError:
        status = 0
    return status, time.monotonic() - started
with concurrent.futures.ThreadPoolExecutor(max_workers=64) as pool:
    start, futures, i = time.monotonic(), [], 0
    while (due := start + i / rate) < start + seconds:
        time.sleep(max(0.0, due - time.monotonic()))
        futures.append(pool.submit(login, i))
        i += 1
    results = [f.result() for f in futures]
ok = sum(1 for status, _ in results if status == 200)
took = sorted(t for _, t in results)
json.dump({"sent": len(results), "ok": ok, "rate": len(results) / seconds,
           "p99_ms": 1000 * took[int(0.99 * (len(took) - 1))] if took else 0}, open(out, "w"))
EOF
flood_users="$workdir/flood-users.txt"
sql -c "SELECT email FROM \"$keel_schema\".users WHERE email LIKE 'bench-write-%' ORDER BY email" >"$flood_users"
flood_rate="${BENCH_FLOOD_RATE:-20}"

# --- the run -------------------------------------------------------------------
say "wrk $(wrk -v 2>&1 | head -n 1 | awk '{print $2}'), $(h2load --version | head -n 1), $(pgbench --version)"
say "concurrency $concurrency (wrk -t1 -c$concurrency; h2load $h2_connections connections x $h2_streams streams; pgbench -c$concurrency -j1), ${warmup} s warm-up + ${duration} s per row"

if [[ "$tracing" != only ]]; then
# 1. Idle, first: later the relay would still have the write's events to publish.
say "idle: keel rests ${idle_settle} s, then ${idle_seconds} s are measured"
sleep "$idle_settle"
x0="$(xacts)"
probe_start "$workdir/idle.probe"
sleep "$idle_seconds"
probe_stop
x1="$(xacts)"
python3 - "$workdir/idle" "$((x1 - x0 - probe_xacts))" <<'EOF'
import json, sys
out, xacts = sys.argv[1], int(sys.argv[2])
json.dump({"probe": json.load(open(out + ".probe")), "xacts": xacts, "load_cpu": 0, "problems": []}, open(out + ".json", "w"))
EOF

# 2. The reads, each between two runs of its limit (the two-statement read,
# pgbench, keel idle): its ratio is against their mean, so that a change of
# the machine's load during the run hits both sides alike.
limit_read() { measure "limit-read-$1" pgbench -f "$workdir/read.sql" -D sid="$session_id" -D uid="$user_id"; }
limit_read 0
measure rest-me wrk -s "$workdir/report.lua" -H "authorization: Bearer $token" "$base/v1/users/me"
limit_read 1
h2load_size="${expected_size[grpc]}"
measure grpc h2load -d "$frame" -H 'content-type: application/grpc' -H 'te: trailers' \
  -H "authorization: Bearer $token" "$base$grpc_path"
limit_read 2
h2load_size="${expected_size[grpc-web]}"
measure grpc-web h2load -d "$frame" -H 'content-type: application/grpc-web+proto' -H 'x-grpc-web: 1' \
  -H "authorization: Bearer $token" "$base$grpc_path"
limit_read 3
measure rest-get-user wrk -s "$workdir/report.lua" -H "authorization: Bearer $admin_token" "$base/v1/users/$user_id"
limit_read 4

# The same read as rest-me while $flood_rate sign-ins per second run.
say "login flood: $flood_rate sign-ins/s from 40 addresses during the next row"
python3 "$workdir/flood.py" 127.0.0.1 "$port" "$flood_rate" "$((warmup + duration + 3))" "$flood_users" \
  "$password" "$workdir/flood.json" &
flood_pid=$!
measure rest-me-flood wrk -s "$workdir/report.lua" -H "authorization: Bearer $token" "$base/v1/users/me"
wait "$flood_pid" || fail "the login flood failed"
annotate rest-me-flood $(python3 -c 'import json, sys
f = json.load(open(sys.argv[1]))
print("flood_sent=%d flood_ok=%d flood_rate=%.2f flood_p99_ms=%.1f" % (f["sent"], f["ok"], f["rate"], f["p99_ms"]))' \
  "$workdir/flood.json")

# 3. The write, pgbench then keel. Each checks that every call wrote its row.
v0="$(write_versions)"
e0="$(count_rows "$limit_schema")"
measure limit-write pgbench -f "$workdir/write.sql" -D sid="$admin_session_id" -D loaded=0 -D payload="$outbox_payload"
v1="$(write_versions)"
e1="$(count_rows "$limit_schema")"
warm_calls="$(json_field calls <"$workdir/limit-write.warmup.result" 2>/dev/null || echo 0)"
annotate limit-write versions=$((v1 - v0)) outbox=$((e1 - e0)) warmup_calls="$warm_calls"

v0="$(write_versions)"
e0="$(count_rows "$keel_schema")"
measure update-user wrk -s "$workdir/update-user.lua" "$base" -- "$admin_token" "$workdir/write-users.txt"
v1="$(write_versions)"
e1="$(count_rows "$keel_schema")"
warm_calls="$(json_field calls <"$workdir/update-user.warmup.result" 2>/dev/null || echo 0)"
annotate update-user versions=$((v1 - v0)) outbox=$((e1 - e0)) warmup_calls="$warm_calls"

# Every call still works after the load.
for name in rest-me grpc grpc-web rest-get-user rest-update-user; do
  [[ "$(check "$name")" == "${expected_size[$name]}" ]] || fail "$name: reply size changed after the load"
done
errors_logged="$(grep -c '"level":"\(ERROR\|WARN\)"' "$server_log" || true)"
else
  errors_logged=0
fi

# 4. Tracing: keel restarted with tracing off, then exported at 100 % and 1 %.
stop_keel() {
  kill -TERM "$server_pid" 2>/dev/null || true
  for _ in $(seq 100); do
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
  server_pid=""
}
# start_keel LOG [VAR=VALUE...]: keel as at the start, with these variables too.
start_keel() {
  local log="$1"
  shift
  env KEEL_LISTEN="127.0.0.1:$port" KEEL_DATA_DIR="$workdir/data" \
    KEEL_DATABASE_URL="$db_url" KEEL_DATABASE_SCHEMA="$keel_schema" \
    KEEL_BOOTSTRAP_ADMIN_EMAIL="$admin_email" KEEL_BOOTSTRAP_ADMIN_PASSWORD="$admin_password" \
    KEEL_ACCESS_TOKEN_TTL_SECONDS=86400 KEEL_RATE_LIMITS="$rate_limits" KEEL_LOG=warn KEEL_LOG_FORMAT=json "${redis_env[@]}" "$@" \
    "${keel_cmd[@]}" >"$log" 2>&1 &
  server_pid=$!
  for _ in $(seq 240); do
    curl -sf --max-time 2 "$base/readyz" >/dev/null && return 0
    server_alive || fail "keel ($log) exited before it was ready"
    sleep 0.25
  done
  fail "keel ($log) not ready after 60 s"
}
tracing_table=""
if [[ "$tracing" == 1 || "$tracing" == only ]]; then
  if [[ -z "${BENCH_SINK_BIN:-}" ]]; then
    say "building the OTLP sink (cargo build --release -p keel-server --example otlp_sink)"
    BENCH_SINK_BIN="$(cargo build --release -p keel-server --example otlp_sink --message-format=json-render-diagnostics |
      python3 -c 'import json, sys
exe = ""
for line in sys.stdin:
    try:
        msg = json.loads(line)
    except ValueError:
        continue
    if msg.get("reason") == "compiler-artifact" and msg.get("target", {}).get("name") == "otlp_sink" and msg.get("executable"):
        exe = msg["executable"]
print(exe)')" || fail "building the OTLP sink failed"
  fi
  [[ -x "$BENCH_SINK_BIN" ]] || fail "BENCH_SINK_BIN=$BENCH_SINK_BIN is not an executable file"
  sink_port="$(free_port)"
  "$BENCH_SINK_BIN" "127.0.0.1:$sink_port" >"$workdir/sink.log" 2>&1 &
  sink_pid=$!
  for _ in $(seq 40); do
    [[ -s "$workdir/sink.log" ]] && break
    sleep 0.25
  done
  [[ -s "$workdir/sink.log" ]] || fail "the OTLP sink did not start"
  for round in $(seq 1 "$tracing_rounds"); do
  for variant in nometrics off 100 1; do
    stop_keel
    case "$variant" in
    nometrics) start_keel "$workdir/keel-trace-nometrics.log" KEEL_METRICS=false ;;
    off) start_keel "$workdir/keel-trace-off.log" ;;
    100) start_keel "$workdir/keel-trace-100.log" KEEL_OTLP_ENDPOINT="http://127.0.0.1:$sink_port" KEEL_TRACE_SAMPLE_RATIO=1.0 ;;
    1) start_keel "$workdir/keel-trace-1.log" KEEL_OTLP_ENDPOINT="http://127.0.0.1:$sink_port" KEEL_TRACE_SAMPLE_RATIO=0.01 ;;
    esac
    [[ "$(check rest-me)" == "${expected_size[rest-me]}" ]] || fail "trace-$variant: rest-me reply changed"
    measure "trace-$variant-$round" wrk -s "$workdir/report.lua" -H "authorization: Bearer $token" "$base/v1/users/me"
  done
  done
  # The last keel flushes its spans as it stops; then the sink says how many it got.
  stop_keel
  kill -TERM "$sink_pid" 2>/dev/null || true
  wait "$sink_pid" 2>/dev/null || true
  sink_pid=""
  tracing_table="$(python3 - "$workdir" "$tracing_rounds" <<'EOF'
import json, re, sys
workdir, rounds = sys.argv[1], int(sys.argv[2])
def rate(row):
    return row["calls"] / row["seconds"] if row.get("seconds") else 0.0
def merged(variant):
    """The rounds of a variant as one row: calls, seconds and CPU summed, latencies averaged."""
    parts = [json.load(open(f"{workdir}/trace-{variant}-{r}.json")) for r in range(1, rounds + 1)]
    row = {"calls": sum(p.get("calls") or 0 for p in parts), "seconds": sum(p.get("seconds") or 0 for p in parts),
           "p50_ms": sum(p.get("p50_ms", 0) for p in parts) / rounds,
           "p99_ms": sum(p.get("p99_ms", 0) for p in parts) / rounds,
           "problems": [q for p in parts for q in p.get("problems", [])],
           "rates": [rate(p) for p in parts]}
    keel = [p["probe"]["keel"] for p in parts]
    row["probe"] = {"keel": None if None in keel else sum(keel)}
    return row
rows = {v: merged(v) for v in ("nometrics", "off", "100", "1")}
spans = re.findall(r"spans received: (\d+)", open(f"{workdir}/sink.log").read())
lines = ["| REST GetCurrentUser | req/s | ratio | ratio, per round | keel CPU µs/call | p50 ms | p99 ms | target |",
         "|---|---:|---:|---|---:|---:|---:|---|"]
missed = []
# Each row's ratio is to its baseline: metrics on to metrics off; the traced rows to tracing off (metrics on).
for variant, base, label, target in (("nometrics", None, "metrics off (KEEL_METRICS=false), tracing off", None),
                                     ("off", "nometrics", "metrics on (the default), tracing off", 0.97),
                                     ("100", "off", "metrics on, exported, 100 % sampled", 0.8),
                                     ("1", "off", "metrics on, exported, 1 % sampled", 0.95)):
    row = rows[variant]
    calls = row.get("calls") or 0
    off = rate(rows[base or variant])
    ratio = rate(row) / off if off else 0.0
    cpu = 1e6 * row["probe"]["keel"] / calls if calls and row["probe"]["keel"] is not None else float("nan")
    verdict = "" if target is None else f"ratio ≥ {target} {'PASS' if ratio >= target else 'MISS'}"
    if target is not None and ratio < target:
        missed.append(f"{label}: ratio {ratio:.2f} < {target}")
    for problem in row.get("problems", []):
        print(f"PROBLEM: trace-{variant}: {problem}", file=sys.stderr)
    per_round = ", ".join(f"{r / o:.2f}" if o else "?" for r, o in zip(row["rates"], rows[base or variant]["rates"]))
    lines.append(f"| {label} | {rate(row):.0f} | {ratio:.2f} | {per_round} | {cpu:.0f} | {row.get('p50_ms', 0):.2f} "
                 f"| {row.get('p99_ms', 0):.2f} | {verdict} |")
print("\n".join(lines))
print()
print("Ratios: metrics on to metrics off; the exported rows to tracing off (metrics on).")
print(f"Spans the sink received over the traced rows: {spans[0] if spans else '?'}."
      + ("" if not missed else " Missed: " + "; ".join(missed) + "."))
EOF
)" || fail "the tracing rows failed"
fi

# --- report ----------------------------------------------------------------------
notes="$workdir/notes.txt"
: >"$notes"
table=""
if [[ "$tracing" != only ]]; then
table="$(python3 - "$workdir" "$concurrency" "$idle_seconds" <<'EOF' 2>"$notes"
import json, sys
workdir, concurrency, idle_seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

def load(name):
    return json.load(open(f"{workdir}/{name}.json"))

rows = {name: load(name) for name in
        ("rest-me", "grpc", "grpc-web", "rest-get-user", "update-user", "idle", "rest-me-flood",
         "limit-read-0", "limit-read-1", "limit-read-2", "limit-read-3", "limit-read-4", "limit-write")}
problems, notes, busy = [], [], []

def rate(row):
    return row["calls"] / row["seconds"] if row.get("seconds") else 0.0

def others(name, row):
    """Cores used by processes other than keel, the load tool, this benchmark's
    PostgreSQL backends, PostgreSQL's own processes and the probe."""
    p = row["probe"]
    known = (p["keel"] or 0) + row["load_cpu"] + p["pg_ours"] + p["pg_aux"] + p["probe"]
    cores = max(0.0, p["machine_busy"] - known) / p["seconds"]
    if cores > 0.2:
        busy.append(f"{name}: {cores:.2f} cores")
    return cores

for name, row in rows.items():
    for problem in row.get("problems", []):
        problems.append(f"{name}: {problem}")
    others(name, row)

# Every write really wrote: a version per successful call (and at most one
# per call still in flight at the end of the warm-up or the load).
for name in ("update-user", "limit-write"):
    row = rows[name]
    done = row.get("calls", 0) + row.get("warmup_calls", 0)
    if not (done <= row.get("versions", 0) <= done + 2 * concurrency):
        problems.append(f"{name}: {row.get('versions', 0):.0f} users changed for {done:.0f} successful calls")
if rows["limit-write"].get("outbox") != rows["limit-write"].get("versions"):
    problems.append(f"limit-write: {rows['limit-write'].get('outbox')} outbox rows for "
                    f"{rows['limit-write'].get('versions')} updates")

read_rows = ("rest-me", "grpc", "grpc-web", "rest-get-user")
read_limits = [rate(rows[f"limit-read-{i}"]) for i in range(len(read_rows) + 1)]
# Each read row against the mean of the limit runs just before and after it.
limit_of = {name: (read_limits[i] + read_limits[i + 1]) / 2 for i, name in enumerate(read_rows)}
read_limit = sum(read_limits) / len(read_limits)
write_limit = rate(rows["limit-write"])
limit_of["update-user"] = write_limit
spread = (max(read_limits) - min(read_limits)) / read_limit if read_limit else 0
if spread > 0.1:
    notes.append(f"NOTE: the two-statement limit moved by {100 * spread:.0f} % during the run "
                 f"({', '.join(f'{v:.0f}' for v in read_limits)} tps): the machine's load changed")
outbox_per_write = rows["update-user"].get("outbox", 0) / max(1, rows["update-user"].get("versions", 0))
if outbox_per_write < 0.99:
    notes.append(f"NOTE: keel wrote {outbox_per_write:.2f} outbox rows per UpdateUser; the pgbench write "
                 f"transaction writes 1: keel's write does less work than its limit")

def mb(kb):
    return f"{kb / 1024:.0f}" if kb else "?"

def ms(value):
    return f"{value:.2f}"

def verdict(name, checks):
    return " · ".join(f"{label} {'PASS' if ok else 'MISS'}" for label, ok in checks)

targets = []
lines = [
    "| call | req/s | limit (pgbench, same statements, same concurrency) | ratio | keel CPU µs/call | p50 ms | p99 ms "
    "| RSS MB at end (peak) | db xacts/call | db CPU µs/call | targets |",
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
]
labels = {
    "rest-me": "GetCurrentUser, REST `GET /v1/users/me`",
    "grpc": "GetCurrentUser, gRPC",
    "grpc-web": "GetCurrentUser, grpc-web",
    "rest-get-user": "GetUser by id, REST `GET /v1/users/{id}`",
    "update-user": "UpdateUser display_name, REST `PATCH /v1/users/{id}`",
}
for name, label in labels.items():
    row = rows[name]
    p = row["probe"]
    calls = row.get("calls") or 0
    rps = rate(row) if calls else 0.0
    write = name == "update-user"
    limit = limit_of[name]
    ratio = rps / limit if limit else 0.0
    cpu = 1e6 * p["keel"] / calls if calls and p["keel"] is not None else float("nan")
    rss = p["rss_kb"] or 0
    if write:
        # The target is the write *with its outbox row*.
        checks = [("ratio ≥ 0.8", ratio >= 0.8), ("1 outbox row", outbox_per_write >= 0.99)]
        limit_label = f"{limit:.0f} (write transaction)"
    else:
        checks = [("ratio ≥ 0.9", ratio >= 0.9), ("CPU ≤ 100 µs", cpu <= 100), ("RSS ≤ 64 MB", rss <= 64 * 1024)]
        limit_label = f"{limit:.0f} (two-statement read)"
    targets += [(label, what, ok) for what, ok in checks]
    lines.append(f"| {label} | {rps:.0f} | {limit_label} | {ratio:.2f} | {cpu:.0f} | {ms(row.get('p50_ms', 0))} "
                 f"| {ms(row.get('p99_ms', 0))} | {mb(rss)} ({mb(p['hwm_kb'])}) | {row['xacts'] / max(1, calls):.2f} "
                 f"| {1e6 * p['pg_ours'] / max(1, calls):.0f} | {verdict(name, checks)} |")

flood = rows["rest-me-flood"]
p = flood["probe"]
calls = flood.get("calls") or 0
quiet_p99 = rows["rest-me"].get("p99_ms", 0)
flood_ok = flood.get("flood_ok", 0) / max(1, flood.get("flood_sent", 0))
checks = [("p99 ≤ 2× without the flood", flood.get("p99_ms", 0) <= 2 * quiet_p99),
          ("≥ 95 % of sign-ins succeeded", flood_ok >= 0.95)]
label = f"GetCurrentUser, REST, during {flood.get('flood_rate', 0):.0f} sign-ins/s"
targets += [(label, what, ok) for what, ok in checks]
lines.append(f"| {label} ({flood.get('flood_ok', 0):.0f} of {flood.get('flood_sent', 0):.0f} ok, sign-in p99 "
             f"{flood.get('flood_p99_ms', 0):.0f} ms) | {rate(flood):.0f} | — | — "
             f"| {1e6 * p['keel'] / max(1, calls):.0f} (hashing included) | {ms(flood.get('p50_ms', 0))} "
             f"| {ms(flood.get('p99_ms', 0))} ({flood.get('p99_ms', 0) / max(0.01, quiet_p99):.1f}× rest-me) "
             f"| {mb(p['rss_kb'])} ({mb(p['hwm_kb'])}) | {flood['xacts'] / max(1, calls):.2f} "
             f"| {1e6 * p['pg_ours'] / max(1, calls):.0f} | {verdict('flood', checks)} |")

idle = rows["idle"]
p = idle["probe"]
idle_rate = idle["xacts"] / p["seconds"]
checks = [("≤ 1 xact/s", idle_rate <= 1)]
targets += [(f"idle {idle_seconds} s", what, ok) for what, ok in checks]
lines.append(f"| idle {idle_seconds} s (nothing to do) | — | — | — | {1e6 * (p['keel'] or 0) / p['seconds']:.0f} per s "
             f"| — | — | {mb(p['rss_kb'])} ({mb(p['hwm_kb'])}) | {idle_rate:.1f} per s "
             f"| {1e6 * p['pg_ours'] / p['seconds']:.0f} per s | {verdict('idle', checks)} |")

for name, label in (("limit-read", "limit: two-statement read, pgbench (mean; min–max of its 5 runs)"),
                    ("limit-write", "limit: write transaction + outbox row, pgbench")):
    if name == "limit-read":
        parts = [rows[f"limit-read-{i}"] for i in range(len(read_limits))]
        shown = f"{read_limit:.0f} ({min(read_limits):.0f}–{max(read_limits):.0f})"
    else:
        parts = [rows[name]]
        shown = f"{write_limit:.0f}"
    calls = sum(r.get("calls", 0) for r in parts)
    p50 = sum(r.get("p50_ms", 0) for r in parts) / len(parts)
    p99 = sum(r.get("p99_ms", 0) for r in parts) / len(parts)
    xacts = sum(r["xacts"] for r in parts) / max(1, calls)
    db_cpu = 1e6 * sum(r["probe"]["pg_ours"] for r in parts) / max(1, calls)
    lines.append(f"| {label} | {shown} | — | — | — | {ms(p50)} | {ms(p99)} | — | {xacts:.2f} | {db_cpu:.0f} | |")

print("\n".join(lines))
missed = [t for t in targets if not t[2]]
print()
print(f"Targets: {len(targets) - len(missed)} of {len(targets)} met." + ("" if not missed else " Missed: " +
      "; ".join(f"{label}: {what}" for label, what, _ in missed) + "."))
if busy:
    notes.insert(0, "WARNING: the machine was busy (other processes: " + ", ".join(busy) +
                 "); the req/s, ratios and latencies are noisy, CPU per call less so")
for note in notes:
    print(note, file=sys.stderr)
for problem in problems:
    print(f"PROBLEM: {problem}", file=sys.stderr)
sys.exit(1 if problems else 0)
EOF
)" || { printf '%s\n' "$table"; cat "$notes" >&2; fail "failed calls or checks (above)"; }
fi

if [[ "$db_mode" == schema ]]; then
  echo "WARNING: keel ran in a schema of the shared database $db_name (no CREATE DATABASE): other clients of it count in 'db xacts' and the idle row" >>"$notes"
fi
if ((errors_logged > 0)); then
  python3 - "$server_log" "$errors_logged" >>"$notes" <<'EOF'
import collections, json, sys
counts = collections.Counter()
for line in open(sys.argv[1]):
    try:
        entry = json.loads(line)
    except ValueError:
        continue
    if entry.get("level") in ("WARN", "ERROR"):
        counts[f'{entry["level"]} {entry.get("target", "")}: {entry.get("message", "")}'] += 1
print(f"NOTE: keel logged {sys.argv[2]} WARN/ERROR lines during the run: "
      + "; ".join(f"{n} x {what}" for what, n in counts.most_common(5)))
EOF
fi
pin_label="not pinned"
[[ -z "$keel_cpus" ]] || pin_label="on cores $keel_cpus"
load_pin_label="not pinned"
[[ -z "$load_cpus" ]] || load_pin_label="on cores $load_cpus"
when="$(date -u +%Y-%m-%dT%H:%MZ)"
busy_label=""
grep -q '^WARNING: the machine was busy' "$notes" && busy_label=", machine busy with parallel builds"
pg_version="$(sql -c 'SHOW server_version' | awk '{print $1}')"
summary_line="$when$busy_label. keel $binary_label; PostgreSQL $pg_version (a fresh $db_mode), ${BENCH_REDIS_URL:+Redis, }concurrency $concurrency (wrk -t1 -c$concurrency HTTP/1.1; h2load -t1 $h2_connections x $h2_streams streams h2c; pgbench -M prepared -c$concurrency -j1), ${warmup} s warm-up + ${duration} s per row, idle ${idle_seconds} s; keel $pin_label, load tools $load_pin_label; $(nproc) cores, load average at the end $(cut -d' ' -f1-3 /proc/loadavg)"
printf '\n%s\n\n%s\n\n' "$summary_line" "$table"
[[ -z "$tracing_table" ]] || printf '%s\n\n' "$tracing_table"
cat "$notes" >&2
say "ratio: keel req/s / pgbench tps of the limit; each read against the two-statement read runs just before and after it"
say "keel CPU: utime+stime of keel / successful calls; db: keel's database (transactions from pg_stat_database, CPU of its backends)"
if [[ -n "${BENCH_OUT:-}" ]]; then
  { printf '%s\n\n%s\n' "$summary_line" "$table"; [[ -z "$tracing_table" ]] || printf '\n%s\n' "$tracing_table"; [[ ! -s "$notes" ]] || printf '\n%s\n' "$(cat "$notes")"; } >"$BENCH_OUT"
  say "table written to $BENCH_OUT"
fi
say "done in $((SECONDS - started)) s"
