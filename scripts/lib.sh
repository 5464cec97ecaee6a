# Shared by the scripts that start keel (smoke, ts-client, bench-edge).
# Source it; it defines functions only.

# keel_binary [cargo build flags...]: builds the keel binary and prints the
# path cargo reports for it (so CARGO_TARGET_DIR and .cargo/config.toml are
# honoured). Diagnostics and progress go to stderr.
keel_binary() {
  local artifacts
  artifacts="$(cargo build "$@" --bin keel --message-format=json-render-diagnostics)" || return 1
  python3 -c '
import json, sys
exe = ""
for line in sys.stdin:
    try:
        msg = json.loads(line)
    except ValueError:
        continue
    if msg.get("reason") == "compiler-artifact" and msg.get("target", {}).get("name") == "keel" and msg.get("executable"):
        exe = msg["executable"]
print(exe)
' <<<"$artifacts"
}

# free_port: a TCP port on 127.0.0.1 that nothing listens on right now.
free_port() {
  python3 -c '
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()
'
}

# wait_ready URL PID TIMEOUT: waits until GET URL answers 200 (python3, no
# curl needed), failing when process PID exits first or after TIMEOUT seconds.
wait_ready() {
  local url="$1" pid="$2" timeout="$3" deadline=$((SECONDS + $3))
  until python3 - "$url" <<'PY'
import sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=1) as r:
        sys.exit(0 if r.status == 200 else 1)
except Exception:
    sys.exit(1)
PY
  do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "wait_ready: process $pid exited before $url answered" >&2
      return 1
    fi
    if ((SECONDS >= deadline)); then
      echo "wait_ready: $url not 200 after ${timeout}s" >&2
      return 1
    fi
    sleep 0.2
  done
}
