#!/usr/bin/env bash
# Build the release artefacts for both architectures, then measure the footprint budgets:
# binary sizes, start-up to READY, idle RSS (bench/footprint.py; BENCHMARKS.md, "Footprint").
set -euo pipefail
cd "$(dirname "$0")/.."
command -v mosquitto >/dev/null || { echo "needs mosquitto (scripts/test.sh installs it)"; exit 1; }
cross/build.sh
cargo build -q --locked -p lathe-hub
exec python3 bench/footprint.py --lathe target/x86_64-unknown-linux-musl/release/lathe \
    --hub target/debug/lathe-hub --size target/aarch64-unknown-linux-musl/release/lathe
