#!/usr/bin/env bash
# Benchmark the data path with the real binaries and Mosquitto: the outbox write rate while sync
# runs, and the drain of a backlog (100,000 and 1,000,000 records) with the agent's peak RSS.
#   bench/sync.sh [write|drain] [--secs S] [--records N ...]
set -euo pipefail
cd "$(dirname "$0")/.."
command -v mosquitto >/dev/null || { echo "needs mosquitto (scripts/test.sh installs it)"; exit 1; }
cargo build -q --locked --profile bench -p lathe -p lathe-hub -p lathe-bench --bin lathe --bin lathe-hub --bin lathe-sync-bench
bins=target/release
if [ $# -eq 0 ]; then
    "$bins/lathe-sync-bench" --bin-dir "$bins" write
    exec "$bins/lathe-sync-bench" --bin-dir "$bins" drain
fi
exec "$bins/lathe-sync-bench" --bin-dir "$bins" "$@"
