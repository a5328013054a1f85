#!/usr/bin/env bash
# Builds a release and runs the whole group with the default config (conf/gatehouse.toml).
# Extra arguments go to `gatehouse run`, e.g. `scripts/run.sh --config other.toml`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-deps.sh
cargo build --release --locked
exec target/release/gatehouse run "$@"
