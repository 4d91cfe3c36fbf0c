#!/usr/bin/env bash
# From a fresh clone to a booted VM: installs what is needed, builds Keel and its guest
# assets (the Keel test kernel takes ~4 min the first time; later runs reuse the cache),
# then boots a demo guest on this terminal's serial console: the Keel test kernel with its
# root file system on a virtio-blk disk (read-only, so the cached image stays pristine) and a
# virtio-rng. The guest prints what it sees (CPUs, memory, mounts, the RNG) and powers off;
# Ctrl-A x stops it at any time.
source "$(dirname "$0")/common.sh"
cd "$KEEL_ROOT"

install_packages
check_toolchain
report_kvm

say "building keel (release)"
cargo build --release -p keel
say "guest assets (cached in $KEEL_CACHE_DIR/guest)"
guest/build.sh all
eval "$(guest/build.sh paths)"

./target/release/keel host-check || true
say "booting the Keel test kernel, root on virtio-blk: 2 vCPUs, 512M (Linux boots take ~30-60 s on PVM)"
exec ./target/release/keel run --kernel "$KEEL_VMLINUX" \
    --disk "path=$KEEL_ROOTFS,format=raw,readonly=on" --rng \
    --cpus 2 --memory 512M \
    --cmdline "console=ttyS0 panic=-1 root=/dev/vda ro keel_report=rng,mounts ${KEEL_DEMO_CMDLINE:-}"
