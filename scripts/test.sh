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
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]} (for the end-to-end tests)"
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# The export test reads Parquet back in pandas.
if ! python3 -c "import pandas, pyarrow" >/dev/null 2>&1; then
    echo "installing pandas and pyarrow (for the export test)"
    python3 -m pip install -q pandas pyarrow
fi

cargo test --workspace --locked "$@"
