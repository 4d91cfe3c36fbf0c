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
# The Debian 12 guest (systemd, fio, iperf3) needs a stock kernel, which only boots with
# hardware VT-x/AMD-V; on PVM hosts its test reports itself skipped, so do not build it.
if grep -qwE 'vmx|svm' /proc/cpuinfo && [ ! -e /sys/module/kvm_pvm ]; then
    KEEL_APT_PACKAGES=(iperf3 debootstrap)
    install_packages
    guest/build.sh debian
fi
eval "$(guest/build.sh paths)"
export KEEL_VMLINUX KEEL_BZIMAGE KEEL_INITRD_TINY KEEL_INITRD_BUSYBOX KEEL_STOCK_KERNEL KEEL_ROOTFS \
    KEEL_DEBIAN_IMAGE KEEL_DEBIAN_KERNEL KEEL_DEBIAN_INITRD

say "cargo fmt --check"
cargo fmt --all -- --check
say "cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
say "cargo test"
cargo test --workspace
