#!/usr/bin/env bash
# Runs every test: unit tests and the end-to-end tests against the real binary, a real
# redis-server and real sockets.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-deps.sh --tests
# Unit and end-to-end tests (the project has no doc tests).
cargo test --workspace --all-targets --locked "$@"
