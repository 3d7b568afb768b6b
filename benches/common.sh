# Sourced by the benchmark scripts (from the repository root): CPU pinning, cleanup of
# the servers they start, free loopback ports, readiness, resident memory.

# Servers on the first CPU this process may use, load generators on the second (a cpuset
# need not start at CPU 0), when `taskset` is there.
SERVER_PIN=(); CLIENT_PIN=()
read -r CPU_A CPU_B < <(python3 -c 'import os; print(*sorted(os.sched_getaffinity(0))[:2])')
if command -v taskset >/dev/null && [ -n "${CPU_B:-}" ]; then
  SERVER_PIN=(taskset -c "$CPU_A"); CLIENT_PIN=(taskset -c "$CPU_B")
fi

work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
wait_ready() { # url, timeout seconds
  local deadline=$((SECONDS + $2))
  until curl -fsS -o /dev/null "$1" 2>/dev/null; do
    [ $SECONDS -lt $deadline ] || { echo "timed out waiting for $1" >&2; exit 1; }
    sleep 0.05
  done
}
rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
