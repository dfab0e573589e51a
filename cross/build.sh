#!/usr/bin/env bash
# The release artefacts, both architectures, one command: static builds of the agent for
# x86_64 and aarch64 (musl, cargo-zigbuild), the ARM binary's --version run under qemu-aarch64
# to prove it starts, and a Debian package of each (cargo-deb), all in target/artefacts/ with
# SHA256SUMS.
#   cross/build.sh            # both targets, release profile
#   PROFILE=cross-check cross/build.sh   # CI: quick to build, not for shipping
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE="${PROFILE:-release}"
TARGETS=(x86_64-unknown-linux-musl aarch64-unknown-linux-musl)

need_pip() { python3 -m pip install -q --disable-pip-version-check "$@"; }
command -v cargo-zigbuild >/dev/null 2>&1 || need_pip cargo-zigbuild
python3 -c 'import ziglang' 2>/dev/null || need_pip ziglang
if ! command -v qemu-aarch64 >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq qemu-user >/dev/null
fi
for t in "${TARGETS[@]}"; do rustup target add "$t" >/dev/null; done
command -v cargo-deb >/dev/null 2>&1 || cargo install -q --locked cargo-deb --version "^3"

dir=$PROFILE; [ "$PROFILE" = dev ] && dir=debug
for t in "${TARGETS[@]}"; do
    echo "building lathe for $t ($PROFILE)"
    cargo zigbuild --locked -q -p lathe --bin lathe --target "$t" --profile "$PROFILE"
    bin="target/$t/$dir/lathe"
    file "$bin" 2>/dev/null || true
    ls -l "$bin"
done

x86="target/x86_64-unknown-linux-musl/$dir/lathe"
arm="target/aarch64-unknown-linux-musl/$dir/lathe"
echo "x86_64: $("$x86" --version)"
echo "aarch64 under qemu: $(qemu-aarch64 "$arm" --version)"

out=target/artefacts
rm -rf "$out" && mkdir -p "$out"
cp "$x86" "$out/lathe-x86_64"
cp "$arm" "$out/lathe-aarch64"
for t in "${TARGETS[@]}"; do
    cargo deb -q -p lathe --target "$t" --profile "$PROFILE" --no-build --no-strip -o "$out/"
done
(cd "$out" && sha256sum -- * >SHA256SUMS && ls -l)
