#!/usr/bin/env bash
# Resident memory with many warm tokens (target P5), after warm-up and in steady state.
#
#   benches/memory.sh [ACCOUNTS=100000] [LIFETIME=60] [SPREAD=0]
#
# Starts the mock identity provider (examples/mock_idp.rs, 2,000-byte tokens that live
# LIFETIME seconds) and the release sidecar on a generated config of ACCOUNTS OAuth
# accounts, pre-warmed. Prints RSS once pre-warm is done, then again after LIFETIME + 15 s,
# when every token has been refreshed once in the background: refresh churn (each refresh
# frees ~2 KB buffers between long-lived ones) is what a long-running sidecar lives with,
# so the second number is the one that counts. Budget: token bytes + 1.5 KiB per account.
# With SPREAD, each token is up to SPREAD bytes longer or shorter than 2,000 (uniformly,
# a new length at every refresh): the budget counts the mean.
# No load generator; everything stays on loopback and stops by itself.
set -euo pipefail
cd "$(dirname "$0")/.."

ACCOUNTS=${1:-100000}
LIFETIME=${2:-60}
SPREAD=${3:-0}
TOKEN_BYTES=2000

cargo build --release --locked --bin ee-auth-sidecar --example mock_idp 2>&1 | tail -1
. benches/common.sh
report() { # label rss_kb
  python3 -c "n=$ACCOUNTS; rss=$2*1024; budget=n*($TOKEN_BYTES+1536); print(f'$1: rss {rss/1048576:.1f} MiB, {rss/n:.0f} B/account; budget token+1.5KiB = {budget/1048576:.1f} MiB')"
}

MOCK_PORT=$(port); SIDE_PORT=$(port)
target/release/examples/mock_idp "127.0.0.1:$MOCK_PORT" "$LIFETIME" "$TOKEN_BYTES" 0 0 0 "$SPREAD" >"$work/mock.out" 2>"$work/mock.err" &
pids+=($!)
python3 benches/accounts.py "$work/accounts.json" "$ACCOUNTS" "http://127.0.0.1:$MOCK_PORT/token"
sleep 0.3

target/release/ee-auth-sidecar serve --config "$work/accounts.json" --listen "127.0.0.1:$SIDE_PORT" \
  --prewarm-concurrency 16 --prewarm-timeout 600s --log-level warn 2>"$work/sidecar.err" &
side=$!; pids+=($side)
deadline=$((SECONDS + 600))
until curl -fsS -o /dev/null "http://127.0.0.1:$SIDE_PORT/readyz" 2>/dev/null; do
  [ $SECONDS -lt $deadline ] || { echo "sidecar not ready" >&2; cat "$work/sidecar.err" >&2; exit 1; }
  sleep 0.2
done
sleep 2
echo "accounts=$ACCOUNTS token_bytes=$TOKEN_BYTES spread=$SPREAD lifetime=${LIFETIME}s cores=$(nproc)"
report "after pre-warm" "$(rss_kb $side)"
sleep $((LIFETIME + 15))
calls=$(curl -fsS "http://127.0.0.1:$SIDE_PORT/metrics" | awk '/^ee_auth_refreshes_total\{.*outcome="ok"/ {s+=$2} END {print s+0}')
report "after $((LIFETIME + 15)) s of background refreshes ($calls refreshes in all)" "$(rss_kb $side)"
