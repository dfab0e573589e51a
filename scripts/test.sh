#!/usr/bin/env bash
# Run Lathe's whole test suite: unit, property, protocol vector and end-to-end tests.
# The end-to-end tests start their own Mosquitto brokers, so Mosquitto must be installed.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v mosquitto >/dev/null 2>&1; then
    echo "installing mosquitto (the end-to-end tests run real brokers)"
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq mosquitto >/dev/null
fi

cargo test --workspace --locked "$@"
