#!/usr/bin/env bash
# Run Lathe's whole test suite: unit, property, protocol vector and end-to-end tests.
# The end-to-end tests start their own Mosquitto brokers, so Mosquitto must be installed.
set -euo pipefail
cd "$(dirname "$0")/.."

# The end-to-end tests run real brokers (Mosquitto; NATS for a broker that refuses
# subscriptions) and step the agent's wall clock with libfaketime.
missing=()
command -v mosquitto >/dev/null 2>&1 || missing+=(mosquitto)
command -v nats-server >/dev/null 2>&1 || missing+=(nats-server)
[ -e /usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1 ] || missing+=(faketime)
# The unit file is checked with systemd-analyze.
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]} (for the end-to-end tests)"
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# The export test reads Parquet back in pandas; the local API is tested with stock clients
# (tritonclient for the Open Inference Protocol, prometheus_client's text-format parser).
if ! python3 -c "import pandas, pyarrow" >/dev/null 2>&1; then
    echo "installing pandas and pyarrow (for the export test)"
    python3 -m pip install -q pandas pyarrow
fi
if ! python3 -c "import tritonclient.http, prometheus_client, numpy" >/dev/null 2>&1; then
    echo "installing tritonclient[http], prometheus-client and numpy (for the local API tests)"
    python3 -m pip install -q "tritonclient[http]" prometheus-client numpy
fi

cargo test --workspace --locked "$@"
