#!/usr/bin/env bash
# The GPU build of the agent: `lathe` with the `cuda` feature, glibc and dynamically linked,
# for GPU gateways (x86_64 boxes with an NVIDIA card, aarch64 Jetson-class boxes on JetPack 6,
# glibc 2.35). CUDA is loaded when the agent starts, so no toolkit is needed to build; the
# box needs the NVIDIA driver and the CUDA 12 libraries (cudart, cublas, nvrtc, cudnn).
# Then the fallback test: this build, asked for the GPU on a box without one, runs the
# convolutional fixtures on the CPU, says why, and matches onnxruntime (agent/tests/gpu.rs).
#   cross/gpu.sh                      # both targets, release profile, and the fallback test
#   PROFILE=cross-check GPU_TARGETS=aarch64-unknown-linux-gnu.2.35 cross/gpu.sh   # CI: the
#                                     # test builds the feature for x86_64 already
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE="${PROFILE:-release}"
read -r -a TARGETS <<< "${GPU_TARGETS:-x86_64-unknown-linux-gnu aarch64-unknown-linux-gnu.2.35}"

need_pip() { python3 -m pip install -q --disable-pip-version-check "$@"; }
command -v cargo-zigbuild >/dev/null 2>&1 || need_pip cargo-zigbuild
python3 -c 'import ziglang' 2>/dev/null || need_pip ziglang
for t in "${TARGETS[@]}"; do rustup target add "${t%.2.*}" >/dev/null; done

dir=$PROFILE; [ "$PROFILE" = dev ] && dir=debug
for t in "${TARGETS[@]}"; do
    echo "building lathe with cuda for $t ($PROFILE)"
    cargo zigbuild --locked -q -p lathe --bin lathe --features cuda --target "$t" --profile "$PROFILE"
    bin="target/${t%.2.*}/$dir/lathe"
    ls -l "$bin"
    file "$bin" 2>/dev/null || true
    if [ "${t%%-*}" = "$(uname -m)" ]; then echo "runs: $("$bin" --version)"; fi
done

echo "the fallback test, with the cuda feature"
cargo test --locked -q -p lathe --features cuda --test gpu -- --nocapture
