# Shared by scripts/demo.sh and scripts/test.sh: install what Keel needs on Debian 12 (as root).
# Idempotent: a second run installs nothing and takes a second.

set -euo pipefail

KEEL_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export KEEL_CACHE_DIR="${KEEL_CACHE_DIR:-$HOME/.cache/keel}"

say() {
    if [ -t 2 ]; then printf '\033[1m[keel]\033[0m %s\n' "$*" >&2; else printf '[keel] %s\n' "$*" >&2; fi
}
die() { printf '[keel] error: %s\n' "$*" >&2; exit 1; }

# Debian packages for building Keel (gcc for the guest test kit) and its guest kernel.
# iproute2 and iputils-ping: the virtio-net end-to-end test; qemu-utils: qcow2 interop tests;
# e2fsprogs: the ext4 root image.
KEEL_APT_PACKAGES=(build-essential flex bison bc libelf-dev libssl-dev cpio xz-utils python3
    iproute2 iputils-ping qemu-utils e2fsprogs)

install_packages() {
    local missing=()
    for p in "${KEEL_APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    if ((${#missing[@]})); then
        say "installing Debian packages: ${missing[*]}"
        [ "$(id -u)" = 0 ] || die "run as root to install packages (apt-get)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

check_toolchain() {
    command -v cargo >/dev/null || die "cargo not found: install the Rust toolchain (rustup, Rust >= 1.85)"
    local v
    v="$(rustc --version | awk '{print $2}')"
    case "$v" in
        1.[0-7][0-9].*|1.8[0-4].*) die "Rust $v is too old: Keel needs >= 1.85 (rustup update)" ;;
    esac
}

# Prints the KVM this host has, for logs and CI.
report_kvm() {
    if [ ! -e /dev/kvm ]; then
        say "KVM: /dev/kvm is MISSING — tests that boot guests will be reported as skipped"
    elif [ -d /sys/module/kvm_pvm ]; then
        say "KVM: /dev/kvm is PVM (kvm_pvm, software-assisted; no VT-x/AMD-V)"
    elif [ -d /sys/module/kvm_intel ]; then
        say "KVM: /dev/kvm is hardware Intel VT-x (kvm_intel)"
    elif [ -d /sys/module/kvm_amd ]; then
        say "KVM: /dev/kvm is hardware AMD-V (kvm_amd)"
    else
        say "KVM: /dev/kvm present, backend unknown"
    fi
}
