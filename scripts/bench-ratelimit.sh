#!/usr/bin/env bash
# The cost of the rate limiter on the authenticated read (issue 12): GET
# /v1/users/me (GetCurrentUser over REST, wrk, HTTP/1.1) with the limiter off,
# in process and on Redis, side by side in one run, and each as a ratio to
# the same call with it off. Targets: 0.9 in process, 0.8 with Redis.
#
# Four keels (embedded SQLite, each its own data dir, all with the same
# KEEL_REDIS_URL so the bus and caches are the same) differ only in
# KEEL_RATE_LIMITER (off | local | redis) and, on Redis, in
# KEEL_RATE_LIMIT_SHARE_MAX: 1 (a round trip per call) or the default (a
# hot key takes shares of its allowance); the limit is set so high that
# every call is counted and none is refused. The rows are measured in
# BENCH_ROUNDS rounds of off, local, redis-1, redis (each round's warm-up
# first), and each mode's figure is the mean of its rounds, so drift of the
# machine falls on all alike.
#
# Installs wrk when missing (apt-get). Builds the release binary unless
# KEEL_BIN is set.
#
# Environment (defaults in brackets):
#   KEEL_BIN            use this binary instead of building one
#   BENCH_REDIS_URL     the Redis [$KEEL_TEST_REDIS_URL, else redis://127.0.0.1:6379]
#   BENCH_DURATION      seconds of load per row and round [8]
#   BENCH_WARMUP        seconds of warm-up per row and round [2]
#   BENCH_ROUNDS        rounds [2]
#   BENCH_SHARE_MAX     KEEL_RATE_LIMIT_SHARE_MAX of the "redis" row [unset: keel's default]
#   BENCH_CONCURRENCY   connections of wrk [50]
#   BENCH_KEEL_CPUS     taskset -c list for the keels [unset: not pinned]
#   BENCH_LOAD_CPUS     taskset -c list for wrk [unset: not pinned]
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${KEEL_BIN:-}" && "$KEEL_BIN" != /* ]]; then
  KEEL_BIN="$PWD/$KEEL_BIN"
fi
cd "$root"
# shellcheck source=scripts/lib.sh
source "$root/scripts/lib.sh"

redis_url="${BENCH_REDIS_URL:-${KEEL_TEST_REDIS_URL:-redis://127.0.0.1:6379}}"
duration="${BENCH_DURATION:-8}"
warmup="${BENCH_WARMUP:-2}"
rounds="${BENCH_ROUNDS:-2}"
concurrency="${BENCH_CONCURRENCY:-50}"
keel_pin=()
[[ -z "${BENCH_KEEL_CPUS:-}" ]] || keel_pin=(taskset -c "$BENCH_KEEL_CPUS")
load_pin=()
[[ -z "${BENCH_LOAD_CPUS:-}" ]] || load_pin=(taskset -c "$BENCH_LOAD_CPUS")

say() { printf 'bench-ratelimit: %s\n' "$*" >&2; }
fail() {
  printf 'bench-ratelimit: FAIL: %s\n' "$*" >&2
  exit 1
}
for setting in duration warmup rounds concurrency; do
  [[ "${!setting}" =~ ^[0-9]+$ ]] || fail "$setting must be a whole number, not '${!setting}'"
done
((duration >= 1 && rounds >= 1 && concurrency >= 1)) || fail "duration, rounds and concurrency must be at least 1"

if ! command -v wrk >/dev/null; then
  say "installing wrk (apt-get)"
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >&2
fi
command -v python3 >/dev/null || fail "python3 is needed"

if [[ -z "${KEEL_BIN:-}" ]]; then
  say "building keel (cargo build --release --bin keel)"
  KEEL_BIN="$(keel_binary --release)" || fail "cargo build --release --bin keel failed"
fi
[[ -x "$KEEL_BIN" ]] || fail "KEEL_BIN=$KEEL_BIN is not an executable file"

