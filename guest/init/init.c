/*
 * keel-init: the tiny static 32-bit init of Keel's test guests: /init of the
 * tiny initramfs, and /sbin/init of the ext4 root image (rootfs.ext4).
 *
 * Freestanding (no libc), i386, system calls through `int $0x80` only, no
 * x87/MMX/SSE instructions: this is the kind of user space that runs on PVM
 * (see guest/README.md).  It is driven by kernel parameters: an unknown,
 * undotted `name=value` parameter reaches init's envp.  Behaviour, in order:
 *
 *   1. mounts proc on /proc, sysfs on /sys and devtmpfs on /dev;
 *   2. prints "KEEL-INIT-OK" on its own line to stdout (/dev/console);
 *   3. prints "keel-init: cpus=N mem_kib=M" (N: sched_getaffinity of init,
 *      M: MemTotal from /proc/meminfo);
 *   4. makes 1000 getpid() calls and checks they all return 1;
 *   4a. keel_touch=MIB: maps MIB MiB of anonymous memory, writes every page
 *      and unmaps it again: "keel-init: touched MIB MiB" (the guest's free
 *      memory is then backed by host RAM, which balloon tests need to see
 *      RSS fall when the balloon takes it back);
 *   5. keel_report=ITEM[,ITEM...], each item in the order given:
 *        rng    -> "keel-init: rng_current=<sysfs rng_current, trimmed>",
 *                  then reads 32 bytes from /dev/hwrng:
 *                  "keel-init: hwrng read=<bytes, or -errno>" and, if any,
 *                  "keel-init: hwrng bytes=<hex>"
 *        mounts -> "keel-init: mount <line>" for each line of /proc/mounts,
 *                  then "keel-init: root=/dev/NAME dev=MAJ:MIN" (the block
 *                  device of "/", which /proc/mounts calls /dev/root), or
 *                  "keel-init: root=none dev=0:N" (initramfs)
 *   6. keel_vsock=PORT: listens on AF_VSOCK (VMADDR_CID_ANY, PORT),
 *      "keel-init: vsock listening port=PORT", accepts one connection, reads
 *      up to 256 bytes, writes back "echo:" + those bytes,
 *      "keel-init: vsock echoed <n> bytes"; on a failed step
 *      "keel-init: vsock error <step> <-errno>" and it goes on;
 *        vdb    -> reads the first 64 KiB of /dev/vdb with O_DIRECT (from the
 *                  device, never the page cache): "keel-init: vdb read=<bytes,
 *                  or -errno> fnv=<FNV-1a 64 of them, 16 hex digits>"
 *   7. keel_wait=powerbutton: opens every /dev/input/eventN, prints
 *      "keel-init: waiting for power button" and blocks until an EV_KEY
 *      KEY_POWER press arrives: "keel-init: power button pressed", then it
 *      goes on (keel_after, keel_exit: power off by default).  With no input device:
 *      "keel-init: no input device", and it goes on;
 *   7a. keel_after=ITEM[,ITEM...]: keel_report's items again, once the wait
 *      is over (e.g. to read a disk after the VM was restored from a snapshot);
 *   8. keel_exit (after printing "keel-init: exit=<mode>"):
 *        poweroff (default) -> reboot(LINUX_REBOOT_CMD_POWER_OFF)
 *        reboot             -> reboot(LINUX_REBOOT_CMD_RESTART)
 *        halt               -> reboot(LINUX_REBOOT_CMD_HALT)
 *        panic              -> exit(1): the kernel panics ("Attempted to
 *                              kill init!"), with panic=-1 it reboots at once
 *
 * Errors are printed as the negative errno the system call returned.
 */

#define SYS_exit 1
#define SYS_read 3
#define SYS_write 4
#define SYS_open 5
#define SYS_close 6
#define SYS_getpid 20
#define SYS_mount 21
#define SYS_ioctl 54
#define SYS_mkdir 39
#define SYS_reboot 88
#define SYS_old_mmap 90
#define SYS_munmap 91
#define SYS_stat64 195
#define SYS_poll 168
#define SYS_sched_getaffinity 242
/* i386 has direct socket calls since Linux 4.3 (syscall_32.tbl). */
#define SYS_socket 359
#define SYS_bind 361
#define SYS_listen 363
#define SYS_accept4 364

