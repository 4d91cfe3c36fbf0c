#!/usr/bin/env bash
# Runs Keel's whole test suite from a fresh clone: installs build dependencies, builds the
# guest assets (cached in ~/.cache/keel, ~4 min the first time), then format, lint and tests.
# Tests that boot guests report themselves skipped (ignored) when /dev/kvm is unusable.
source "$(dirname "$0")/common.sh"
cd "$KEEL_ROOT"

install_packages
check_toolchain
report_kvm

say "guest assets (cached in $KEEL_CACHE_DIR/guest)"
guest/build.sh all
eval "$(guest/build.sh paths)"
export KEEL_VMLINUX KEEL_BZIMAGE KEEL_INITRD_TINY KEEL_INITRD_BUSYBOX KEEL_STOCK_KERNEL

say "cargo fmt --check"
cargo fmt --all -- --check
say "cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
say "cargo test"
cargo test --workspace
