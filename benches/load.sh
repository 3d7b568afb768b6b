#!/usr/bin/env bash
# Side-by-side load comparison (target P1) and process-level measurements (P5 memory, P7).
#
#   benches/load.sh [ACCOUNTS=1000] [ROUNDS=5] [DURATION=10s] [CONNECTIONS=32]
#
# Starts, all on 127.0.0.1: the mock identity provider (examples/mock_idp.rs, ~2 KB tokens
# like Microsoft's JWTs), the release sidecar on a generated config with ACCOUNTS OAuth
# accounts, pre-warmed, and the floor server (examples/floor.rs: bare hyper answering the
# same body bytes). Then alternates wrk runs against the two ROUNDS times (same client,
# same request mix: a random account per request, Basic credentials on every request) and
# prints req/s, p50 and p99 for each and the ratio. Also prints start-to-ready without
# pre-warm, idle RSS, RSS with ACCOUNTS warm tokens, and the stripped binary size.
# Everything stops by itself; nothing leaves loopback. SIDECAR_BIN names another sidecar
# binary to measure instead of this tree's (an A/B against an older build).
#
# On a machine with 2+ usable cores and `taskset`, the servers run on the first and wrk
# on the second: unpinned, the scheduler sometimes puts wrk beside the server under test,
# and the ratio then swings by ±10 % between identical runs. Rounds alternate which server
# goes first and print each server's CPU time per request (from /proc, so independent of
# how fast wrk could push); the summary gives the mean ratio, the median of the rounds'
# ratios, and the CPU ratio, the steadiest of the three.
set -euo pipefail
cd "$(dirname "$0")/.."

ACCOUNTS=${1:-1000}
ROUNDS=${2:-5}
DURATION=${3:-10s}
CONNECTIONS=${4:-32}
TOKEN_BYTES=${TOKEN_BYTES:-2000}

if ! command -v wrk >/dev/null; then
  echo "installing wrk (Debian package)" >&2
  (apt-get update -qq && apt-get install -y -qq wrk) >/dev/null
fi

cargo build --release --locked --bin ee-auth-sidecar --example floor --example mock_idp 2>&1 | tail -1
BIN=${SIDECAR_BIN:-target/release/ee-auth-sidecar}
FLOOR=target/release/examples/floor
MOCK=target/release/examples/mock_idp

# Pinning (servers on the first CPU, the load generator on the second; see the header),
# cleanup, ports, readiness.
. benches/common.sh

MOCK_PORT=$(port); SIDE_PORT=$(port); FLOOR_PORT=$(port)
"$MOCK" "127.0.0.1:$MOCK_PORT" 3600 "$TOKEN_BYTES" >"$work/mock.out" 2>"$work/mock.err" &
pids+=($!)
python3 benches/accounts.py "$work/accounts.json" "$ACCOUNTS" "http://127.0.0.1:$MOCK_PORT/token"
sleep 0.3

# P7: start to ready without pre-warm, and idle RSS (no token fetched yet).
start_ns=$(date +%s%N)
"$BIN" serve --config "$work/accounts.json" --listen "127.0.0.1:$SIDE_PORT" --prewarm-concurrency 0 --log-level warn 2>"$work/cold.err" &
cold=$!
until curl -fsS -o /dev/null "http://127.0.0.1:$SIDE_PORT/readyz" 2>/dev/null; do sleep 0.001; done
ready_ms=$(( ($(date +%s%N) - start_ns) / 1000000 ))
sleep 1
idle_rss=$(rss_kb $cold)
kill $cold; wait $cold 2>/dev/null || true

# The measured sidecar: pre-warmed.
"${SERVER_PIN[@]}" "$BIN" serve --config "$work/accounts.json" --listen "127.0.0.1:$SIDE_PORT" --prewarm-concurrency 16 --prewarm-timeout 120s --log-level warn ${SIDECAR_FLAGS:-} 2>"$work/sidecar.err" &
side=$!; pids+=($side)
wait_ready "http://127.0.0.1:$SIDE_PORT/readyz" 180
warm_rss=$(rss_kb $side)
AUTH="Basic $(printf 'emailengine:load-test-password' | base64 -w0)"
curl -fsS -H "Authorization: $AUTH" "http://127.0.0.1:$SIDE_PORT/authentication?account=acct-0&proto=imap" >"$work/body.json"
"${SERVER_PIN[@]}" "$FLOOR" "127.0.0.1:$FLOOR_PORT" "$work/body.json" &
floor=$!; pids+=($floor)
wait_ready "http://127.0.0.1:$FLOOR_PORT/" 10

cat >"$work/mix.lua" <<LUA
wrk.headers["Authorization"] = "$AUTH"
local n = $ACCOUNTS
request = function()
  return wrk.format("GET", "/authentication?account=acct-" .. math.random(0, n - 1) .. "&proto=imap")
end
LUA

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
run() { # name port pid -> "rps p50 p99 cpu_us_per_request"
  local out c0 c1
  c0=$(cpu_ticks "$3")
  out=$("${CLIENT_PIN[@]}" wrk -t1 -c"$CONNECTIONS" -d"$DURATION" --latency -s "$work/mix.lua" "http://127.0.0.1:$2" 2>&1)
  c1=$(cpu_ticks "$3")
  if echo "$out" | grep -q "Non-2xx"; then echo "$1: non-2xx answers" >&2; echo "$out" >&2; exit 1; fi
  local rps p50 p99 n
  rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
  p50=$(echo "$out" | awk '$1=="50%" {print $2}')
  p99=$(echo "$out" | awk '$1=="99%" {print $2}')
  n=$(echo "$out" | awk '/requests in/ {print $1}')
  if [ -z "$n" ] || [ "$n" = 0 ]; then echo "$1: wrk completed no request" >&2; echo "$out" >&2; exit 1; fi
  echo "$rps $p50 $p99 $(python3 -c "print(f'{($c1 - $c0) * 1e6 / $(getconf CLK_TCK) / $n:.2f}')")"
}

