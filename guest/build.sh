#!/usr/bin/env bash
# Build Keel's guest assets (test kernel, initramfs images, ext4 root image,
# stock kernel, and on request a Debian disk image).
#
#   guest/build.sh [all|kernel|initramfs|rootfs|stock|debian]...   (several may be given)
#   guest/build.sh paths|cmdline|help
#
#   all        (default) kernel + initramfs + rootfs + stock, then print the paths
#   kernel     the Keel test kernel: vmlinux (ELF, PVH note) and bzImage
#   initramfs  initramfs-tiny.cpio.gz and initramfs-busybox.cpio.gz
#   rootfs     rootfs.ext4: ext4 root for root=/dev/vda, tiny init as /sbin/init
#   stock      Debian's stock cloud kernel (for hosts with real VT-x/AMD-V)
#   debian     debian-12.raw + its kernel/initrd/ssh key: a Debian 12 system for
#              hosts with real VT-x/AMD-V (debootstrap; slow, never run by `all`)
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
# incremental builds), KEEL_SKIP_STOCK=1 (`all` skips the stock kernel),
# KEEL_DEBIAN_MIRROR (`debian`: the mirror; default: this machine's apt one).
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

# ------------------------------------------------------------------ rootfs --
# An ext4 root file system for virtio-blk tests: `root=/dev/vda` boots the
# tiny init as /sbin/init (the kernel's default) with no initramfs, so the
# kernel log and `keel_report=mounts` prove the disk path end to end.
# Built without mounting (mke2fs -d) and reproducibly: fixed UUID and
# directory hash seed, owner 0:0, every time stamp 1 (E2FSPROGS_FAKE_TIME for
# what mke2fs sets, debugfs for the inode ctimes it copies from the staging
# tree).  Inode tables and journal are zeroed by mke2fs
# (lazy_*_init=0): otherwise a read-write mount starts ext4lazyinit, more
# emulated kernel work on PVM.
ROOTFS_SIZE=64M
ROOTFS_UUID=6b65656c-0000-4000-8000-726f6f746673 # "keel", "rootfs" in hex
ROOTFS_MARKER="keel-rootfs: ext4 root image of Keel's guest/build.sh"
ROOTFS_APPLETS=(sh cat dmesg echo grep halt ls mkdir mount nproc poweroff reboot sync umount)

build_rootfs() {
	ensure_pkgs gcc binutils e2fsprogs
	fetch_busybox
	local bb=$OUT/downloads/busybox-i386 key
	key=$({
		cat "$bb.version"
		cat "$GUEST_DIR/init/init.c"
		gcc --version | head -n1
		mke2fs -V 2>&1 | head -n1
		declare -p INIT_CFLAGS ROOTFS_SIZE ROOTFS_UUID ROOTFS_MARKER ROOTFS_APPLETS
		declare -f build_rootfs
	} | sha)
	if [[ -f $OUT/rootfs.ext4 && -f $OUT/rootfs.key && $(<"$OUT/rootfs.key") == "$key" ]]; then
		log "rootfs up to date ($key)"
		return 0
	fi
	log "building rootfs.ext4 ($ROOTFS_SIZE, busybox $(<"$bb.version"), tiny init as /sbin/init)"
	local tmp root a
	tmp=$(mktemp -d)
	root=$tmp/root
	mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,etc,root}
	chmod 0755 "$root" "$root"/{bin,sbin,dev,proc,sys,etc}
	chmod 1777 "$root/tmp"
	chmod 0700 "$root/root"
	gcc "${INIT_CFLAGS[@]}" -o "$root/sbin/init" "$GUEST_DIR/init/init.c"
	install -m 0755 "$bb" "$root/bin/busybox"
	for a in "${ROOTFS_APPLETS[@]}"; do
		ln -s busybox "$root/bin/$a"
	done
	echo "$ROOTFS_MARKER" >"$root/etc/keel-rootfs"
	chmod 0644 "$root/etc/keel-rootfs"
	find "$root" -exec touch -h -d @1 {} +

	truncate -s "$ROOTFS_SIZE" "$tmp/rootfs.ext4"
	E2FSPROGS_FAKE_TIME=1 mkfs.ext4 -q -F -b 4096 -L keel-root -U "$ROOTFS_UUID" \
		-E "root_owner=0:0,hash_seed=$ROOTFS_UUID,lazy_itable_init=0,lazy_journal_init=0" \
		-d "$root" "$tmp/rootfs.ext4"
	# Owner 0:0 and ctime 1 for every inode (mke2fs -d copies both from stat).
	(cd "$root" && find . -mindepth 1 | sed 's|^\.||' |
		while IFS= read -r a; do
			printf 'set_inode_field %s uid 0\nset_inode_field %s gid 0\n' "$a" "$a"
			printf 'set_inode_field %s ctime @1\n' "$a"
		done) | E2FSPROGS_FAKE_TIME=1 debugfs -w -f - "$tmp/rootfs.ext4" >/dev/null 2>"$tmp/debugfs.err"
	# debugfs exits 0 when a command fails; its errors are on stderr.
	! grep -v '^debugfs [0-9]' "$tmp/debugfs.err" >&2 || die "debugfs failed on rootfs.ext4"
	e2fsck -fn "$tmp/rootfs.ext4" >"$tmp/fsck.log" 2>&1 ||
		die "e2fsck finds rootfs.ext4 broken: $(tail -n 5 "$tmp/fsck.log")"
	install_file "$tmp/rootfs.ext4" "$OUT/rootfs.ext4"
	rm -rf "$tmp"
	echo "$key" >"$OUT/rootfs.key"
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

