#!/usr/bin/env bash
# The soak: the real sidecar binary serving SOAK_ACCOUNTS (1000) accounts with
# SOAK_LIFETIME (10) s tokens at SOAK_RPS (200) requests/s for SOAK_SECS (1800) s, while the
# mock identity provider fails SOAK_FAILURE_RATE (0.05) of token requests with 503.
# Prints RSS after warm-up and at the end, errors, latency and upstream calls per account
# per lifetime; fails if RSS moves more than 10 %, if an account holding a valid token is
# refused, or if an expired token is served. Stops by itself.
#   scripts/soak.sh                 # 30 minutes
#   SOAK_SECS=180 scripts/soak.sh   # the 3-minute smoke version
set -euo pipefail
cd "$(dirname "$0")/.."

exec cargo test --locked --test soak -- --ignored --nocapture
