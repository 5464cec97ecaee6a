# Keel dev tasks. `just` itself comes from the tools venv:
#     PATH="$(scripts/tools.sh | tail -1):$PATH"

set shell := ["bash", "-euo", "pipefail", "-c"]
set positional-arguments := true

# Puts buf and grpcurl (the venv of scripts/tools.sh) on PATH for one line.
tools := 'PATH="$(scripts/tools.sh | tail -n 1):$PATH"'

test_database_url := env("KEEL_TEST_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/test")
test_redis_url := env("KEEL_TEST_REDIS_URL", "redis://127.0.0.1:6379")

# List the recipes
default:
    @{{ just_executable() }} --justfile {{ quote(justfile()) }} --list --unsorted

# Start keel in embedded mode (SQLite under ./keel-data); extra args go to keel
run *args:
    cargo run --release --bin keel -- "$@"

# Run the tests of the workspace on the embedded adapters; the ones that need PostgreSQL or Redis are listed as ignored
test *args:
    cargo test --workspace "$@"

# Run every test, the ignored cluster ones too (local PostgreSQL and Redis); e.g. `just test-pg -p keel-server`
test-pg *args:
    KEEL_TEST_DATABASE_URL={{ quote(test_database_url) }} KEEL_TEST_REDIS_URL={{ quote(test_redis_url) }} cargo test --workspace "$@" -- --include-ignored

# Check formatting and clippy (warnings are errors)
lint:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets -- -D warnings

# Format all Rust code
fmt:
    cargo fmt --all

# Lint the Protobuf contracts
proto-lint:
    {{ tools }} buf lint

# Check the contracts for breaking changes (e.g. `just proto-breaking '.git#ref=HEAD~1'`)
proto-breaking against='.git#branch=main':
    {{ tools }} buf breaking --against "$1"

# Build the release binary and call it over gRPC with grpcurl
smoke:
    scripts/smoke.sh

# Throughput and latency of GetCurrentUser as gRPC, REST (edge) and grpc-web, same load (scripts/bench-edge.sh)
bench-edge:
    scripts/bench-edge.sh

# The hot path on PostgreSQL: keel's calls beside pgbench of the same statements, CPU/call, RSS, idle transactions (scripts/bench-hotpath.sh)
bench-hotpath:
    scripts/bench-hotpath.sh

# The authenticated read with the rate limiter off, in process and on Redis, side by side, and the ratios (scripts/bench-ratelimit.sh)
bench-ratelimit:
    scripts/bench-ratelimit.sh

# A write with and without an idempotency key, side by side on PostgreSQL, and their ratio (scripts/bench-idempotency.sh)
bench-idempotency:
    scripts/bench-idempotency.sh

# Commit-to-subscriber latency (1, 100, 1000 subscribers) and relay throughput beside raw Redis pub/sub
bench-events:
    cargo build --release -p keel-events --example bench_events
    KEEL_BENCH_DATABASE_URL="${KEEL_BENCH_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}" taskset -c 0,1 target/release/examples/bench_events

# No-op jobs on PostgreSQL beside BullMQ on Redis, same jobs and concurrency: jobs/s, idle enqueue-to-start, CPU/job, 1M finished jobs (scripts/bench-jobs.sh)
bench-jobs:
    scripts/bench-jobs.sh

# Build the debug binary and call it over grpc-web from the TypeScript client (clients/ts)
ts-client:
    scripts/ts-client.sh

# The TypeScript package (clients/ts): npm pack, install into an empty project, run its example against the debug binary
ts-package:
    scripts/ts-package.sh

# The Python client (clients/python): mypy --strict and pytest against the debug binary.
python-client:
    scripts/python-client.sh

# Everything CI runs
ci:
    .ci/run

# Install buf, grpcurl and just into .venv-tools and print its bin dir
tools:
    scripts/tools.sh
