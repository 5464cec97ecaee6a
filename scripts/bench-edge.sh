#!/usr/bin/env bash
# Benchmark of the one listener: the same method (IdentityQueryService/
# GetCurrentUser) called as direct gRPC, as REST through the edge
# (GET /v1/users/me) and as grpc-web, with the same load tool (oha), the same
# protocol (HTTP/2 prior knowledge, h2c), the same concurrency and the same
# duration, against one server. Prints requests/s, p50 and p99 for each and
# the ratio of each to direct gRPC, plus keel's CPU time per call.
#
# keel runs pinned to one core and oha to the other (taskset). keel's and
# oha's own CPU use is measured, and so is how busy each core was: when
# other processes share the cores (a build running beside the benchmark) a
# WARNING says so, since the figures are then noisy.
#
# Every run is checked: only HTTP 200, and every response body of the exact
# size of a successful reply (a gRPC error is HTTP 200 with an empty body, a
# grpc-web error has no message frame). A curl call before and after the load
# checks grpc-status 0 / the JSON reply. Any failure exits non-zero.
#
# Installs what it needs when missing: oha (cargo install --locked), curl and
# taskset (apt-get). Builds the release binary unless KEEL_BIN is set.
#
# Environment (defaults in brackets):
#   KEEL_BIN             use this binary instead of building one
#   BENCH_DURATION       seconds per protocol and round [10]
#   BENCH_ROUNDS         rounds; each measures the three protocols, in an
#                        order rotated by one each round, so that a change
#                        of the machine's background load hits all three [3]
#   BENCH_WARMUP         seconds of warm-up per protocol, not measured [2]
#   BENCH_CONNECTIONS    HTTP/2 connections [5]
#   BENCH_STREAMS        concurrent streams per connection [10]
#                        (concurrency = connections x streams)
#   BENCH_SERVER_CPU     core for keel [0]
#   BENCH_LOAD_CPU       core for oha [1]
#   BENCH_OUT            also write the result table (Markdown) to this file
#   BENCH_KEEP           1: keep the work dir (server log, oha JSON) [0]
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

duration="${BENCH_DURATION:-10}"
rounds="${BENCH_ROUNDS:-3}"
warmup="${BENCH_WARMUP:-2}"
connections="${BENCH_CONNECTIONS:-5}"
streams="${BENCH_STREAMS:-10}"
server_cpu="${BENCH_SERVER_CPU:-0}"
load_cpu="${BENCH_LOAD_CPU:-1}"
concurrency=$((connections * streams))
started=$SECONDS

say() { printf 'bench-edge: %s\n' "$*" >&2; }
fail() {
  printf 'bench-edge: FAIL: %s\n' "$*" >&2
  exit 1
}

# --- tools -------------------------------------------------------------------
apt_updated=0
apt_install() {
  if [[ $apt_updated == 0 ]]; then
    apt-get update -qq >&2
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >&2
}
command -v curl >/dev/null || apt_install curl
command -v taskset >/dev/null || apt_install util-linux
command -v python3 >/dev/null || apt_install python3
PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
if ! command -v oha >/dev/null; then
  say "installing oha (cargo install oha --locked, a few minutes)"
  cargo install oha --locked >&2
fi
oha="$(command -v oha)"
(( $(nproc) > server_cpu && $(nproc) > load_cpu )) ||
  fail "cores $server_cpu and $load_cpu are needed, this machine has $(nproc)"

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

# --- server ------------------------------------------------------------------
port="$(free_port)"
base="http://127.0.0.1:$port"
workdir="$(mktemp -d "${TMPDIR:-/tmp}/keel-bench.XXXXXX")"
mkdir -p "$workdir/data"
server_log="$workdir/keel.log"
server_pid=""

