#!/usr/bin/env bash
# The whole test suite: unit, property and integration tests (real sockets, real mock
# identity provider, real file watcher), then the deployment checks (hadolint, kustomize
# render, offline schema validation, manifest assertions).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo test --locked
deploy/validate.sh