# ------------------------------------------------------------------ debian --
# A Debian 12 (bookworm) system disk for hosts with real VT-x/AMD-V, where
# stock kernels and systemd boot: fio, iperf3 and sshd run on it for
# real-speed device tests.  Useless on PVM (the stock kernel cannot boot
# there), so `all` never builds it.  Output:
#   debian-12.raw      sparse 4 GiB raw disk, ext4 on the whole device
#                      (no partition table): boot with root=/dev/vda
#   debian-12.vmlinuz  + debian-12.initrd: the linux-image-cloud-amd64 kernel
#                      and initramfs installed in it, for --kernel/--initrd
#   debian-12.ssh-key  private key whose public half is root's authorized_keys
# Kernel command line: console=ttyS0 root=/dev/vda rw (add net.ifnames=0 for
# eth0; ip=ADDR::GW:MASK::IFACE:off for a static address).
DEBIAN_SUITE=bookworm
DEBIAN_SIZE=4G
DEBIAN_HOSTNAME=keel-debian
DEBIAN_PKGS=(systemd-sysv udev dbus kmod procps iproute2 iputils-ping
	openssh-server fio iperf3 linux-image-cloud-amd64 initramfs-tools)

# debian_mirror: KEEL_DEBIAN_MIRROR, else the first enabled "deb" source of
# this machine's apt configuration (deb822 .sources or one-line .list) that
# serves $DEBIAN_SUITE, else deb.debian.org.
debian_mirror() {
	if [[ -n ${KEEL_DEBIAN_MIRROR:-} ]]; then
		echo "$KEEL_DEBIAN_MIRROR"
		return 0
	fi
	local f m=
	for f in /etc/apt/sources.list.d/*.sources; do
		[[ -f $f ]] || continue
		m=$(awk -v suite="$DEBIAN_SUITE" 'BEGIN { RS = ""; FS = "\n" }
			{
				uri = ""; deb = 0; ok = 0; off = 0
				for (i = 1; i <= NF; i++) {
					if ($i ~ /^Types:/ && $i ~ /[ \t]deb([ \t]|$)/) deb = 1
					if ($i ~ /^URIs:/) { split($i, a, /[ \t]+/); uri = a[2] }
					if ($i ~ /^Suites:/ && $i ~ ("[ \t]" suite "([ \t]|$)")) ok = 1
					if ($i ~ /^Enabled:[ \t]*no/) off = 1
				}
				if (deb && ok && !off && uri != "") { print uri; exit }
			}' "$f")
		[[ -z $m ]] || break
	done
	if [[ -z $m ]]; then
		m=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
			awk -v suite="$DEBIAN_SUITE" '$1 == "deb" {
				i = 2
				if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ } # [options]
				if ($(i + 1) == suite) { print $i; exit }
			}' || true)
	fi
	echo "${m:-http://deb.debian.org/debian}"
}

# umount_under DIR: unmount whatever debootstrap left mounted below DIR.
umount_under() {
	local m
	findmnt -rn -o TARGET | awk -v d="$1/" 'index($0 "/", d) == 1' | sort -r |
		while IFS= read -r m; do umount -l "$m" || true; done
}

# debian_configure ROOT KEY: turn a fresh debootstrap tree into a bootable
# test system; KEY receives the private ssh key for root.  Everything is written into the tree; nothing runs in it but
# passwd, systemctl enable/mask (offline symlinks) and ssh-keygen.
debian_configure() {
	local root=$1 keyfile=$2
	echo "$DEBIAN_HOSTNAME" >"$root/etc/hostname"
	printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n' "$DEBIAN_HOSTNAME" >"$root/etc/hosts"
	# Whole-disk ext4, so the disk is /dev/vda itself.
	echo '/dev/vda / ext4 rw,errors=remount-ro 0 1' >"$root/etc/fstab"
	# Console access for tests: root has no password, and the serial getty
	# (the kernel console is ttyS0) logs root in by itself.
	chroot "$root" passwd -d root >/dev/null
	mkdir -p "$root/etc/systemd/system/serial-getty@ttyS0.service.d"
	cat >"$root/etc/systemd/system/serial-getty@ttyS0.service.d/autologin.conf" <<-'EOF'
		[Service]
		ExecStart=
		ExecStart=-/sbin/agetty --autologin root --keep-baud 115200,57600,38400,9600 - $TERM
	EOF
	# Network: DHCP on every Ethernet device, unless ip= on the kernel command
	# line configures it (systemd-network-generator writes
	# /run/systemd/network/90-IFACE.network, which sorts before 99-).  Without
	# a DHCP server boot must not wait for the network: wait-online is masked.
	cat >"$root/etc/systemd/network/99-keel-dhcp.network" <<-'EOF'
		[Match]
		Name=en* eth*

		[Network]
		DHCP=ipv4
	EOF
	chroot "$root" systemctl enable -q serial-getty@ttyS0.service systemd-networkd.service \
		systemd-network-generator.service ssh.service
	chroot "$root" systemctl mask -q systemd-networkd-wait-online.service
	# ssh: a key made for this image; root logs in with it.
	mkdir -p "$root/root/.ssh"
	chmod 0700 "$root/root/.ssh"
	rm -f "$root/root/keel-key" "$root/root/keel-key.pub"
	chroot "$root" ssh-keygen -q -t ed25519 -N '' -C keel-test -f /root/keel-key
	mv "$root/root/keel-key.pub" "$root/root/.ssh/authorized_keys"
	chmod 0600 "$root/root/.ssh/authorized_keys"
	mv "$root/root/keel-key" "$keyfile"
	# A clone-friendly image: systemd makes a machine-id at first boot; no
	# package lists or downloaded .debs.
	: >"$root/etc/machine-id"
	rm -f "$root/var/lib/dbus/machine-id"
	rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
}

build_debian() {
	[[ $EUID -eq 0 ]] || die "building the Debian image needs root (debootstrap, chroot)"
	ensure_pkgs debootstrap e2fsprogs
	local mirror key
	mirror=$(debian_mirror)
	key=$({
		echo "$mirror"
		dpkg-query -W -f='${Version}\n' debootstrap
		declare -p DEBIAN_SUITE DEBIAN_SIZE DEBIAN_HOSTNAME DEBIAN_PKGS
		declare -f build_debian debian_configure
	} | sha)
	if [[ -f $OUT/debian-12.raw && -f $OUT/debian-12.vmlinuz && -f $OUT/debian-12.initrd &&
		-f $OUT/debian-12.key && $(<"$OUT/debian-12.key") == "$key" ]]; then
		log "debian-12 up to date ($key)"
		return 0
	fi
	local work=$OUT/debian-build dlog=$OUT/debian-build.log
	umount_under "$work"
	rm -rf --one-file-system "$work" "$OUT/debian-12.key"
	mkdir -p "$work"
	: >"$dlog"
	log "debootstrap $DEBIAN_SUITE from $mirror (~5-15 min; log: $dlog)"
	local t0=$SECONDS pkgs
	pkgs=$(
		IFS=,
		echo "${DEBIAN_PKGS[*]}"
	)
	# minbase (essential + apt) plus what the tests need; systemd-sysv
	# makes systemd PID 1.
	debootstrap --variant=minbase --components=main --include="$pkgs" \
		"$DEBIAN_SUITE" "$work/root" "$mirror" >>"$dlog" 2>&1 || {
		umount_under "$work"
		tail -n 30 "$dlog" >&2
		[[ -f $work/root/debootstrap/debootstrap.log ]] &&
			tail -n 30 "$work/root/debootstrap/debootstrap.log" >&2
		die "debootstrap failed (log: $dlog)"
	}
	umount_under "$work"
	log "debootstrap done in $((SECONDS - t0)) s; configuring"
	debian_configure "$work/root" "$work/ssh-key" >>"$dlog" 2>&1 || {
		tail -n 20 "$dlog" >&2
		die "configuring the Debian tree failed (log: $dlog)"
	}
	local k=("$work"/root/boot/vmlinuz-*) i=("$work"/root/boot/initrd.img-*)
	[[ -f ${k[0]} && -f ${i[0]} ]] || die "no /boot/vmlinuz-* or initrd.img-* in the Debian tree"
	log "writing debian-12.raw ($DEBIAN_SIZE sparse, ext4, $(du -sm "$work/root" | cut -f1) MiB of files)"
	truncate -s "$DEBIAN_SIZE" "$work/disk.raw"
	mkfs.ext4 -q -F -L keel-debian -E lazy_itable_init=0,lazy_journal_init=0 \
		-d "$work/root" "$work/disk.raw" >>"$dlog" 2>&1 || die "mkfs.ext4 -d failed (log: $dlog)"
	install_file "${k[0]}" "$OUT/debian-12.vmlinuz"
	install_file "${i[0]}" "$OUT/debian-12.initrd"
	install -m 0600 "$work/ssh-key" "$OUT/debian-12.ssh-key"
	mv -f "$work/disk.raw" "$OUT/debian-12.raw"
	rm -rf --one-file-system "$work"
	echo "$key" >"$OUT/debian-12.key"
	log "debian-12 built in $((SECONDS - t0)) s ($(basename "${k[0]}"))"
}

# ------------------------------------------------------------------- main --
print_paths() {
	echo "KEEL_VMLINUX=$OUT/vmlinux"
	echo "KEEL_BZIMAGE=$OUT/bzImage"
	echo "KEEL_INITRD_TINY=$OUT/initramfs-tiny.cpio.gz"
	echo "KEEL_INITRD_BUSYBOX=$OUT/initramfs-busybox.cpio.gz"
	echo "KEEL_ROOTFS=$OUT/rootfs.ext4"
	echo "KEEL_STOCK_KERNEL=$OUT/stock/vmlinuz"
	echo "KEEL_DEBIAN_IMAGE=$OUT/debian-12.raw"
	echo "KEEL_DEBIAN_KERNEL=$OUT/debian-12.vmlinuz"
	echo "KEEL_DEBIAN_INITRD=$OUT/debian-12.initrd"
	echo "KEEL_DEBIAN_SSH_KEY=$OUT/debian-12.ssh-key"
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
		all | kernel | initramfs | rootfs | stock | debian) ;;
		*) die "unknown subcommand '$cmd' (all|kernel|initramfs|rootfs|stock|debian [...] | paths | cmdline)" ;;
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
			build_rootfs
			if [[ ${KEEL_SKIP_STOCK:-0} == 1 ]]; then
				log "KEEL_SKIP_STOCK=1: not fetching the stock kernel"
			else
				fetch_stock
			fi
			;;
		kernel) build_kernel ;;
		initramfs) build_initramfs ;;
		rootfs) build_rootfs ;;
		stock) fetch_stock ;;
		debian) build_debian ;;
		esac
	done
	log "done; artefacts in $OUT:"
	print_paths
}

main "$@"
