#!/usr/bin/env bash
# Build Keel's guest assets (test kernel, initramfs images, stock kernel).
#
#   guest/build.sh [all|kernel|initramfs|stock]...   (several may be given)
#   guest/build.sh paths|cmdline|help
#
#   all        (default) kernel + initramfs + stock, then print the paths
#   kernel     the Keel test kernel: vmlinux (ELF, PVH note) and bzImage
#   initramfs  initramfs-tiny.cpio.gz and initramfs-busybox.cpio.gz
#   stock      Debian's stock cloud kernel (for hosts with real VT-x/AMD-V)
#   paths      print KEY=path lines (source them: eval "$(guest/build.sh paths)")
#   cmdline    print the kernel parameters a guest needs on PVM
#
# Everything is built into ${KEEL_CACHE_DIR:-$HOME/.cache/keel}/guest/, never
# into the repository.  Each artefact is rebuilt only when its inputs change,
# so a second run does nothing and takes about a second.  Missing Debian
# packages are installed with apt-get (needs root).  Progress goes to stderr;
# `all` and `paths` print the KEY=path lines on stdout.
#
# Boot-time notes (PVM runs guest kernel code in an emulator): the kernel is
# LZ4-compressed, and the busybox initramfs is gzip with stored blocks,
# because inflating real deflate data costs minutes there.
#
# Environment: KEEL_CACHE_DIR (cache root), KEEL_JOBS (make -j, default
# nproc), KEEL_KEEP_BUILD=1 (keep the kernel build tree for manual
# incremental builds), KEEL_SKIP_STOCK=1 (`all` skips the stock kernel).
set -Eeuo pipefail
trap 'echo "[guest] ERROR: command failed (exit $?) at build.sh line $LINENO: $BASH_COMMAND" >&2' ERR

GUEST_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE_ROOT=${KEEL_CACHE_DIR:-${HOME:?set HOME or KEEL_CACHE_DIR}/.cache/keel}
OUT=$CACHE_ROOT/guest
JOBS=${KEEL_JOBS:-$(nproc)}
LINUX_SOURCE_PKG=linux-source-6.1
LINUX_SOURCE_TARBALL=/usr/src/linux-source-6.1.tar.xz

# Kernel parameters every Keel test kernel boot needs on PVM (see README.md).
PVM_CMDLINE="noxsave nofsgsbase nopcid noinvpcid clearcpuid=cx16,smap,popcnt,rdtscp,serialize,rdpid,114 vdso32=0"

log() { echo "[guest] $*" >&2; }
die() {
	echo "[guest] ERROR: $*" >&2
	exit 1
}

# ---------------------------------------------------------------- packages --
APT_UPDATED=0
apt_update() {
	((APT_UPDATED)) && return 0
	log "apt-get update"
	DEBIAN_FRONTEND=noninteractive apt-get update -qq -o DPkg::Lock::Timeout=600 \
		>>"$OUT/apt.log" 2>&1 || {
		# Often only one index failed (e.g. a mirror mid-sync): go on, and let
		# the install/download that needs the package report what is missing.
		tail -n 5 "$OUT/apt.log" >&2
		log "warning: apt-get update reported errors (log: $OUT/apt.log); continuing"
	}
	APT_UPDATED=1
}