echo "accounts=$ACCOUNTS token_bytes=$TOKEN_BYTES body_bytes=$(wc -c <"$work/body.json") rounds=$ROUNDS duration=$DURATION connections=$CONNECTIONS cores=$(nproc) pinned=$([ ${#SERVER_PIN[@]} -gt 0 ] && echo yes || echo no)"
printf '%-6s %-8s %12s %10s %10s %12s\n' round server req/s p50 p99 cpu-us/req
results=()
for r in $(seq 1 "$ROUNDS"); do
  # Alternate which server goes first, so a drift in the machine's speed hits both.
  if [ $((r % 2)) = 1 ]; then
    read -r s_rps s_p50 s_p99 s_cpu < <(run sidecar "$SIDE_PORT" "$side")
    read -r f_rps f_p50 f_p99 f_cpu < <(run floor "$FLOOR_PORT" "$floor")
  else
    read -r f_rps f_p50 f_p99 f_cpu < <(run floor "$FLOOR_PORT" "$floor")
    read -r s_rps s_p50 s_p99 s_cpu < <(run sidecar "$SIDE_PORT" "$side")
  fi
  printf '%-6s %-8s %12s %10s %10s %12s\n' "$r" sidecar "$s_rps" "$s_p50" "$s_p99" "$s_cpu"
  printf '%-6s %-8s %12s %10s %10s %12s\n' "$r" floor "$f_rps" "$f_p50" "$f_p99" "$f_cpu"
  results+=("$s_rps $f_rps $s_cpu $f_cpu")
done
printf '%s\n' "${results[@]}" | python3 -c '
import statistics, sys
rows = [tuple(map(float, l.split())) for l in sys.stdin if l.strip()]
s = statistics.mean(r[0] for r in rows); f = statistics.mean(r[1] for r in rows)
per_round = [r[0] / r[1] for r in rows]
sc = statistics.mean(r[2] for r in rows); fc = statistics.mean(r[3] for r in rows)
print(f"mean req/s: sidecar {s:.0f}, floor {f:.0f}, ratio {s / f:.3f} (P1 target >= 0.90); "
      f"median of the rounds ratios {statistics.median(per_round):.3f}")
print(f"CPU per request: sidecar {sc:.2f} us, floor {fc:.2f} us, floor/sidecar {fc / sc:.3f}")
'

# P5: cache-hit latency while the whole map is reloaded (one account changes every 2 s,
# so every reload parses, validates and diffs all ACCOUNTS).
python3 - "$work/accounts.json" <<'PY'
import json, sys
cfg = json.load(open(sys.argv[1]))
cfg["accounts"]["acct-0"]["refreshToken"] = "rt-0-changed"
json.dump(cfg, open(sys.argv[1] + ".b", "w"))
PY
cp "$work/accounts.json" "$work/accounts.json.a"
( end=$((SECONDS + 12)); flip=0
  while [ $SECONDS -lt $end ]; do
    if [ $flip = 0 ]; then cp "$work/accounts.json.b" "$work/accounts.json.tmp"; flip=1
    else cp "$work/accounts.json.a" "$work/accounts.json.tmp"; flip=0; fi
    mv "$work/accounts.json.tmp" "$work/accounts.json"
    sleep 2
  done ) &
reloader=$!
read -r r_rps r_p50 r_p99 _ < <(run sidecar-reloading "$SIDE_PORT" "$side")
wait $reloader
reloads=$(curl -fsS "http://127.0.0.1:$SIDE_PORT/metrics" | awk '/^ee_auth_config_reloads_total\{outcome="ok"\}/ {print $2}')
echo "during reloads of all $ACCOUNTS accounts every 2 s: $r_rps req/s, p50 $r_p50, p99 $r_p99 (P5 target p99 <= 10 ms); reloads ok so far: $reloads"

strip_dir=$(mktemp -d); cp "$BIN" "$strip_dir/bin"; strip "$strip_dir/bin"
size=$(stat -c %s "$strip_dir/bin"); rm -rf "$strip_dir"
after_rss=$(rss_kb $side)
echo "start-to-ready (no pre-warm): ${ready_ms} ms (P7 target <= 50 ms)"
echo "idle RSS (no tokens): $((idle_rss / 1024)) MiB (P7 target <= 15 MB)"
echo "RSS with $ACCOUNTS warm tokens: $((warm_rss / 1024)) MiB after warm-up, $((after_rss / 1024)) MiB after load"
python3 -c "n=$ACCOUNTS; b=$TOKEN_BYTES; rss=$warm_rss*1024; budget=n*(b+1536); print(f'P5 memory: {rss/n:.0f} bytes/account resident (token {b} B); budget token+1.5KiB = {budget/1048576:.1f} MiB, rss {rss/1048576:.1f} MiB')"
echo "stripped release binary: $((size / 1024)) KiB (P7 target <= 12 MB)"
grep -q "calls=" "$work/mock.err" && tail -1 "$work/mock.err" || true
