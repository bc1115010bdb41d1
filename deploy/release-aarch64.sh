#!/usr/bin/env bash
# The aarch64 release binary: linked with zig against glibc 2.31's symbol versions, so that it
# starts on Raspberry Pi OS bullseye and JetPack 5 (Ubuntu 20.04) as well as on newer systems.
# Installs zig and cargo-zigbuild from PyPI into target/zig-venv; builds in its own target
# folder; fails if the binary needs a glibc symbol newer than 2.31 or does not start.
# Needs: rustup's aarch64-unknown-linux-gnu target, python3 with venv, and
# aarch64-linux-gnu-readelf (binutils-aarch64-linux-gnu); qemu-aarch64 off arm64 machines.
set -euo pipefail
cd "$(dirname "$0")/.."

GLIBC=2.31
ZIGLANG_VERSION=0.17.1
ZIGBUILD_VERSION=0.24.1
venv=target/zig-venv
out_dir=target/release-aarch64

if [ ! -x "$venv/bin/cargo-zigbuild" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet "ziglang==$ZIGLANG_VERSION" "cargo-zigbuild==$ZIGBUILD_VERSION"
fi
# cargo-zigbuild finds zig as the ziglang package of the python3 first on PATH.
export PATH="$PWD/$venv/bin:$PATH"

CARGO_TARGET_DIR=$out_dir cargo zigbuild --release --locked --bin easel \
  --target "aarch64-unknown-linux-gnu.$GLIBC"
bin=$out_dir/aarch64-unknown-linux-gnu/release/easel

# The newest GLIBC_x.y version the binary asks for.
newest=$(aarch64-linux-gnu-readelf -V --wide "$bin" | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' |
  sort -t. -k1,1n -k2,2n -k3,3n | tail -1)
if [ "$(printf '%s\n%s\n' "$newest" "$GLIBC" | sort -t. -k1,1n -k2,2n -k3,3n | tail -1)" != "$GLIBC" ]; then
  echo "$bin needs GLIBC_$newest, newer than $GLIBC" >&2
  exit 1
fi
if [ "$(uname -m)" = aarch64 ]; then
  "$bin" --version
else
  qemu-aarch64 -L /usr/aarch64-linux-gnu "$bin" --version
fi
echo "$bin: needs at most GLIBC_$newest (limit $GLIBC)"
