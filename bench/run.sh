#!/usr/bin/env bash
# Benchmark Lathe's engine against onnxruntime (C API, one thread) and, on tree models, against
# the trees compiled to C (treelite + tl2cgen, bench/compiled/), on the same models, in one run.
# Needs the onnxruntime Python wheel (only for its shared library), a C compiler, and installs
# treelite and tl2cgen from PyPI if they are missing.
#   bench/run.sh [--secs S] [MODEL ...]     (models by name in fixtures/corpus)
#   bench/run.sh --cnn | --nodes            (the convolutional fixtures)
#   bench/run.sh --nodes MODEL ...          (where a batch of each corpus model spends its time)
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c 'import onnxruntime' 2>/dev/null || python3 -m pip install -q onnxruntime
lib=$(python3 -c 'import glob, os, onnxruntime; print(sorted(glob.glob(os.path.join(os.path.dirname(onnxruntime.__file__), "capi", "libonnxruntime.so*")))[0])')
cargo build -q --locked --profile bench -p lathe-bench
echo "onnxruntime: $lib"
# The built-in bench profile writes to target/release.
exec target/release/lathe-bench --ort-lib "$lib" --compiled target/compiled "$@"
