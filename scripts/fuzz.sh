#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets) for SECONDS each (default 30), starting from the
# committed corpus (fuzz/corpus/TARGET), and fails on the first crash, leak or timeout; the
# input that did it is left in fuzz/artifacts/TARGET. New inputs found go to a scratch corpus
# under fuzz/target, so a run leaves the committed corpus as it was.
#
# cargo-fuzz needs nightly compiler flags; RUSTC_BOOTSTRAP lets the stable toolchain take
# them. The address sanitizer is on (the default): httparse and the hash crates have unsafe
# code of their own.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-30}

command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked --quiet
export RUSTC_BOOTSTRAP=1

cargo fuzz build
for target in $(cargo fuzz list); do
    case $target in
        framing) dict=framing ;;
        static_path) dict=static_path ;;
        htpasswd) dict=htpasswd ;;
        token_raw | token_claims) dict=token ;;
        *) dict= ;;
    esac
    scratch=fuzz/target/corpus/$target
    mkdir -p "$scratch" "fuzz/corpus/$target"
    echo "--- fuzz $target for ${seconds}s"
    cargo fuzz run "$target" "$scratch" "fuzz/corpus/$target" -- \
        -max_total_time="$seconds" -timeout=10 -print_final_stats=1 \
        ${dict:+-dict=fuzz/dict/$dict.dict}
done
