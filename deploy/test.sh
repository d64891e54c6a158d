#!/usr/bin/env bash
# The README's test command: installs what is missing on a fresh Debian
# machine, then runs every check and every test, the Soft-RoCE guest tests
# included. Exits non-zero on the first failure.
#
#   deploy/test.sh            everything
#   ZCMSG_SKIP_LAB=1 deploy/test.sh   host checks only (no QEMU guest)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

say() { printf '\n== %s ==\n' "$*"; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# Debian packages the cargo features need (verbs: cmake, libclang for
# rdma-mummy-sys's bindgen; topology: hwloc, udev, pkg-config).
pkgs=(cmake libclang-dev pkg-config libhwloc-dev libudev-dev valgrind)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    as_root apt-get -o DPkg::Lock::Timeout=600 update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq "${missing[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "cargo not found: install a Rust toolchain (rustup)"; exit 1; }
rustup component list --installed 2>/dev/null | grep -q rustfmt || rustup component add rustfmt clippy || true

export CARGO_TERM_COLOR=never
say "cargo fmt --check"
cargo fmt --all -- --check

say "cargo clippy (all features, all targets)"
cargo clippy --workspace --all-targets --all-features -- -D warnings

say "cargo doc"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --all-features --no-deps --quiet

say "cargo test (host)"
cargo test --workspace --all-features 2>&1 | tee target/host-tests.log

if [ "${ZCMSG_SKIP_LAB:-0}" = 1 ]; then
    say "Soft-RoCE lab skipped (ZCMSG_SKIP_LAB=1)"
    exit 0
fi
if [ -x deploy/lab-tests.sh ]; then
    say "Soft-RoCE lab: guest tests"
    deploy/lab-tests.sh
fi
say "all tests passed"
