#!/usr/bin/env bash
# Admin API and /metrics cost at scale, and what they do to token latency (issue #13, item 8).
#
#   benches/admin.sh [ACCOUNTS...]        (default: 10000 40000 100000)
#
# For each size: starts the mock identity provider (examples/mock_idp.rs, ~2 KB tokens) and
# the release sidecar on a generated config (benches/accounts.py), pre-warmed so that every
# account has a status to show. Then measures, with curl's time_total (median of REPS):
#   - GET /v1/accounts (the whole list) and GET /v1/accounts?limit=1000 (one page);
#   - GET /v1/accounts/{id} (one account);
#   - GET /metrics (one scrape);
# and runs wrk on the token endpoint (random account per request, 8 connections) twice:
# alone, then while one client loops over the whole list and four poll /metrics without
# pause, each on a keep-alive connection (benches/pollers.py; all clients on the second CPU). Prints the token p50/p99 of both runs, and how
# many lists and scrapes the pollers completed meanwhile. Everything stops by itself;
# nothing leaves loopback. Servers on the first allowed CPU and clients on the second when `taskset` is there.
set -euo pipefail
cd "$(dirname "$0")/.."

SIZES=("$@")
[ ${#SIZES[@]} -gt 0 ] || SIZES=(10000 40000 100000)
REPS=${REPS:-5}
DURATION=${DURATION:-10s}
TOKEN_BYTES=${TOKEN_BYTES:-2000}

command -v wrk >/dev/null || { echo "needs wrk (apt-get install wrk)" >&2; exit 1; }
cargo build --release --locked --bin ee-auth-sidecar --example mock_idp 2>&1 | tail -1
BIN=target/release/ee-auth-sidecar
MOCK=target/release/examples/mock_idp

. benches/common.sh
AUTH="Basic $(printf 'emailengine:load-test-password' | base64 -w0)"
# Median time_total in ms of REPS GETs of a URL; fails on a non-2xx answer.
timed() {
  for _ in $(seq 1 "$REPS"); do
    "${CLIENT_PIN[@]}" curl -fsS -o /dev/null -H "Authorization: $AUTH" -w '%{time_total}\n' "$1"
  done | sort -n | awk '{a[NR]=$1} END {printf "%.1f", a[int((NR+1)/2)] * 1000}'
}
token_latency() { # port accounts -> "p50 p99 req/s"
  cat >"$work/mix.lua" <<LUA
wrk.headers["Authorization"] = "$AUTH"
request = function()
  return wrk.format("GET", "/authentication?account=acct-" .. math.random(0, $2 - 1) .. "&proto=imap")
end
LUA
  local out
  out=$("${CLIENT_PIN[@]}" wrk -t1 -c8 -d"$DURATION" --latency -s "$work/mix.lua" "http://127.0.0.1:$1" 2>&1)
  if echo "$out" | grep -q "Non-2xx"; then echo "non-2xx token answers" >&2; echo "$out" >&2; exit 1; fi
  echo "$(echo "$out" | awk '$1=="50%" {print $2}') $(echo "$out" | awk '$1=="99%" {print $2}') $(echo "$out" | awk '/Requests\/sec/ {print $2}')"
}

echo "reps=$REPS duration=$DURATION token_bytes=$TOKEN_BYTES cores=$(nproc) pinned=$([ ${#SERVER_PIN[@]} -gt 0 ] && echo yes || echo no)"
printf '%-8s %10s %9s %10s %9s %9s %9s | %-22s %-22s %s\n' accounts list-ms list-MB page-ms one-ms metrics-ms ready-s \
  "token alone p50/p99" "token+pollers p50/p99" "list-runs/scrapes"
for n in "${SIZES[@]}"; do
  MOCK_PORT=$(port); SIDE_PORT=$(port)
  "$MOCK" "127.0.0.1:$MOCK_PORT" 3600 "$TOKEN_BYTES" >"$work/mock.out" 2>"$work/mock.err" &
  mock=$!; pids+=($mock)
  python3 benches/accounts.py "$work/accounts.json" "$n" "http://127.0.0.1:$MOCK_PORT/token"
  sleep 0.3
  t0=$SECONDS
  "${SERVER_PIN[@]}" "$BIN" serve --config "$work/accounts.json" --listen "127.0.0.1:$SIDE_PORT" \
    --prewarm-concurrency 16 --prewarm-timeout 600s --log-level warn 2>"$work/sidecar.err" &
  side=$!; pids+=($side)
  wait_ready "http://127.0.0.1:$SIDE_PORT/readyz" 900
  ready_s=$((SECONDS - t0))
  base="http://127.0.0.1:$SIDE_PORT"
  list_bytes=$(curl -fsS -H "Authorization: $AUTH" "$base/v1/accounts" | wc -c)
  list_ms=$(timed "$base/v1/accounts")
  page_ms=$(timed "$base/v1/accounts?limit=1000&offset=$((n / 2))")
  one_ms=$(timed "$base/v1/accounts/acct-$((n / 3))")
  metrics_ms=$(timed "$base/metrics")
  read -r a50 a99 _ < <(token_latency "$SIDE_PORT" "$n")
  # Pollers: one client fetching the whole list in a loop, four scraping /metrics, each on
  # a keep-alive connection (benches/pollers.py). POLLERS=list|scrapes keeps one kind.
  secs=${DURATION%s}
  "${CLIENT_PIN[@]}" python3 benches/pollers.py 127.0.0.1 "$SIDE_PORT" "$AUTH" "$((secs + 1))" "${POLLERS:-all}" >"$work/polls" &
  poller=$!
  read -r b50 b99 _ < <(token_latency "$SIDE_PORT" "$n")
  wait $poller
  runs="$(awk '{print $1 "/" $2}' "$work/polls")"
  printf '%-8s %10s %9.1f %10s %9s %9s %9s | %-22s %-22s %s\n' "$n" "$list_ms" "$(echo "$list_bytes / 1048576" | bc -l)" \
    "$page_ms" "$one_ms" "$metrics_ms" "$ready_s" "$a50/$a99" "$b50/$b99" "$runs"
  kill $side $mock 2>/dev/null || true; wait $side $mock 2>/dev/null || true
done
