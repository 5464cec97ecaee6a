#!/usr/bin/env bash
# No-op jobs end to end, keel on PostgreSQL beside BullMQ on Redis, in one run
# (issue 14). Prints two tables:
#
#   | system | jobs/s | ratio to BullMQ | enqueue jobs/s | CPU µs/job | idle p50/p99 | targets |
#   | keel, job table | jobs/s | idle p50/p99 | empty fetch µs | ratio to the empty table |
#
# Each round runs three sides one after the other, the order rotated each
# round so that a change of the machine's load hits all three:
#
# - keel: crates/jobs/examples/bench_jobs.rs (a fresh PostgreSQL database;
#   workers and producer in one process, as BullMQ's Worker and Queue share
#   one node process below), with batched completion (the default);
# - keel-novacuum: the same with the workers' vacuum off
#   (BENCH_VACUUM_AFTER=0, as KEEL_JOBS_VACUUM_AFTER=0): autovacuum alone;
# - BullMQ: scripts/bench-jobs/bullmq.mjs (npm bullmq + ioredis, installed by
#   this script into scripts/bench-jobs/node_modules, gitignored) on the local
#   Redis, a queue of its own removed at the end.
#
# Both: BENCH_JOBS no-op jobs enqueued in batches of BENCH_BATCH while the
# workers run with concurrency BENCH_CONCURRENCY, the clock stopped when every
# job is completed in the store; then BENCH_SAMPLES single jobs on the idle
# queue, one at a time, BENCH_GAP_MS apart: enqueue call to handler start.
# keel's idle latency has two rows: the enqueue from the workers' own process
# (woken in process) and from a second pool without workers (woken only by
# PostgreSQL's NOTIFY, as another keel process is).
#
# CPU per job: the process (keel's example, or node) plus its store (the
# PostgreSQL backends of the bench database, or redis-server) over the
# throughput run, divided by the jobs. Redis and PostgreSQL are shared with
# whatever else runs on the machine; the script measures the machine's busy
# time and prints a WARNING when other processes used more than 0.2 cores.
#
# Then, once (BENCH_FINISHED > 0), keel again on the empty table and then
# with BENCH_FINISHED completed jobs in the same queue (vacuumed and analysed):
# throughput, idle latency and the fetch that finds nothing due.
#
# Environment (defaults in brackets):
#   KEEL_BENCH_DATABASE_URL  PostgreSQL server (the role creates a database) [$KEEL_TEST_DATABASE_URL, else postgres://postgres@127.0.0.1:5432/test]
#   BENCH_REDIS_URL          Redis for BullMQ, on this machine [$KEEL_TEST_REDIS_URL, else redis://127.0.0.1:6379]
#   BENCH_JOBS [50000]  BENCH_BATCH [1000]  BENCH_CONCURRENCY [50]
#   BENCH_SAMPLES [200]  BENCH_GAP_MS [5]  BENCH_ROUNDS [3]
#   BENCH_FINISHED           finished jobs for the table-size rows [1000000; 0 skips them]
#   BENCH_CPUS               taskset -c list for both sides [0,1]
#   BENCH_EXAMPLE            use this bench_jobs binary instead of building one
#   BENCH_OUT                also write the tables (Markdown) to this file
#   BENCH_KEEP               1: keep the work dir (every run's JSON) [0]
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${BENCH_OUT:-}" && "$BENCH_OUT" != /* ]]; then
  BENCH_OUT="$PWD/$BENCH_OUT"
fi
cd "$root"

database_url="${KEEL_BENCH_DATABASE_URL:-${KEEL_TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}}"
redis_url="${BENCH_REDIS_URL:-${KEEL_TEST_REDIS_URL:-redis://127.0.0.1:6379}}"
jobs="${BENCH_JOBS:-50000}"
batch="${BENCH_BATCH:-1000}"
concurrency="${BENCH_CONCURRENCY:-50}"
samples="${BENCH_SAMPLES:-200}"
gap_ms="${BENCH_GAP_MS:-5}"
rounds="${BENCH_ROUNDS:-3}"
finished="${BENCH_FINISHED:-1000000}"
cpus="${BENCH_CPUS:-0,1}"
started=$SECONDS