#define O_RDONLY 0
#define O_WRONLY 1
#define O_DIRECT 040000
#define ENOENT 2
#define EINTR 4
#define EBUSY 16
#define TCSBRK 0x5409 /* with arg 1: tcdrain() */

#define LINUX_REBOOT_MAGIC1 0xfee1deadU
#define LINUX_REBOOT_MAGIC2 672274793U
#define LINUX_REBOOT_CMD_RESTART 0x01234567U
#define LINUX_REBOOT_CMD_HALT 0xCDEF0123U
#define LINUX_REBOOT_CMD_POWER_OFF 0x4321FEDCU

#define AF_VSOCK 40
#define SOCK_STREAM 1
#define VMADDR_CID_ANY 0xFFFFFFFFU

#define POLLIN 1
#define EV_KEY 1
#define KEY_POWER 116
#define MAX_INPUT 32
/* EVIOCGNAME(len): _IOC(_IOC_READ, 'E', 0x06, len) */
#define EVIOCGNAME(len) ((2U << 30) | ((u32)(len) << 16) | ('E' << 8) | 0x06)

typedef unsigned int u32;
typedef unsigned short u16;
typedef int s32;

/* include/uapi/linux/vm_sockets.h: 16 bytes, like struct sockaddr. */
struct sockaddr_vm {
	u16 svm_family;
	u16 svm_reserved1;
	u32 svm_port;
	u32 svm_cid;
	unsigned char svm_flags;
	unsigned char svm_zero[3];
};

/*
 * What evdev hands a 32-bit (compat) reader: struct input_event_compat in
 * drivers/input/input-compat.h, 16 bytes (32-bit seconds and microseconds).
 */
struct input_event32 {
	u32 sec;
	u32 usec;
	u16 type;
	u16 code;
	s32 value;
};

struct pollfd {
	int fd;
	short events;
	short revents;
};

/* Entry: the kernel starts us with %esp -> argc, argv[], NULL, envp[], NULL. */
__asm__(".text\n"
	".globl _start\n"
	"_start:\n"
	"	xorl %ebp, %ebp\n"
	"	movl %esp, %eax\n"
	"	andl $-16, %esp\n"
	"	subl $12, %esp\n"
	"	pushl %eax\n"
	"	call keel_main\n"
	"	hlt\n");

static long sys3(long nr, long a, long b, long c)
{
	long ret;
	__asm__ volatile("int $0x80"
			 : "=a"(ret)
			 : "0"(nr), "b"(a), "c"(b), "d"(c)
			 : "memory");
	return ret;
}

static long sys5(long nr, long a, long b, long c, long d, long e)
{
	long ret;
	__asm__ volatile("int $0x80"
			 : "=a"(ret)
			 : "0"(nr), "b"(a), "c"(b), "d"(c), "S"(d), "D"(e)
			 : "memory");
	return ret;
}

static int out_fd = 1;

/*
 * Wait until the console has sent what we wrote: writes to a tty only fill
 * its buffer, and an exit of init (panic) would lose the last lines.
 */
static void drain(void)
{
	sys3(SYS_ioctl, out_fd, TCSBRK, 1);
}

static u32 slen(const char *s)
{
	u32 n = 0;
	while (s[n])
		n++;
	return n;
}

static void puts_(const char *s)
{
	sys3(SYS_write, out_fd, (long)s, slen(s));
}

