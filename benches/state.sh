#!/usr/bin/env bash
# The state store's costs (issue 17): restart-to-warm for ACCOUNTS accounts from the Redis
# store vs from the provider, and what the store adds to one refresh (lease, re-read,
# compare-and-set write, release) for each store.
#
#   benches/state.sh [ACCOUNTS=10000] [DELAY_MS=100]
#
# Starts redis-server (no persistence) on a free port, the mock identity provider
# (examples/mock_idp.rs) and the release sidecar, all on loopback.
#  1. Restart-to-warm: the provider answers after DELAY_MS (a real one takes ~100 ms);
#     the sidecar on the Redis store (sealed) pre-warms from it (--prewarm-concurrency 16),
#     is stopped (SIGTERM) and started again: seconds from spawn to /readyz, and upstream
#     calls, of each start.
#  2. Per refresh: a provider that answers at once and rotates every refresh token;
#     pre-warm one account at a time (--prewarm-concurrency 1) on each store; the store's
#     cost per refresh is (time - time in memory) / ACCOUNTS.
set -euo pipefail
cd "$(dirname "$0")/.."

ACCOUNTS=${1:-10000}
DELAY_MS=${2:-100}

cargo build --release --locked --bin ee-auth-sidecar --example mock_idp 2>&1 | tail -1
. benches/common.sh
command -v redis-server >/dev/null || { echo "needs redis-server (apt-get install redis-server)" >&2; exit 1; }

RPORT=$(port)
redis-server --port "$RPORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$work" \
  --maxmemory-policy noeviction >/dev/null 2>&1 &
pids+=($!)
until redis-cli -p "$RPORT" ping 2>/dev/null | grep -q PONG; do sleep 0.05; done
REDIS="redis://127.0.0.1:$RPORT/0"
head -c32 /dev/urandom | base64 >"$work/state.key"

start_mock() { # delay_ms rotate
  MOCK_PORT=$(port)
  : >"$work/mock.out"
  target/release/examples/mock_idp "127.0.0.1:$MOCK_PORT" 3600 2000 0 "$1" "$2" >"$work/mock.out" 2>/dev/null &
  mock=$!; pids+=($mock)
  until grep -q listening "$work/mock.out"; do sleep 0.05; done
  python3 benches/accounts.py "$work/accounts.json" "$ACCOUNTS" "http://127.0.0.1:$MOCK_PORT/token"
}
upstream_calls() {
  curl -fsS "http://127.0.0.1:$SIDE_PORT/metrics" |
    awk '/^ee_auth_upstream_duration_seconds_count/ {s+=$2} END {print s+0}'
}
# Starts the sidecar with the given flags (in this shell: `side` is its pid); sets `secs`
# (spawn to /readyz) and `calls` (upstream calls made by then).
start_sidecar() {
  SIDE_PORT=$(port)
  local t0 t1
  t0=$(date +%s.%N)
  "${SERVER_PIN[@]}" target/release/ee-auth-sidecar serve --config "$work/accounts.json" \
    --listen "127.0.0.1:$SIDE_PORT" --prewarm-timeout 900s --log-level error "$@" \
    2>>"$work/sidecar.err" &
  side=$!; pids+=($side)
  wait_ready "http://127.0.0.1:$SIDE_PORT/readyz" 900
  t1=$(date +%s.%N)
  secs=$(python3 -c "print(f'{$t1 - $t0:.2f}')")
  calls=$(upstream_calls)
}
stop_sidecar() { kill -TERM "$side"; wait "$side" 2>/dev/null || true; }

echo "accounts=$ACCOUNTS provider_delay=${DELAY_MS}ms cores=$(nproc) $(redis-server --version | cut -d' ' -f3)"
start_mock "$DELAY_MS" 0
sealed=(--state "$REDIS" --state-prefix warm: --state-key-file "$work/state.key" --prewarm-concurrency 16)
start_sidecar "${sealed[@]}"
echo "1. cold start, tokens from the provider: ready in ${secs} s, ${calls} upstream calls"
stop_sidecar
start_sidecar "${sealed[@]}"
echo "1. restart on the warm Redis store:       ready in ${secs} s, ${calls} upstream calls"
stop_sidecar
kill "$mock"

start_mock 0 1
start_sidecar --prewarm-concurrency 1; mem=$secs
stop_sidecar
start_sidecar --prewarm-concurrency 1 --state-dir "$work/state"; dir=$secs
stop_sidecar
start_sidecar --prewarm-concurrency 1 --state "$REDIS" --state-prefix lock:; red=$secs
stop_sidecar
start_sidecar --prewarm-concurrency 1 --state "$REDIS" --state-prefix sealed: --state-key-file "$work/state.key"; sred=$secs
stop_sidecar
python3 - "$ACCOUNTS" "$mem" "$dir" "$red" "$sred" <<'PY'
import sys
n, mem, d, r, s = int(sys.argv[1]), *map(float, sys.argv[2:])
print(f"2. {n} rotating refreshes one at a time: memory {mem:.2f} s ({mem / n * 1e3:.3f} ms each)")
for label, t in (("directory (fsync)", d), ("Redis", r), ("Redis, sealed", s)):
    print(f"   {label}: {t:.2f} s, +{(t - mem) / n * 1e3:.3f} ms per refresh")
PY