say() { printf 'bench-jobs: %s\n' "$*" >&2; }
fail() {
  printf 'bench-jobs: FAIL: %s\n' "$*" >&2
  exit 1
}
for setting in jobs batch concurrency samples gap_ms rounds finished; do
  [[ "${!setting}" =~ ^[0-9]+$ ]] || fail "$setting must be a whole number, not '${!setting}'"
done
((jobs >= 1 && batch >= 1 && concurrency >= 1 && rounds >= 1)) || fail "jobs, batch, concurrency and rounds must be at least 1"
# One INSERT per batch: 17 columns a job, PostgreSQL takes at most 65535 parameters.
((batch <= 3000)) || fail "BENCH_BATCH must be at most 3000 (one INSERT of 17 parameters a job)"
case "$redis_url" in
redis://127.0.0.1* | redis://localhost*) ;;
*) fail "BENCH_REDIS_URL must be a Redis on this machine (loopback), not $redis_url" ;;
esac

command -v node >/dev/null || fail "node (20 or later) is needed for the BullMQ side"
command -v npm >/dev/null || fail "npm is needed to install bullmq"
command -v taskset >/dev/null || fail "taskset (util-linux) is needed"
command -v python3 >/dev/null || fail "python3 is needed"

# --- the two sides -------------------------------------------------------------
if [[ -n "${BENCH_EXAMPLE:-}" ]]; then
  example="$BENCH_EXAMPLE"
  binary_label="$example"
else
  say "building crates/jobs/examples/bench_jobs.rs (cargo build --release)"
  cargo build --release -p keel-jobs --example bench_jobs >&2 || fail "cargo build failed"
  example="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release/examples/bench_jobs"
  binary_label="built from $(git describe --always --dirty 2>/dev/null || echo 'this tree')"
fi
[[ -x "$example" ]] || fail "$example is not an executable"

node_dir="$root/scripts/bench-jobs"
if ! (cd "$node_dir" && node -e 'require.resolve("bullmq"); require.resolve("ioredis")' 2>/dev/null) ||
  [[ "$node_dir/package-lock.json" -nt "$node_dir/node_modules/.package-lock.json" ]]; then
  say "installing bullmq into scripts/bench-jobs/node_modules (npm ci)"
  (cd "$node_dir" && npm ci --no-audit --no-fund --loglevel=error >&2) || fail "npm ci failed"
fi
bullmq_version="$(cd "$node_dir" && node -p 'require("bullmq/package.json").version')"

workdir="$(mktemp -d "${TMPDIR:-/tmp}/keel-bench-jobs.XXXXXX")"
cleanup() {
  local status=$?
  if [[ "${BENCH_KEEP:-0}" == 1 || $status != 0 ]]; then
    say "work dir kept: $workdir"
  else
    rm -rf "$workdir"
  fi
}
trap cleanup EXIT

# busy jiffies of the whole machine (user+nice+system+irq+softirq+steal)
machine_busy() { awk '/^cpu /{print $2+$3+$4+$7+$8+$9}' /proc/stat; }

# run NAME COMMAND...: runs one side pinned to $cpus with the settings,
# its JSON line (last stdout line) to $workdir/NAME.json, the machine's busy
# seconds during it to $workdir/NAME.busy.
run() {
  local name="$1"
  shift
  local before after
  before="$(machine_busy)"
  env BENCH_JOBS="$jobs" BENCH_BATCH="$batch" BENCH_CONCURRENCY="$concurrency" \
    BENCH_SAMPLES="$samples" BENCH_GAP_MS="$gap_ms" KEEL_BENCH_DATABASE_URL="$database_url" \
    REDIS_URL="$redis_url" timeout 900 taskset -c "$cpus" "$@" >"$workdir/$name.out" 2>"$workdir/$name.err" ||
    { cat "$workdir/$name.err" >&2; fail "$name failed"; }
  after="$(machine_busy)"
  echo "$(((after - before)))" >"$workdir/$name.busy"
  grep '^{' "$workdir/$name.out" >"$workdir/$name.json" || fail "$name printed no result"
}

