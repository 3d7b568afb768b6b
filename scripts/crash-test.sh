#!/usr/bin/env bash
# Crash safety of rotated refresh tokens, the long run: starts the real binary against a
# rotating, reuse-detecting mock identity provider and SIGKILLs it CRASH_KILLS times
# (default 200) at random moments, restarting it on the same --state-dir each time.
# Prints the outcome (kills, kills inside the rotation window, accounts lost, reuse
# detections) and fails if any account is lost. Each run draws fresh kill moments
# (CRASH_SEED=random); CRASH_SEED=<n> replays a run's schedule.
# CI runs the short version (15 kills) as part of `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

export CRASH_KILLS="${CRASH_KILLS:-200}"
export CRASH_SEED="${CRASH_SEED:-random}"
exec cargo test --locked --test crash kill_9_many_times_loses_no_account -- --ignored --nocapture
