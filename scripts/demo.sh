#!/usr/bin/env bash
# The whole Lathe loop on this machine, nothing to install: an embedded broker, the hub,
# a real agent process and simulated sensors.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q -p lathe -p lathe-hub
exec target/debug/lathe-hub demo --agent target/debug/lathe "$@"