ensure_pkgs() {
	local missing=() p
	for p in "$@"; do
		dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null | grep -q '^ii' ||
			missing+=("$p")
	done
	((${#missing[@]})) || return 0
	[[ $EUID -eq 0 ]] || die "missing Debian packages: ${missing[*]} (run as root, or install them)"
	apt_update
	log "installing Debian packages: ${missing[*]}"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		-o DPkg::Lock::Timeout=600 "${missing[@]}" >>"$OUT/apt.log" 2>&1 || {
		tail -n 20 "$OUT/apt.log" >&2
		die "apt-get install failed (log: $OUT/apt.log)"
	}
}

# apt_download DIR PKG: download one .deb into DIR (as root, unsandboxed).
apt_download() {
	local dir=$1 pkg=$2
	(cd "$dir" && apt-get download -qq -o APT::Sandbox::User=root "$pkg") \
		>>"$OUT/apt.log" 2>&1
}

sha() { sha256sum | cut -c1-16; }

# install_file SRC DST: atomically put SRC at DST.
install_file() {
	cp "$1" "$2.tmp.$$"
	mv -f "$2.tmp.$$" "$2"
}

# ------------------------------------------------------------------ kernel --
KERNEL_PKGS=("$LINUX_SOURCE_PKG" build-essential patch flex bison bc libelf-dev libssl-dev xz-utils)

kernel_key() {
	{
		dpkg-query -W -f='${Version}\n' "$LINUX_SOURCE_PKG"
		cat "$GUEST_DIR/kernel/keel.config"
		for p in "$GUEST_DIR"/kernel/patches/*.patch; do
			basename "$p"
			cat "$p"
		done
		# The kernel part of this script: a change to it rebuilds the kernel.
		declare -f kernel_key build_kernel verify_kernel_config
	} | sha
}

# verify_kernel_config FRAGMENT CONFIG: every CONFIG_ line of the fragment
# must hold in the final .config (merge_config drops unmet options silently).
verify_kernel_config() {
	local frag=$1 cfg=$2 line sym want got bad=0
	while IFS= read -r line; do
		if [[ $line =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
			sym=${BASH_REMATCH[1]} want=${BASH_REMATCH[2]}
			got=$(grep -E "^$sym=" "$cfg" | cut -d= -f2- || true)
			if [[ $got != "$want" ]]; then
				log "config: $sym: asked for $want, got ${got:-not set}"
				bad=1
			fi
		elif [[ $line =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
			sym=${BASH_REMATCH[1]}
			if got=$(grep -E "^$sym=" "$cfg"); then
				log "config: $sym: asked for not set, got $got"
				bad=1
			fi
		fi
	done <"$frag"
	((bad == 0)) || die "kernel config does not match guest/kernel/keel.config (unmet dependencies?)"
}

build_kernel() {
	ensure_pkgs "${KERNEL_PKGS[@]}"
	local key
	key=$(kernel_key)
	if [[ -f $OUT/vmlinux && -f $OUT/bzImage && -f $OUT/kernel.key &&
		$(<"$OUT/kernel.key") == "$key" ]]; then
		log "kernel up to date ($key)"
		return 0
	fi

	local bdir=$OUT/kernel-build
	local src=$bdir/linux-source-6.1
	local klog=$OUT/kernel-build.log
	rm -rf "$bdir" "$OUT/kernel.key"
	mkdir -p "$bdir"
	: >"$klog"
	log "extracting $LINUX_SOURCE_PKG $(dpkg-query -W -f='${Version}' "$LINUX_SOURCE_PKG")"
	tar -xJf "$LINUX_SOURCE_TARBALL" -C "$bdir"
	[[ -d $src ]] || die "$LINUX_SOURCE_TARBALL did not unpack to linux-source-6.1/"
	local p
	for p in "$GUEST_DIR"/kernel/patches/*.patch; do
		log "applying $(basename "$p")"
		patch -p1 --batch --forward -d "$src" <"$p" >>"$klog" 2>&1 || {
			tail -n 20 "$klog" >&2
			die "patch $(basename "$p") does not apply"
		}
	done

	local kmake=(make -C "$src" KBUILD_BUILD_USER=keel KBUILD_BUILD_HOST=keel
		"KBUILD_BUILD_TIMESTAMP=$(dpkg-query -W -f='${Version}' "$LINUX_SOURCE_PKG")")
	log "configuring: tinyconfig + guest/kernel/keel.config"
	{
		"${kmake[@]}" tinyconfig &&
			(cd "$src" && scripts/kconfig/merge_config.sh -m .config "$GUEST_DIR/kernel/keel.config") &&
			"${kmake[@]}" olddefconfig
	} >>"$klog" 2>&1 || {
		tail -n 30 "$klog" >&2
		die "kernel configuration failed (log: $klog)"
	}
	verify_kernel_config "$GUEST_DIR/kernel/keel.config" "$src/.config"

	log "building Keel test kernel (~4 min on 2 cores; make -j$JOBS, log: $klog)..."
	local t0=$SECONDS
	"${kmake[@]}" -j"$JOBS" vmlinux bzImage >>"$klog" 2>&1 || {
		echo "----- last 40 lines of $klog -----" >&2
		tail -n 40 "$klog" >&2
		die "kernel build failed (log: $klog)"
	}
	log "kernel built in $((SECONDS - t0)) s"

	objcopy --strip-debug "$src/vmlinux" "$OUT/vmlinux.tmp.$$"
	# The PVH entry point is the Xen ELF note XEN_ELFNOTE_PHYS32_ENTRY (18).
	readelf -nW "$OUT/vmlinux.tmp.$$" | grep -Eq 'Xen[[:space:]]+0x[0-9a-f]+[[:space:]].*\(0x00000012\)' ||
		die "vmlinux has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)"
	mv -f "$OUT/vmlinux.tmp.$$" "$OUT/vmlinux"
	install_file "$src/arch/x86/boot/bzImage" "$OUT/bzImage"
	install_file "$src/.config" "$OUT/kernel.config"
	echo "$key" >"$OUT/kernel.key"
	if [[ ${KEEL_KEEP_BUILD:-0} == 1 ]]; then
		log "build tree kept in $src"
	else
		rm -rf "$bdir"
	fi
}

# --------------------------------------------------------------- initramfs --
# A tiny writer for the cpio "newc" format: no root needed for device nodes,
# and every entry is owned by 0:0 with mtime 0, so images are reproducible.
CPIO_INO=0
cpio_pad() { # cpio_pad LEN: NUL bytes up to the next multiple of 4
	local r=$(($1 % 4))
	((r == 0)) || head -c $((4 - r)) /dev/zero
}
cpio_entry() { # cpio_entry NAME MODE(octal) [FILE|-] [RDEV_MAJOR RDEV_MINOR] [DATA]
	local name=$1 mode=$((8#$2)) file=${3:--} rmaj=${4:-0} rmin=${5:-0} data=${6:-}
	local size=0 nlink=1
	if [[ $file != - ]]; then
		size=$(stat -c %s "$file")
	else
		size=${#data}
	fi
	(((mode & 0170000) == 0040000)) && nlink=2
	CPIO_INO=$((CPIO_INO + 1))
	printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' \
		"$CPIO_INO" "$mode" 0 0 "$nlink" 0 "$size" 0 0 "$rmaj" "$rmin" $((${#name} + 1)) 0
	printf '%s\0' "$name"
	cpio_pad $((110 + ${#name} + 1))
	if [[ $file != - ]]; then cat "$file"; else printf '%s' "$data"; fi
	cpio_pad "$size"
}
cpio_trailer() {
	CPIO_INO=0
	cpio_entry TRAILER!!! 0 - 0 0
}
cpio_base() { # directories and /dev/console, so init has a console
	cpio_entry dev 40755
	cpio_entry dev/console 20600 - 5 1
	cpio_entry proc 40755
	cpio_entry sys 40755
	cpio_entry tmp 41777
}

# shellcheck disable=SC2054 # the commas belong to -Wl, options
INIT_CFLAGS=(-m32 -static -nostdlib -ffreestanding -fno-pic -no-pie -mno-sse -mno-mmx
	-msoft-float -Os -fno-stack-protector -fno-asynchronous-unwind-tables -fno-builtin
	-Wall -Wextra -Werror -Wl,--build-id=none -Wl,-e,_start -Wl,-z,noseparate-code
	-Wl,-z,norelro -Wl,--gc-sections -s)

build_tiny_initramfs() {
	local key
	key=$({
		cat "$GUEST_DIR/init/init.c"
		gcc --version | head -n1
		declare -f build_tiny_initramfs cpio_entry cpio_base cpio_pad cpio_trailer
		declare -p INIT_CFLAGS
	} | sha)
	if [[ -f $OUT/initramfs-tiny.cpio.gz && -f $OUT/initramfs-tiny.key &&
		$(<"$OUT/initramfs-tiny.key") == "$key" ]]; then
		log "initramfs-tiny up to date ($key)"
		return 0
	fi
	log "building tiny 32-bit init and initramfs-tiny.cpio.gz"
	local tmp
	tmp=$(mktemp -d)
	gcc "${INIT_CFLAGS[@]}" -o "$tmp/init" "$GUEST_DIR/init/init.c"
	install_file "$tmp/init" "$OUT/keel-init"
	{
		cpio_base
		cpio_entry init 100755 "$tmp/init"
		cpio_trailer
	} | gzip -9n >"$tmp/initramfs.cpio.gz"
	install_file "$tmp/initramfs.cpio.gz" "$OUT/initramfs-tiny.cpio.gz"
	rm -rf "$tmp"
	echo "$key" >"$OUT/initramfs-tiny.key"
}

# Debian's i386 busybox-static, downloaded once into the cache.
fetch_busybox() {
	local bb=$OUT/downloads/busybox-i386
	[[ -x $bb && -f $bb.version ]] && return 0
	[[ $EUID -eq 0 ]] || die "fetching busybox-static:i386 needs root (dpkg --add-architecture, apt-get)"
	mkdir -p "$OUT/downloads"
	if ! dpkg --print-foreign-architectures | grep -qx i386; then
		log "dpkg --add-architecture i386"
		dpkg --add-architecture i386
		APT_UPDATED=0
		apt_update
	fi
	local tmp
	tmp=$(mktemp -d)
	log "downloading busybox-static:i386"
	if ! apt_download "$tmp" busybox-static:i386; then
		apt_update
		apt_download "$tmp" busybox-static:i386 || {
			tail -n 20 "$OUT/apt.log" >&2
			die "apt-get download busybox-static:i386 failed (log: $OUT/apt.log)"
		}
	fi
	local deb=("$tmp"/busybox-static_*_i386.deb)
	dpkg-deb -x "${deb[0]}" "$tmp/x"
	file_is_i386 "$tmp/x/bin/busybox" || die "busybox-static:i386 is not an i386 binary"
	install_file "$tmp/x/bin/busybox" "$bb"
	dpkg-deb -f "${deb[0]}" Version >"$bb.version"
	rm -rf "$tmp"
}
file_is_i386() { # ELF class 1 (32-bit), machine 3 (i386)
	[[ $(od -An -tx1 -j4 -N1 "$1" | tr -d ' ') == 01 &&
		$(od -An -tx1 -j18 -N1 "$1" | tr -d ' ') == 03 ]]
}

# The /init of the busybox image.  keel_exit works as for the tiny init.
# shellcheck disable=SC2016 # expanded by the guest's shell
BUSYBOX_INIT='#!/bin/keel-sh
# Keel busybox initramfs: Debian i386 busybox-static (see guest/README.md).
# keel-sh (guest/init/glibc-sh.c) runs "busybox sh" with GLIBC_TUNABLES set.
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo
echo KEEL-INIT-OK
set -- $(grep MemTotal /proc/meminfo)
echo "keel-init: cpus=$(nproc) mem_kib=$2 (busybox)"
mode=${keel_exit:-poweroff}
echo "keel-init: exit=$mode"
case $mode in
reboot) reboot -f ;;
halt) halt -f ;;
panic)
	usleep 300000 # let the console send the line above before init dies
	exit 1
	;;
*) poweroff -f ;;
esac
'

# gzip_stored IN OUT: write IN as a gzip file whose deflate blocks are
# "stored" (uncompressed).  The guest kernel inflates the initramfs as
# emulated kernel code on PVM, at roughly 100 us per output byte for real
# deflate data (~4 min for busybox); stored blocks are plain copies.
gzip_stored() {
	local in=$1 out=$2 size off=0 n last
	size=$(stat -c %s "$in")
	{
		printf '\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03' # header, mtime 0, Unix
		while :; do
			n=$((size - off))
			((n <= 65535)) || n=65535
			last=0
			((off + n < size)) || last=1
			le16 $((last)) 1 # BFINAL, BTYPE=00 (stored)
			le16 "$n"
			le16 $((n ^ 0xffff))
			dd if="$in" bs=65535 skip=$((off / 65535)) count=1 status=none
			off=$((off + n))
			((last == 0)) || break
		done
		gzip -1 -c "$in" | tail -c 8 # CRC32 and ISIZE of the same data
	} >"$out"
}
# shellcheck disable=SC2059 # the format is the \xNN escape itself
le16() { # le16 VALUE [BYTES=2]: little-endian bytes
	printf "\\x$(printf %02x $(($1 & 255)))"
	[[ ${2:-2} == 1 ]] || printf "\\x$(printf %02x $((($1 >> 8) & 255)))"
}

build_busybox_initramfs() {
	ensure_pkgs gzip
	fetch_busybox
	local bb=$OUT/downloads/busybox-i386 key
	key=$({
		cat "$bb.version"
		cat "$GUEST_DIR/init/glibc-sh.c"
		gcc --version | head -n1
		declare -p INIT_CFLAGS
		printf '%s' "$BUSYBOX_INIT"
		declare -f build_busybox_initramfs cpio_entry cpio_base cpio_pad cpio_trailer gzip_stored le16
	} | sha)
	if [[ -f $OUT/initramfs-busybox.cpio.gz && -f $OUT/initramfs-busybox.key &&
		$(<"$OUT/initramfs-busybox.key") == "$key" ]]; then
		log "initramfs-busybox up to date ($key)"
		return 0
	fi
	log "building initramfs-busybox.cpio.gz (busybox $(<"$bb.version"))"
	local tmp a
	tmp=$(mktemp -d)
	gcc "${INIT_CFLAGS[@]}" -o "$tmp/keel-sh" "$GUEST_DIR/init/glibc-sh.c"
	{
		cpio_base
		cpio_entry bin 40755
		cpio_entry bin/busybox 100755 "$bb"
		cpio_entry bin/keel-sh 100755 "$tmp/keel-sh"
		for a in sh mount grep nproc cat echo usleep poweroff reboot halt; do
			cpio_entry "bin/$a" 120777 - 0 0 busybox
		done
		cpio_entry init 100755 - 0 0 "$BUSYBOX_INIT"
		cpio_trailer
	} >"$tmp/initramfs.cpio"
	gzip_stored "$tmp/initramfs.cpio" "$tmp/initramfs.cpio.gz"
	gzip -t "$tmp/initramfs.cpio.gz" || die "gzip_stored wrote a broken gzip file"
	install_file "$tmp/initramfs.cpio.gz" "$OUT/initramfs-busybox.cpio.gz"
	rm -rf "$tmp"
	echo "$key" >"$OUT/initramfs-busybox.key"
}

build_initramfs() {
	ensure_pkgs gcc binutils gzip
	build_tiny_initramfs
	build_busybox_initramfs
}

# ------------------------------------------------------------------- stock --
# Debian's stock linux-image-cloud-amd64 kernel, for hosts with real
# VT-x/AMD-V (it cannot boot on PVM).  Downloaded once; delete
# $OUT/stock/ to fetch the current one again.
fetch_stock() {
	local dir=$OUT/stock
	if [[ -f $dir/vmlinuz && -f $dir/VERSION ]]; then
		log "stock kernel present ($(<"$dir/VERSION"))"
		return 0
	fi
	[[ $EUID -eq 0 ]] || die "fetching the stock kernel needs root (apt-get)"
	local pkg
	pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
		awk '/Depends: linux-image-6\.1/ {print $2; exit}' || true)
	if [[ -z $pkg ]]; then
		apt_update
		pkg=$(apt-cache depends linux-image-cloud-amd64 |
			awk '/Depends: linux-image-6\.1/ {print $2; exit}')
	fi
	[[ -n $pkg ]] || die "cannot resolve linux-image-cloud-amd64 to a linux-image-6.1.* package"
	local tmp
	tmp=$(mktemp -d)
	log "downloading $pkg (~26 MB)"
	apt_download "$tmp" "$pkg" || {
		tail -n 20 "$OUT/apt.log" >&2
		die "apt-get download $pkg failed (log: $OUT/apt.log)"
	}
	local deb=("$tmp"/"$pkg"_*.deb)
	dpkg-deb --fsys-tarfile "${deb[0]}" | tar -x -C "$tmp" --wildcards './boot/vmlinuz-*'
	local vmlinuz=("$tmp"/boot/vmlinuz-*)
	[[ -f ${vmlinuz[0]} ]] || die "$pkg has no /boot/vmlinuz-*"
	mkdir -p "$dir"
	install_file "${vmlinuz[0]}" "$dir/vmlinuz"
	echo "$pkg $(dpkg-deb -f "${deb[0]}" Version)" >"$dir/VERSION"
	rm -rf "$tmp"
}

# ------------------------------------------------------------------- main --
print_paths() {
	echo "KEEL_VMLINUX=$OUT/vmlinux"
	echo "KEEL_BZIMAGE=$OUT/bzImage"
	echo "KEEL_INITRD_TINY=$OUT/initramfs-tiny.cpio.gz"
	echo "KEEL_INITRD_BUSYBOX=$OUT/initramfs-busybox.cpio.gz"
	echo "KEEL_STOCK_KERNEL=$OUT/stock/vmlinuz"
}

main() {
	(($#)) || set -- all
	case $1 in
	paths)
		print_paths
		return 0
		;;
	cmdline)
		echo "$PVM_CMDLINE"
		return 0
		;;
	-h | --help | help)
		sed -n '2,/^set -/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
		return 0
		;;
	esac
	local cmd
	for cmd in "$@"; do
		case $cmd in
		all | kernel | initramfs | stock) ;;
		*) die "unknown subcommand '$cmd' (all|kernel|initramfs|stock [...] | paths | cmdline)" ;;
		esac
	done
	mkdir -p "$OUT"
	# One build at a time per cache (tests may call this script concurrently).
	exec 9>"$OUT/.lock"
	if ! flock -n 9; then
		log "another build.sh holds $OUT/.lock; waiting"
		flock 9
	fi
	for cmd in "$@"; do
		case $cmd in
		all)
			build_kernel
			build_initramfs
			if [[ ${KEEL_SKIP_STOCK:-0} == 1 ]]; then
				log "KEEL_SKIP_STOCK=1: not fetching the stock kernel"
			else
				fetch_stock
			fi
			;;
		kernel) build_kernel ;;
		initramfs) build_initramfs ;;
		stock) fetch_stock ;;
		esac
	done
	log "done; artefacts in $OUT:"
	print_paths
}

main "$@"