for round in $(seq "$rounds"); do
  # Rotated each round: keel, keel-novacuum, bullmq; then keel-novacuum, bullmq, keel; ...
  order=(keel keel-novacuum bullmq)
  for ((turn = 1; turn < round; turn++)); do order=("${order[@]:1}" "${order[0]}"); done
  for side in "${order[@]}"; do
    say "round $round of $rounds: $side"
    case "$side" in
    keel) run "keel-$round" env BENCH_FINISHED=0 BENCH_BATCH_COMPLETION=1 "$example" ;;
    keel-novacuum) run "keel-novacuum-$round" env BENCH_FINISHED=0 BENCH_BATCH_COMPLETION=1 BENCH_VACUUM_AFTER=0 "$example" ;;
    bullmq) run "bullmq-$round" node "$node_dir/bullmq.mjs" ;;
    esac
  done
done
if ((finished > 0)); then
  say "keel with $finished finished jobs in the table"
  run keel-finished env BENCH_FINISHED="$finished" "$example"
fi

# --- report ----------------------------------------------------------------------
notes="$workdir/notes.txt"
tables="$(python3 - "$workdir" "$rounds" "$finished" <<'EOF' 2>"$notes"
import json, statistics, sys
workdir, rounds, finished = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

def load(name):
    return [json.loads(line) for line in open(f"{workdir}/{name}.json")]

def busy(name):
    return int(open(f"{workdir}/{name}.busy").read()) / 100.0

keel = [load(f"keel-{r}")[0] for r in range(1, rounds + 1)]
novacuum = [load(f"keel-novacuum-{r}")[0] for r in range(1, rounds + 1)]
bull = [load(f"bullmq-{r}")[0] for r in range(1, rounds + 1)]
for r in range(1, rounds + 1):
    for name, row in ((f"keel-{r}", keel[r - 1]), (f"keel-novacuum-{r}", novacuum[r - 1]), (f"bullmq-{r}", bull[r - 1])):
        known = row["cpu_self_s"] + (row["cpu_store_s"] or 0)
        # Busy time covers the whole run (set-up and latency too): only a
        # rough bound on what others used during the throughput run.
        others = max(0.0, busy(name) - known) / max(row["seconds"], 1e-9)
        row["others"] = others

def med(rows, key):
    return statistics.median(row[key] for row in rows)

def spread(rows, key):
    values = [row[key] for row in rows]
    return f"{min(values):.0f}–{max(values):.0f}"

def cpu_per_job(rows):
    return statistics.median(1e6 * (row["cpu_self_s"] + (row["cpu_store_s"] or 0)) / row["jobs"] for row in rows)

def split(rows):
    own = statistics.median(1e6 * row["cpu_self_s"] / row["jobs"] for row in rows)
    store = statistics.median(1e6 * (row["cpu_store_s"] or 0) / row["jobs"] for row in rows)
    return own, store

k_rate, b_rate = med(keel, "rate"), med(bull, "rate")
ratios = [k["rate"] / b["rate"] for k, b in zip(keel, bull)]
k_p50, k_p99 = med(keel, "p50_ms"), med(keel, "p99_ms")
n_p50, n_p99 = med(keel, "notify_p50_ms"), med(keel, "notify_p99_ms")
targets = [
    ("jobs/s ≥ BullMQ's", k_rate >= b_rate),
    ("jobs/s ≥ 10,000", k_rate >= 10000),
    ("idle p50 < 5 ms (both keel rows)", max(k_p50, n_p50) < 5),
    ("idle p99 < 10 ms (both keel rows)", max(k_p99, n_p99) < 10),
]
enq = lambda rows: statistics.median(row["jobs"] / row["enqueue_seconds"] for row in rows)

def row_line(label, rows):
    rate = med(rows, "rate")
    per_round = [a["rate"] / b["rate"] for a, b in zip(rows, bull)]
    own, store = split(rows)
    if rows is bull:
        ratio = "1.00"
        latency = f"{med(rows, 'p50_ms'):.2f} / {med(rows, 'p99_ms'):.2f} / {med(rows, 'max_ms'):.2f}"
    else:
        ratio = f"{rate / b_rate:.2f} ({min(per_round):.2f}–{max(per_round):.2f})"
        latency = (f"in process {med(rows, 'p50_ms'):.2f} / {med(rows, 'p99_ms'):.2f} / {med(rows, 'max_ms'):.2f}; "
                   f"by NOTIFY {med(rows, 'notify_p50_ms'):.2f} / {med(rows, 'notify_p99_ms'):.2f} / {med(rows, 'notify_max_ms'):.2f}")
    return (f"| {label} | {rate:.0f} ({spread(rows, 'rate')}) | {ratio} | {enq(rows):.0f} "
            f"| {own:.0f} + {store:.0f} = {cpu_per_job(rows):.0f} | {latency} |")