cleanup() {
  local status=$?
  if [[ -n "$server_pid" ]] && kill -0 "$server_pid" 2>/dev/null; then
    kill -TERM "$server_pid" 2>/dev/null || true
    for _ in $(seq 50); do
      kill -0 "$server_pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
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

# True while keel runs; otherwise says how it ended.
server_alive() {
  kill -0 "$server_pid" 2>/dev/null && return 0
  local status=0
  wait "$server_pid" || status=$?
  say "keel exited with status $status$( ((status > 128)) && echo " (signal $((status - 128)))")"
  server_pid=""
  return 1
}

say "keel on $base, pinned to core $server_cpu; oha pinned to core $load_cpu"
KEEL_LISTEN="127.0.0.1:$port" KEEL_DATA_DIR="$workdir/data" KEEL_LOG=warn KEEL_LOG_FORMAT=json \
  taskset -c "$server_cpu" "$KEEL_BIN" serve >"$server_log" 2>&1 &
server_pid=$!
for _ in $(seq 120); do
  curl -sf --max-time 2 "$base/readyz" >/dev/null && break
  server_alive || fail "keel exited before it was ready"
  sleep 0.25
done
curl -sf --max-time 2 "$base/readyz" >/dev/null || fail "keel not ready after 30 s"

# --- a signed-in user (one register, one login: both are throttled) ----------
email="bench-$RANDOM$RANDOM@example.com"
password="correct horse battery staple"
curl -sf --max-time 10 -H 'content-type: application/json' \
  -d "{\"email\":\"$email\",\"password\":\"$password\",\"displayName\":\"Bench\"}" \
  "$base/v1/auth/register" >/dev/null || fail "register failed"
token="$(curl -sf --max-time 10 -H 'content-type: application/json' \
  -d "{\"email\":\"$email\",\"password\":\"$password\"}" "$base/v1/auth/login" |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["data"]["tokens"]["accessToken"])')" ||
  fail "login failed"
[[ -n "$token" ]] || fail "login returned no access token"

# --- the three calls ---------------------------------------------------------
grpc_path="/keel.identity.v1.IdentityQueryService/GetCurrentUser"
frame="$workdir/empty-message.bin"
printf '\0\0\0\0\0' >"$frame" # uncompressed, length 0: the empty request message

# One call of each with curl over h2c; checks that it succeeded and prints the
# size of the response body, which every call under load must match.
check() {
  local name="$1" head="$workdir/$1.head" body="$workdir/$1.body"
  case "$name" in
  grpc)
    curl -sS --max-time 10 --http2-prior-knowledge -D "$head" -o "$body" \
      -H "authorization: Bearer $token" -H 'content-type: application/grpc' -H 'te: trailers' \
      --data-binary "@$frame" "$base$grpc_path" || fail "$name: curl failed"
    # curl -D writes the trailers after the headers.
    grep -qi '^grpc-status: 0' "$head" || fail "$name: no grpc-status 0: $(tr -d '\r' <"$head")"
    ;;
  grpc-web)
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
    ;;
  rest)
    curl -sS --max-time 10 --http2-prior-knowledge -D "$head" -o "$body" \
      -H "authorization: Bearer $token" "$base/v1/users/me" || fail "$name: curl failed"
    python3 - "$body" "$email" <<'EOF' || fail "$name: not a successful reply: $(cat "$body")"
import json, sys
reply = json.load(open(sys.argv[1]))
sys.exit(0 if reply["data"]["user"]["email"] == sys.argv[2] else 1)
EOF
    ;;
  esac
  head -n 1 "$head" | grep -q '^HTTP/2 200' || fail "$name: not HTTP/2 200: $(head -n 1 "$head")"
  wc -c <"$body" | tr -d ' '
}

declare -A expected_size
for name in grpc rest grpc-web; do
  expected_size[$name]="$(check "$name")"
done

# The oha arguments of each protocol (all HTTP/2 prior knowledge, h2c).
oha_args() {
  case "$1" in
  grpc)
    printf '%s\n' -m POST -T application/grpc -H "authorization: Bearer $token" \
      -H 'te: trailers' -D "$frame" "$base$grpc_path"
    ;;
  grpc-web)
    printf '%s\n' -m POST -T application/grpc-web+proto -H "authorization: Bearer $token" \
      -H 'x-grpc-web: 1' -D "$frame" "$base$grpc_path"
    ;;
  rest)
    printf '%s\n' -m GET -H "authorization: Bearer $token" "$base/v1/users/me"
    ;;
  esac
}

# Busy jiffies and all jiffies of one core, from /proc/stat.
cpu_ticks() {
  awk -v cpu="cpu$1" '$1 == cpu { total = 0; for (i = 2; i <= NF; i++) total += $i; print total - $5 - $6, total }' /proc/stat
}

