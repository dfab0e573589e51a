#!/usr/bin/env bash
# What drift tracking costs per prediction, as a share of the prediction itself, on the
# 8-feature tree models of the corpus, one thread, in one run.
#   bench/drift.sh [--secs S] [--batch N]
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q --locked --profile bench -p lathe-bench --bin lathe-drift-bench
exec target/release/lathe-drift-bench "$@"