/* Decimal formatting without division helpers from libgcc (32-bit only). */
static void putu(u32 v)
{
	char buf[12];
	int i = sizeof(buf) - 1;

	buf[i] = 0;
	do {
		buf[--i] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	puts_(buf + i);
}

static void puti(long v)
{
	if (v < 0) {
		puts_("-");
		v = -v;
	}
	putu((u32)v);
}

static int starts_with(const char *s, const char *prefix)
{
	while (*prefix)
		if (*s++ != *prefix++)
			return 0;
	return 1;
}

static int streq(const char *a, const char *b)
{
	while (*a && *a == *b)
		a++, b++;
	return *a == *b;
}

static void do_mount(const char *src, const char *dir, const char *type)
{
	long r;

	sys3(SYS_mkdir, (long)dir, 0755, 0); /* EEXIST is fine */
	r = sys5(SYS_mount, (long)src, (long)dir, (long)type, 0, 0);
	/* EBUSY: already mounted there (the kernel mounts devtmpfs on /dev of a
	 * disk root by itself, with DEVTMPFS_MOUNT). */
	if (r < 0 && r != -EBUSY) {
		puts_("keel-init: mount ");
		puts_(dir);
		puts_(" failed: ");
		puti(r);
		puts_("\n");
	}
}

static long count_cpus(void)
{
	u32 mask[32]; /* up to 1024 CPUs */
	long n, i, cpus = 0;

	n = sys3(SYS_sched_getaffinity, 0, sizeof(mask), (long)mask);
	if (n < 0)
		return n;
	for (i = 0; i < n / 4; i++) {
		u32 w = mask[i];
		while (w) {
			cpus += w & 1;
			w >>= 1;
		}
	}
	return cpus;
}

/* Reads up to size-1 bytes of a file and NUL-terminates: length or -errno. */
static long read_file(const char *path, char *buf, long size)
{
	long fd, n, got = 0;

	fd = sys3(SYS_open, (long)path, O_RDONLY, 0);
	if (fd < 0)
		return fd;
	while (got < size - 1) {
		n = sys3(SYS_read, fd, (long)(buf + got), size - 1 - got);
		if (n == -EINTR)
			continue;
		if (n < 0) {
			got = n;
			break;
		}
		if (n == 0)
			break;
		got += n;
	}
	sys3(SYS_close, fd, 0, 0);
	buf[got < 0 ? 0 : got] = 0;
	return got;
}

static char filebuf[8192];

static long mem_total_kib(void)
{
	long total = 0, got;
	char *p;

	got = read_file("/proc/meminfo", filebuf, sizeof(filebuf));
	if (got < 0)
		return got;
	for (p = filebuf; *p; p++) {
		if ((p == filebuf || p[-1] == '\n') && starts_with(p, "MemTotal:")) {
			p += 9;
			while (*p == ' ')
				p++;
			while (*p >= '0' && *p <= '9')
				total = total * 10 + (*p++ - '0');
			return total;
		}
	}
	return -1;
}

static void puts_n(const char *s, u32 n)
{
	sys3(SYS_write, out_fd, (long)s, n);
}

/* The value of "name=..." in envp, or 0. */
static const char *getenv_(char **envp, const char *name_eq)
{
	const char *v = 0;
	long i;

	for (i = 0; envp[i]; i++)
		if (starts_with(envp[i], name_eq))
			v = envp[i] + slen(name_eq); /* the last one wins */
	return v;
}

/*
 * Opens `path` with `flags` and reads up to `size` bytes into `buf`: the bytes read, or the
 * negative errno of the open or of a first read that failed.
 */
static long read_dev(const char *path, long flags, unsigned char *buf, long size)
{
	long fd, got = 0, n;

	fd = sys3(SYS_open, (long)path, flags, 0);
	if (fd < 0)
		return fd;
	while (got < size) {
		n = sys3(SYS_read, fd, (long)(buf + got), size - got);
		if (n == -EINTR)
			continue;
		if (n <= 0) {
			if (got == 0)
				got = n;
			break;
		}
		got += n;
	}
	sys3(SYS_close, fd, 0, 0);
	return got;
}

/* keel_report=rng: which hw_random source is current, and 32 bytes of it. */
static void report_rng(void)
{
	static const char hex[] = "0123456789abcdef";
	unsigned char rnd[32];
	char line[2 * sizeof(rnd) + 1];
	long got;
	u32 i;

	got = read_file("/sys/class/misc/hw_random/rng_current", filebuf, sizeof(filebuf));
	puts_("keel-init: rng_current=");
	if (got < 0) {
		puts_("error ");
		puti(got);
	} else {
		while (got > 0 && (filebuf[got - 1] == '\n' || filebuf[got - 1] == ' '))
			filebuf[--got] = 0;
		puts_(filebuf);
	}
	puts_("\n");

	got = read_dev("/dev/hwrng", O_RDONLY, rnd, sizeof(rnd));
	puts_("keel-init: hwrng read=");
	puti(got);
	puts_("\n");
	if (got > 0) {
		for (i = 0; i < (u32)got; i++) {
			line[2 * i] = hex[rnd[i] >> 4];
			line[2 * i + 1] = hex[rnd[i] & 15];
		}
		line[2 * got] = 0;
		puts_("keel-init: hwrng bytes=");
		puts_(line);
		puts_("\n");
	}
}

/* keel_report=vdb: the first 64 KiB of /dev/vdb, read past the page cache. */
static void report_vdb(void)
{
	static const char hex[] = "0123456789abcdef";
	static unsigned char buf[64 << 10] __attribute__((aligned(4096)));
	unsigned long long h = 0xcbf29ce484222325ULL;
	char out[17];
	long got;
	u32 i;

	got = read_dev("/dev/vdb", O_RDONLY | O_DIRECT, buf, sizeof(buf));
	for (i = 0; got > 0 && i < (u32)got; i++) {
		h ^= buf[i];
		h *= 0x100000001b3ULL;
	}
	for (i = 0; i < 16; i++)
		out[i] = hex[(h >> (60 - 4 * i)) & 15];
	out[16] = 0;
	puts_("keel-init: vdb read=");
	puti(got);
	puts_(" fnv=");
	puts_(out);
	puts_("\n");
}

/*
 * "keel-init: root=/dev/NAME dev=MAJ:MIN": the block device "/" is on (a
 * root mounted by the kernel from root= shows as "/dev/root" in
 * /proc/mounts), or "root=none" when it is not a block device (initramfs).
 */
static void report_root(void)
{
	u32 st[32]; /* struct stat64 is 96 bytes; st_dev (u64) comes first */
	char path[40] = "/sys/dev/block/";
	u32 dev, maj, min, n = 15, k;
	char num[12], *p;
	long r;

	r = sys3(SYS_stat64, (long)"/", (long)st, 0);
	if (r < 0) {
		puts_("keel-init: root error ");
		puti(r);
		puts_("\n");
		return;
	}
	dev = st[0]; /* new_encode_dev() */
	maj = (dev >> 8) & 0xfff;
	min = (dev & 0xff) | ((dev >> 12) & 0xfff00);
	for (k = 0; k < 2; k++) { /* path += "MAJ:MIN" */
		u32 v = k ? min : maj, i = sizeof(num);
		do {
			num[--i] = (char)('0' + v % 10);
			v /= 10;
		} while (v);
		while (i < sizeof(num))
			path[n++] = num[i++];
		path[n++] = k ? '/' : ':';
	}
	for (k = 0; k < 6; k++)
		path[n++] = "uevent"[k];
	path[n] = 0;

	puts_("keel-init: root=");
	p = 0;
	if (read_file(path, filebuf, sizeof(filebuf)) > 0)
		for (p = filebuf; *p; p++)
			if ((p == filebuf || p[-1] == '\n') && starts_with(p, "DEVNAME="))
				break;
	if (p && *p) {
		char *e = p + 8;
		while (*e && *e != '\n')
			e++;
		puts_("/dev/");
		puts_n(p + 8, (u32)(e - p - 8));
	} else {
		puts_("none");
	}
	puts_(" dev=");
	putu(maj);
	puts_(":");
	putu(min);
	puts_("\n");
}

/* keel_report=mounts: /proc/mounts, one "keel-init: mount " line per entry. */
static void report_mounts(void)
{
	long got = read_file("/proc/mounts", filebuf, sizeof(filebuf));
	char *p = filebuf, *nl;

	if (got < 0) {
		puts_("keel-init: mount error ");
		puti(got);
		puts_("\n");
	}
	while (got > 0 && *p) {
		for (nl = p; *nl && *nl != '\n'; nl++)
			;
		puts_("keel-init: mount ");
		puts_n(p, (u32)(nl - p));
		puts_("\n");
		p = *nl ? nl + 1 : nl;
	}
	report_root();
}

/* keel_report=a,b,...: run each item in order. */
static void report(const char *items)
{
	const char *p = items, *end;
	char item[32];
	u32 n;

	while (*p) {
		for (end = p; *end && *end != ','; end++)
			;
		n = (u32)(end - p);
		if (n >= sizeof(item))
			n = sizeof(item) - 1;
		for (u32 i = 0; i < n; i++)
			item[i] = p[i];
		item[n] = 0;
		if (streq(item, "rng")) {
			report_rng();
		} else if (streq(item, "mounts")) {
			report_mounts();
		} else if (streq(item, "vdb")) {
			report_vdb();
		} else if (n) {
			puts_("keel-init: unknown keel_report item ");
			puts_(item);
			puts_("\n");
		}
		p = *end ? end + 1 : end;
	}
}

static int vsock_failed(const char *step, long r)
{
	if (r >= 0)
		return 0;
	puts_("keel-init: vsock error ");
	puts_(step);
	puts_(" ");
	puti(r);
	puts_("\n");
	return 1;
}

/* keel_touch=MIB: fault in MIB MiB of anonymous memory, then give it back. */
static void touch_memory(const char *mib_str)
{
	/* i386 old_mmap (90) takes its six arguments in a block. */
	struct {
		u32 addr, len, prot, flags, fd, offset;
	} args;
	u32 mib = 0;
	const char *p;
	long base;
	u32 off;

	for (p = mib_str; *p >= '0' && *p <= '9' && mib < 4096; p++)
		mib = mib * 10 + (u32)(*p - '0');
	if (*p || p == mib_str || mib == 0 || mib >= 4096) {
		puts_("keel-init: bad keel_touch=");
		puts_(mib_str);
		puts_("\n");
		return;
	}
	args.addr = 0;
	args.len = mib << 20;
	args.prot = 3;     /* PROT_READ | PROT_WRITE */
	args.flags = 0x22; /* MAP_PRIVATE | MAP_ANONYMOUS */
	args.fd = (u32)-1;
	args.offset = 0;
	base = sys3(SYS_old_mmap, (long)&args, 0, 0);
	if (base < 0 && base > -4096) {
		puts_("keel-init: touch mmap failed ");
		puti(base);
		puts_("\n");
		return;
	}
	for (off = 0; off < args.len; off += 4096)
		*(volatile char *)(base + off) = 1;
	sys3(SYS_munmap, base, args.len, 0);
	puts_("keel-init: touched ");
	putu(mib);
	puts_(" MiB\n");
}

/* keel_vsock=PORT: accept one connection, echo one read back with "echo:". */
static void vsock_echo(const char *port_str)
{
	struct sockaddr_vm addr = { 0 };
	static char buf[5 + 256] = "echo:";
	long fd, conn, n, w;
	u32 port = 0;
	const char *p;

	for (p = port_str; *p >= '0' && *p <= '9'; p++)
		port = port * 10 + (u32)(*p - '0');
	if (*p || p == port_str) {
		puts_("keel-init: vsock error port ");
		puts_(port_str);
		puts_("\n");
		return;
	}

	fd = sys3(SYS_socket, AF_VSOCK, SOCK_STREAM, 0);
	if (vsock_failed("socket", fd))
		return;
	addr.svm_family = AF_VSOCK;
	addr.svm_port = port;
	addr.svm_cid = VMADDR_CID_ANY;
	if (vsock_failed("bind", sys3(SYS_bind, fd, (long)&addr, sizeof(addr))) ||
	    vsock_failed("listen", sys3(SYS_listen, fd, 1, 0)))
		goto out;
	puts_("keel-init: vsock listening port=");
	putu(port);
	puts_("\n");

	do
		conn = sys5(SYS_accept4, fd, 0, 0, 0, 0);
	while (conn == -EINTR);
	if (vsock_failed("accept", conn))
		goto out;
	do
		n = sys3(SYS_read, conn, (long)(buf + 5), sizeof(buf) - 5);
	while (n == -EINTR);
	if (!vsock_failed("read", n)) {
		w = sys3(SYS_write, conn, (long)buf, 5 + n);
		if (!vsock_failed("write", w)) {
			puts_("keel-init: vsock echoed ");
			puti(n);
			puts_(" bytes\n");
		}
	}
	sys3(SYS_close, conn, 0, 0);
out:
	sys3(SYS_close, fd, 0, 0);
}

/*
 * keel_wait=powerbutton: wait for KEY_POWER on any /dev/input/eventN.
 * Returns when it is pressed, or at once if there is no input device (or poll
 * fails).
 */
static void wait_power_button(void)
{
	struct pollfd pfd[MAX_INPUT];
	struct input_event32 ev[16];
	char path[] = "/dev/input/eventNN";
	char name[64];
	long nfd = 0, fd, r, n, i, k;

	for (i = 0; i < MAX_INPUT; i++) {
		path[16] = (char)('0' + (i < 10 ? i : i / 10));
		path[17] = i < 10 ? 0 : (char)('0' + i % 10);
		fd = sys3(SYS_open, (long)path, O_RDONLY, 0);
		if (fd < 0) {
			if (fd != -ENOENT) {
				puts_("keel-init: open ");
				puts_(path);
				puts_(" failed: ");
				puti(fd);
				puts_("\n");
			}
			continue;
		}
		r = sys3(SYS_ioctl, fd, (long)EVIOCGNAME(sizeof(name) - 1), (long)name);
		name[r > 0 && r < (long)sizeof(name) ? r : 0] = 0;
		puts_("keel-init: input ");
		puts_(path);
		puts_(" \"");
		puts_(name);
		puts_("\"\n");
		pfd[nfd].fd = (int)fd;
		pfd[nfd].events = POLLIN;
		nfd++;
	}
	if (nfd == 0) {
		puts_("keel-init: no input device\n");
		return;
	}
	puts_("keel-init: waiting for power button\n");
	for (;;) {
		r = sys3(SYS_poll, (long)pfd, nfd, -1);
		if (r == -EINTR)
			continue;
		if (r < 0) {
			puts_("keel-init: poll failed: ");
			puti(r);
			puts_("\n");
			return;
		}
		for (i = 0; i < nfd; i++) {
			if (!pfd[i].revents)
				continue;
			n = sys3(SYS_read, pfd[i].fd, (long)ev, sizeof(ev));
			if (n < 0 && n != -EINTR)
				pfd[i].fd = -1; /* gone (e.g. -ENODEV): poll skips it */
			for (k = 0; k < n / (long)sizeof(ev[0]); k++) {
				if (ev[k].type == EV_KEY && ev[k].code == KEY_POWER &&
				    ev[k].value == 1) {
					/* keel_after, then keel_exit, follow. */
					puts_("keel-init: power button pressed\n");
					return;
				}
			}
		}
	}
}

__attribute__((used, noreturn)) void keel_main(long *sp)
{
	long argc = sp[0];
	char **envp = (char **)(sp + 1 + argc + 1);
	const char *mode, *v;
	u32 cmd;
	long i, r;

	/* stdout is /dev/console if the initramfs has that node; else open it. */
	if (sys3(SYS_write, out_fd, (long)"", 0) < 0)
		out_fd = sys3(SYS_open, (long)"/dev/console", O_WRONLY, 0);

	do_mount("proc", "/proc", "proc");
	do_mount("sysfs", "/sys", "sysfs");
	do_mount("devtmpfs", "/dev", "devtmpfs");

	puts_("\nKEEL-INIT-OK\n");

	puts_("keel-init: cpus=");
	puti(count_cpus());
	puts_(" mem_kib=");
	puti(mem_total_kib());
	puts_("\n");

	for (i = 0; i < 1000; i++) {
		r = sys3(SYS_getpid, 0, 0, 0);
		if (r != 1) {
			puts_("keel-init: getpid returned ");
			puti(r);
			puts_(" (expected 1)\n");
			break;
		}
	}

	v = getenv_(envp, "keel_touch=");
	if (v)
		touch_memory(v);
	v = getenv_(envp, "keel_report=");
	if (v)
		report(v);
	v = getenv_(envp, "keel_vsock=");
	if (v)
		vsock_echo(v);
	v = getenv_(envp, "keel_wait=");
	if (v) {
		if (streq(v, "powerbutton")) {
			wait_power_button();
		} else {
			puts_("keel-init: unknown keel_wait=");
			puts_(v);
			puts_("\n");
		}
	}
	v = getenv_(envp, "keel_after=");
	if (v)
		report(v);

	mode = getenv_(envp, "keel_exit=");
	if (!mode)
		mode = "poweroff";
	if (streq(mode, "reboot")) {
		cmd = LINUX_REBOOT_CMD_RESTART;
	} else if (streq(mode, "halt")) {
		cmd = LINUX_REBOOT_CMD_HALT;
	} else if (streq(mode, "panic")) {
		puts_("keel-init: exit=panic\n");
		drain();
		sys3(SYS_exit, 1, 0, 0);
		for (;;)
			;
	} else {
		if (!streq(mode, "poweroff")) {
			puts_("keel-init: unknown keel_exit=");
			puts_(mode);
			puts_(", using poweroff\n");
			mode = "poweroff";
		}
		cmd = LINUX_REBOOT_CMD_POWER_OFF;
	}
	puts_("keel-init: exit=");
	puts_(mode);
	puts_("\n");
	drain();

	r = sys5(SYS_reboot, (long)LINUX_REBOOT_MAGIC1, (long)LINUX_REBOOT_MAGIC2,
		 (long)cmd, 0, 0);
	puts_("keel-init: reboot() failed: ");
	puti(r);
	puts_("\n");
	drain();
	sys3(SYS_exit, 2, 0, 0); /* the kernel panics: init exited */
	for (;;)
		;
}