# CPU jiffies (user + system) keel has used so far.
server_ticks() {
  sed 's/.*) //' "/proc/$server_pid/stat" | awk '{ print $12 + $13 }'
}

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

# run NAME SECONDS OUT: oha for SECONDS against NAME, its JSON in OUT;
# in OUT.cpu: busy % of the server's core and of the load generator's core
# (all processes), keel's CPU seconds and oha's CPU seconds.
run() {
  local name="$1" seconds="$2" out="$3" args s0 l0 s1 l1 k0 k1
  mapfile -t args < <(oha_args "$name")
  read -r -a s0 < <(cpu_ticks "$server_cpu")
  read -r -a l0 < <(cpu_ticks "$load_cpu")
  k0="$(server_ticks)"
  # oha stops by itself after -z; `timeout` bounds it should it hang.
  cpu_seconds_of "$out.oha-cpu" timeout --kill-after=5 $((seconds + 30)) \
    taskset -c "$load_cpu" "$oha" --no-tui --http2 -c "$connections" -p "$streams" \
    -z "${seconds}s" -t 10s --worker-threads 1 --output-format json -o "$out" "${args[@]}" ||
    fail "$name: oha failed or timed out"
  server_alive || fail "$name: keel is gone during the run"
  k1="$(server_ticks)"
  read -r -a s1 < <(cpu_ticks "$server_cpu")
  read -r -a l1 < <(cpu_ticks "$load_cpu")
  echo "$((100 * (s1[0] - s0[0]) / (s1[1] - s0[1] + 1))) $((100 * (l1[0] - l0[0]) / (l1[1] - l0[1] + 1)))" \
    "$(awk -v t="$((k1 - k0))" -v hz="$clock_ticks" 'BEGIN { printf "%.3f", t / hz }')" \
    "$(cat "$out.oha-cpu")" >"$out.cpu"
}
clock_ticks="$(getconf CLK_TCK)"

say "oha $("$oha" --version | awk '{print $2}'), HTTP/2 (h2c), $connections connections x $streams streams = $concurrency concurrent"
say "${warmup} s warm-up per protocol, then $rounds rounds of ${duration} s per protocol (order rotated each round)"
protocols=(grpc rest grpc-web)
for name in "${protocols[@]}"; do
  say "warm-up: $name"
  run "$name" "$warmup" "$workdir/warmup-$name.json"
done
for ((round = 1; round <= rounds; round++)); do
  for ((i = 0; i < 3; i++)); do
    name="${protocols[$(((i + round - 1) % 3))]}"
    say "round $round/$rounds: $name"
    run "$name" "$duration" "$workdir/round$round-$name.json"
  done
done

# The token and the three calls still work after the load.
for name in "${protocols[@]}"; do
  [[ "$(check "$name")" == "${expected_size[$name]}" ]] || fail "$name: reply size changed after the load"
done
errors_logged="$(grep -c '"level":"\(ERROR\|WARN\)"' "$server_log" || true)"