workdir="$(mktemp -d "${TMPDIR:-/tmp}/keel-bench-ratelimit.XXXXXX")"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  for pid in "${pids[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$workdir"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
json_field() { python3 -c 'import json, sys
value = json.load(sys.stdin)
for key in sys.argv[1:]:
    value = value[key]
print(value)' "$@"; }

modes=(off local redis-1 redis)
declare -A base token
for mode in "${modes[@]}"; do
  port="$(free_port)"
  mkdir -p "$workdir/$mode"
  # redis-1: no shares; the others: keel's default, or BENCH_SHARE_MAX.
  share_env=()
  [[ -z "${BENCH_SHARE_MAX:-}" ]] || share_env=(KEEL_RATE_LIMIT_SHARE_MAX="$BENCH_SHARE_MAX")
  [[ "$mode" != redis-1 ]] || share_env=(KEEL_RATE_LIMIT_SHARE_MAX=1)
  env KEEL_LISTEN="127.0.0.1:$port" KEEL_DATA_DIR="$workdir/$mode" KEEL_REDIS_URL="$redis_url" \
    KEEL_DEPLOYMENT="bench-ratelimit-$$-$mode" KEEL_RATE_LIMITER="${mode%-1}" "${share_env[@]}" \
    KEEL_RATE_LIMITS="default=1000000000/60" KEEL_ACCESS_TOKEN_TTL_SECONDS=86400 \
    KEEL_LOG=warn KEEL_LOG_FORMAT=json \
    "${keel_pin[@]}" "$KEEL_BIN" serve >"$workdir/$mode.log" 2>&1 &
  pids+=("$!")
  base[$mode]="http://127.0.0.1:$port"
done
for mode in "${modes[@]}"; do
  deadline=$((SECONDS + 30))
  until curl -sf --max-time 2 "${base[$mode]}/healthz" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || fail "keel ($mode) did not become healthy: $(tail -n 5 "$workdir/$mode.log")"
    sleep 0.2
  done
  email="bench-$mode@example.com"
  password="correct horse battery staple"
  curl -sf --max-time 20 -H 'content-type: application/json' \
    -d "{\"email\":\"$email\",\"password\":\"$password\",\"displayName\":\"Bench\"}" \
    "${base[$mode]}/v1/auth/register" >/dev/null || fail "register ($mode) failed"
  token[$mode]="$(curl -sf --max-time 20 -H 'content-type: application/json' \
    -d "{\"email\":\"$email\",\"password\":\"$password\"}" "${base[$mode]}/v1/auth/login" |
    json_field data tokens accessToken)" || fail "login ($mode) failed"
  headers="$(curl -sf -D - -o /dev/null -H "authorization: Bearer ${token[$mode]}" "${base[$mode]}/v1/users/me")" ||
    fail "GET /v1/users/me ($mode) failed"
  if [[ $mode == off ]]; then
    grep -qi '^ratelimit:' <<<"$headers" && fail "the limiter is on in the 'off' keel"
  else
    grep -qi '^ratelimit:' <<<"$headers" || fail "no RateLimit header from the '$mode' keel"
  fi
done

# wrk's summary as "req/s non-2xx-or-errors p50_ms p99_ms".
parse() { python3 - "$1" <<'EOF'
import re, sys
text = open(sys.argv[1]).read()
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
bad = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses:\s+(\d+)", text))
bad += sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", text))
def ms(label):
    match = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
    if not match:
        return float("nan")
    value, unit = float(match.group(1)), match.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value
print(rps, bad, ms("50"), ms("99"))
EOF
}

say "$(wrk -v 2>&1 | head -n 1 | awk '{print $1, $2}'); $concurrency connections, ${warmup} s warm-up + ${duration} s per row, $rounds rounds; $(nproc) cores"
for round in $(seq 1 "$rounds"); do
  for mode in "${modes[@]}"; do
    url="${base[$mode]}/v1/users/me"
    auth="authorization: Bearer ${token[$mode]}"
    if ((warmup > 0)); then
      "${load_pin[@]}" wrk -t1 -c"$concurrency" -d"${warmup}s" -H "$auth" "$url" >/dev/null 2>&1 ||
        fail "wrk warm-up ($mode) failed"
    fi
    out="$workdir/wrk-$mode-$round.txt"
    "${load_pin[@]}" wrk -t1 -c"$concurrency" -d"${duration}s" --latency --timeout 10s -H "$auth" "$url" >"$out" 2>&1 ||
      fail "wrk ($mode) failed: $(tail -n 5 "$out")"
    read -r rps bad p50 p99 <<<"$(parse "$out")"
    ((bad == 0)) || fail "$mode, round $round: $bad calls failed or were refused"
    say "round $round, $mode: $rps req/s, p50 $p50 ms, p99 $p99 ms"
    printf '%s %s %s %s\n' "$mode" "$rps" "$p50" "$p99" >>"$workdir/results.txt"
  done
done

python3 - "$workdir/results.txt" <<'EOF'
import sys
from collections import defaultdict
rows = defaultdict(list)
for line in open(sys.argv[1]):
    mode, rps, p50, p99 = line.split()
    rows[mode].append((float(rps), float(p50), float(p99)))
mean = lambda values: sum(values) / len(values)
off = mean([r[0] for r in rows["off"]])
targets = {"off": None, "local": 0.9, "redis-1": 0.8, "redis": 0.8}
labels = {"off": "limiter off", "local": "in process", "redis-1": "Redis, a round trip per call (share max 1)",
          "redis": "Redis, hot keys take shares (default)"}
print("| GET /v1/users/me | req/s | p50 ms | p99 ms | ratio to off | ratio, per round | target |")
print("|---|---:|---:|---:|---:|---|---:|")
missed = False
for mode in ("off", "local", "redis-1", "redis"):
    rps = mean([r[0] for r in rows[mode]])
    ratio = rps / off
    target = targets[mode]
    verdict = "" if target is None else f"{target} {'met' if ratio >= target else 'MISSED'}"
    missed |= target is not None and ratio < target
    per_round = ", ".join(f"{r[0] / o[0]:.2f}" for r, o in zip(rows[mode], rows["off"]))
    print(f"| {labels[mode]} | {rps:.0f} | {mean([r[1] for r in rows[mode]]):.2f} | "
          f"{mean([r[2] for r in rows[mode]]):.2f} | {ratio:.2f} | {per_round} | {verdict} |")
EOF