s_rate = med(novacuum, "rate")
lines = [
    f"| system | jobs/s (median of {rounds}; min–max) | ratio to BullMQ (per round) | enqueue jobs/s | CPU µs/job: process + store = total | idle enqueue-to-start p50 / p99 / max ms |",
    "|---|---:|---:|---:|---:|---|",
    row_line("keel, PostgreSQL, batched completion", keel),
    row_line("keel, PostgreSQL, autovacuum only (KEEL_JOBS_VACUUM_AFTER=0)", novacuum),
    row_line("BullMQ {version}, Redis", bull),
]
lines.append("")
lines.append(f"The workers' vacuum: {k_rate / s_rate:.2f}× the jobs/s of autovacuum alone "
             f"({statistics.median(k['vacuums'] for k in keel):.0f} vacuums a run) "
             f"(per round {min(k['rate'] / s['rate'] for k, s in zip(keel, novacuum)):.2f}–"
             f"{max(k['rate'] / s['rate'] for k, s in zip(keel, novacuum)):.2f}).")
lines.append("")
lines.append("Targets: " + " · ".join(f"{what} {'PASS' if ok else 'MISS'}" for what, ok in targets))

if finished > 0:
    empty, full = load("keel-finished")
    slow = full["rate"] / empty["rate"]
    lines += [
        "",
        "| keel, job table | jobs/s | idle p50 / p99 ms (in process; by NOTIFY) | fetch finding nothing due, µs | jobs/s ratio to the empty table |",
        "|---|---:|---|---:|---:|",
    ]
    for label, row in ((f"empty ({empty['table_rows']} rows at the end)", empty),
                       (f"{finished} finished jobs ({full['table_rows']} rows at the end)", full)):
        lines.append(f"| {label} | {row['rate']:.0f} | {row['p50_ms']:.2f} / {row['p99_ms']:.2f}; "
                     f"{row['notify_p50_ms']:.2f} / {row['notify_p99_ms']:.2f} | {row['empty_fetch_us']:.0f} "
                     f"| {row['rate'] / empty['rate']:.2f} |")
    lines.append("")
    lines.append(f"Table size: jobs/s with {finished} finished jobs at {slow:.2f} of the empty table's, "
                 f"empty fetch {full['empty_fetch_us'] / empty['empty_fetch_us']:.2f}× "
                 f"({'PASS' if slow >= 0.9 else 'MISS'}: within 10 %)")
print("\n".join(lines))
busy_rows = [f"{name} {row['others']:.2f}" for name, rows in (("keel", keel), ("keel-novacuum", novacuum), ("bullmq", bull)) for row in rows if row["others"] > 0.2]
if busy_rows:
    print("WARNING: other processes were busy (cores, rough): " + ", ".join(busy_rows) + "; jobs/s and latencies are noisy", file=sys.stderr)
EOF
)" || { cat "$notes" >&2; fail "the report failed"; }
tables="${tables//\{version\}/$bullmq_version}"
pg_version="$(psql -X -qAt "$database_url" -c 'SHOW server_version' 2>/dev/null | awk '{print $1}' || echo '?')"
summary="$(date -u +%Y-%m-%dT%H:%MZ). keel $binary_label; PostgreSQL ${pg_version:-?}, Redis on loopback, BullMQ $bullmq_version (node $(node --version)); $jobs no-op jobs in batches of $batch, concurrency $concurrency, $samples idle samples $gap_ms ms apart, $rounds rounds; both pinned to cores $cpus; $(nproc) cores, load average at the end $(cut -d' ' -f1-3 /proc/loadavg)"
printf '\n%s\n\n%s\n\n' "$summary" "$tables"
cat "$notes" >&2
if [[ -n "${BENCH_OUT:-}" ]]; then
  { printf '%s\n\n%s\n' "$summary" "$tables"; [[ ! -s "$notes" ]] || printf '\n%s\n' "$(cat "$notes")"; } >"$BENCH_OUT"
  say "tables written to $BENCH_OUT"
fi
say "done in $((SECONDS - started)) s"