# --- report ------------------------------------------------------------------
notes="$workdir/notes.txt"
table="$(python3 - "$workdir" "$rounds" "$concurrency" "${expected_size[grpc]}" "${expected_size[rest]}" "${expected_size[grpc-web]}" 2>"$notes" <<'EOF'
import json, statistics, sys
workdir, rounds, concurrency = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
expected = {"grpc": int(sys.argv[4]), "rest": int(sys.argv[5]), "grpc-web": int(sys.argv[6])}
labels = {"grpc": "gRPC (direct)", "rest": "REST (edge)", "grpc-web": "grpc-web"}
problems, rounds_of = [], {}
steal_server = steal_load = 0.0
for name in expected:
    rounds_of[name] = []
    for round in range(1, rounds + 1):
        path = f"{workdir}/round{round}-{name}.json"
        result = json.load(open(path))
        server_busy, load_busy, keel_cpu, oha_cpu = map(float, open(f"{path}.cpu").read().split())
        summary, pct = result["summary"], result["latencyPercentiles"]
        codes = {int(code): count for code, count in result["statusCodeDistribution"].items()}
        done = sum(codes.values())
        errors = dict(result.get("errorDistribution") or {})
        # oha counts the calls still in flight when -z ends as aborted: at most
        # one per concurrent stream.
        aborted = errors.pop("aborted due to deadline", 0)
        where = f"{name}, round {round}"
        if errors:
            problems.append(f"{where}: errors {errors}")
        if aborted > concurrency:
            problems.append(f"{where}: {aborted} calls aborted at the deadline (> {concurrency})")
        if set(codes) != {200}:
            problems.append(f"{where}: HTTP statuses {codes}")
        if done == 0 or summary["totalData"] != done * expected[name]:
            problems.append(f"{where}: {summary['totalData']} bytes for {done} replies, "
                            f"expected {expected[name]} each: some calls failed")
        seconds = summary["total"]
        # Other processes on the two cores: on keel's core they take CPU from
        # keel (lower req/s), on oha's core they delay oha (higher latency).
        steal_server = max(steal_server, server_busy - 100 * keel_cpu / seconds)
        steal_load = max(steal_load, load_busy - 100 * oha_cpu / seconds)
        rounds_of[name].append(dict(done=done, seconds=seconds, rps=done / seconds,
                                    p50=pct["p50"] * 1000, p99=pct["p99"] * 1000,
                                    keel_cpu=keel_cpu, oha_cpu=oha_cpu))

def total(name, key):
    return sum(r[key] for r in rounds_of[name])

grpc_rps = total("grpc", "done") / total("grpc", "seconds")
print("| protocol | req/s | p50 ms | p99 ms | ratio to gRPC | ratio, per round | calls | keel CPU µs/call | keel CPU | oha CPU |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for name, label in labels.items():
    done, seconds = total(name, "done"), total(name, "seconds")
    rps = done / seconds
    per_round = [r["rps"] / g["rps"] for r, g in zip(rounds_of[name], rounds_of["grpc"])]
    low, high = f"{min(per_round):.2f}", f"{max(per_round):.2f}"
    spread = low if low == high else f"{low}–{high}"
    p50 = statistics.median(r["p50"] for r in rounds_of[name])
    p99 = statistics.median(r["p99"] for r in rounds_of[name])
    keel = total(name, "keel_cpu")
    oha = total(name, "oha_cpu")
    print(f"| {label} | {rps:.0f} | {p50:.2f} | {p99:.2f} | {rps / grpc_rps:.2f} | {spread} | {done} "
          f"| {1e6 * keel / done:.0f} | {100 * keel / seconds:.0f} % | {100 * oha / seconds:.0f} % |")
if max(steal_server, steal_load) > 10:
    print(f"WARNING: the machine was not idle: other processes took up to {steal_server:.0f} % of keel's "
          f"core and {steal_load:.0f} % of oha's core during a round; the figures are noisy", file=sys.stderr)
for problem in problems:
    print(f"PROBLEM: {problem}", file=sys.stderr)
sys.exit(1 if problems else 0)
EOF
)" || { printf '%s\n' "$table"; cat "$notes" >&2; fail "the load had failed calls (above)"; }

when="$(date -u +%Y-%m-%dT%H:%MZ)"
summary_line="$when, keel $binary_label, oha $("$oha" --version | awk '{print $2}'), HTTP/2 h2c, $connections connections x $streams streams = $concurrency concurrent, $rounds x ${duration} s per protocol after ${warmup} s warm-up, keel on core $server_cpu, oha on core $load_cpu ($(nproc) cores), load average at the end $(cut -d' ' -f1-3 /proc/loadavg)"
printf '\n%s\n\n%s\n\n' "$summary_line" "$table"
cat "$notes" >&2
say "req/s: all calls of all rounds / their time; p50, p99: median of the rounds; keel CPU: share of one core"
say "server log: $errors_logged WARN/ERROR lines during the run"
if [[ -n "${BENCH_OUT:-}" ]]; then
  printf '%s\n\n%s\n' "$summary_line" "$table" >"$BENCH_OUT"
  [[ ! -s "$notes" ]] || printf '\n%s\n' "$(cat "$notes")" >>"$BENCH_OUT"
  say "table written to $BENCH_OUT"
fi
say "done in $((SECONDS - started)) s"
