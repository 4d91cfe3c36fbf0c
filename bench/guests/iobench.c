/*
 * iobench: the block and network throughput program of bench/iobench.py.
 *
 * One freestanding static i386 binary (no libc, system calls through
 * `int $0x80` only, no x87/MMX/SSE: the kind of user space that runs on PVM,
 * see guest/README.md), used in three places so that every number comes from
 * the same code:
 *   - as /init of its own tiny initramfs inside the guest (pid 1): it mounts
 *     devtmpfs, runs the jobs of the kernel parameters below (an unknown,
 *     undotted `name=value` kernel parameter reaches init's envp) and powers
 *     the VM off;
 *   - on the host, with the same settings as environment variables, for the
 *     host baselines (block jobs on the image file; network jobs from one
 *     network namespace to another over a veth pair); it then exits;
 *   - on the host as the network peer (`iobench_serve=PORT`).
 *
 * Settings (kernel parameters in the guest, environment on the host):
 *   iobench=JOB[,JOB...]   jobs, run in the order given:
 *       seqw  sequential 1 MiB pwrite()s   seqr  sequential 1 MiB pread()s
 *       randw random 4 KiB pwrite()s       randr random 4 KiB pread()s
 *             (offsets: aligned, uniform over the device, xorshift32)
 *       tx    TCP: this side writes 64 KiB write()s to the peer
 *       rx    TCP: the peer writes, this side reads
 *   iobench_dev=PATH       block device or file for the block jobs
 *   iobench_direct=1|0     open it with O_DIRECT (default 1)
 *   iobench_ms=N           duration of each job (default 3000)
 *   iobench_net=A.B.C.D:PORT  the peer of tx/rx
 *   iobench_serve=PORT     peer mode: accept connections forever (see below)
 *   iobench_trace=1        also "IOBENCH-T <step> at=<ns>" lines (where time goes)
 *
 * Output (one line each, on stdout = /dev/console in the guest):
 *   IOBENCH-START pid=<n>
 *   IOBENCH-DEV <path> size=<bytes> direct=<0|1>
 *   IOBENCH <job> bytes=<n> ns=<n> ops=<n>        (tx adds peer_bytes=<n>)
 *   IOBENCH <job> error=<step> errno=<-n>
 *   IOBENCH-DONE
 * Times come from clock_gettime64(CLOCK_MONOTONIC) (i386 syscall 403).
 * Block jobs end at the first check of the clock after iobench_ms (every op
 * for 1 MiB, every 16 ops for 4 KiB); `ns` runs from the first op to that check.
 *
 * Network protocol: the client binds a local port of its own (see net_job:
 * it spares the guest kernel a 256 KiB random-table fill on its first
 * connect), connects and sends 5 bytes: 'T' or 'R' and
 * the duration in ms (u32, little-endian).
 *   T: the client writes for iobench_ms, shuts its side down and reads the
 *      peer's reply (the byte count it received, in decimal) until EOF; `ns`
 *      runs from connect() to that EOF, so every byte has been received.
 *   R: the peer writes for the duration and closes; the client reads until
 *      EOF; `ns` runs from connect() to EOF.
 */

#define SYS_exit 1
#define SYS_read 3
#define SYS_write 4
#define SYS_open 5
#define SYS_close 6
#define SYS_getpid 20
#define SYS_mount 21
#define SYS_mkdir 39
#define SYS_ioctl 54
#define SYS_reboot 88
#define SYS_llseek 140
#define SYS_pread64 180
#define SYS_pwrite64 181
#define SYS_exit_group 252
#define SYS_socket 359
#define SYS_bind 361
#define SYS_connect 362
#define SYS_listen 363
#define SYS_accept4 364
#define SYS_setsockopt 366
#define SYS_shutdown 373
#define SYS_clock_gettime64 403

#define O_RDONLY 0
#define O_WRONLY 1
#define O_RDWR 2
#define O_DIRECT 040000
#define O_LARGEFILE 0100000
#define SEEK_END 2
#define EINTR 4
#define EAGAIN 11
#define EBUSY 16
#define TCSBRK 0x5409
#define CLOCK_MONOTONIC 1

#define AF_INET 2
#define SOCK_STREAM 1
#define SOL_SOCKET 1
#define SO_REUSEADDR 2
#define SHUT_WR 1

#define LINUX_REBOOT_MAGIC1 0xfee1deadU
#define LINUX_REBOOT_MAGIC2 672274793U
#define LINUX_REBOOT_CMD_POWER_OFF 0x4321FEDCU

#define SEQ_BS (1U << 20)
#define RAND_BS 4096U
#define NET_BUF (64U * 1024)

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;
typedef unsigned long long u64;
typedef long long s64;

struct timespec64 {
	s64 tv_sec;
	s64 tv_nsec;
};

struct sockaddr_in {
	u16 sin_family;
	u16 sin_port; /* big-endian */
	u32 sin_addr; /* big-endian */
	u8 sin_zero[8];
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
	"	call iobench_main\n"
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
static int is_init;

/* 1 MiB, page-aligned (O_DIRECT); the network jobs use its first 64 KiB. */
static u8 buf[SEQ_BS] __attribute__((aligned(4096)));
static char line[256];
static u32 line_len;

static u32 slen(const char *s)
{
	u32 n = 0;
	while (s[n])
		n++;
	return n;
}

static void flush_line(void)
{
	sys3(SYS_write, out_fd, (long)line, line_len);
	line_len = 0;
}

static void put(const char *s)
{
	while (*s) {
		if (line_len == sizeof(line))
			flush_line();
		line[line_len++] = *s++;
		if (line[line_len - 1] == '\n')
			flush_line();
	}
}

/* v /= 10, returning the remainder, without libgcc's 64-bit division. */
static u32 div10(u64 *v)
{
	u32 hi = (u32)(*v >> 32), lo = (u32)*v, qhi = hi / 10, r = hi % 10, qlo;

	__asm__("divl %4" : "=a"(qlo), "=d"(r) : "0"(lo), "1"(r), "rm"(10U));
	*v = ((u64)qhi << 32) | qlo;
	return r;
}

/* v in decimal at the end of s[24]: returns where it starts. */
static char *fmtu(char *s, u64 v)
{
	int i = 23;

	s[i] = 0;
	do
		s[--i] = (char)('0' + div10(&v));
	while (v);
	return s + i;
}

static void putu(u64 v)
{
	char s[24];

	put(fmtu(s, v));
}

static void puti(long v)
{
	if (v < 0) {
		put("-");
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

static const char *getenv_(char **envp, const char *name_eq)
{
	const char *v = 0;
	long i;

	for (i = 0; envp[i]; i++)
		if (starts_with(envp[i], name_eq))
			v = envp[i] + slen(name_eq); /* the last one wins */
	return v;
}

/* Decimal prefix of s; *end (if given) gets the first non-digit. */
static u32 parse_u32(const char *s, const char **end)
{
	u32 v = 0;

	while (*s >= '0' && *s <= '9')
		v = v * 10 + (u32)(*s++ - '0');
	if (end)
		*end = s;
	return v;
}

static u64 now_ns(void)
{
	struct timespec64 ts;

	sys3(SYS_clock_gettime64, CLOCK_MONOTONIC, (long)&ts, 0);
	return (u64)ts.tv_sec * 1000000000ULL + (u64)ts.tv_nsec;
}

static u64 start_ns;
static int tracing;

/* iobench_trace=1: "IOBENCH-T <what> at=<ns since IOBENCH-START>" */
static void trace(const char *what)
{
	if (!tracing)
		return;
	put("IOBENCH-T ");
	put(what);
	put(" at=");
	putu(now_ns() - start_ns);
	put("\n");
}

static void report(const char *job, u64 bytes, u64 ns, u64 ops)
{
	put("IOBENCH ");
	put(job);
	put(" bytes=");
	putu(bytes);
	put(" ns=");
	putu(ns);
	put(" ops=");
	putu(ops);
}

static void report_error(const char *job, const char *step, long err)
{
	put("IOBENCH ");
	put(job);
	put(" error=");
	put(step);
	put(" errno=");
	puti(err);
	put("\n");
}

/* ------------------------------------------------------------------ block -- */

static long blk_fd = -1;
static u64 blk_size;

static int blk_open(const char *path, int direct)
{
	u32 res[2];
	long r;

	blk_fd = sys3(SYS_open, (long)path, O_RDWR | O_LARGEFILE | (direct ? O_DIRECT : 0), 0);
	if (blk_fd < 0) {
		report_error("open", path, blk_fd);
		return -1;
	}
	r = sys5(SYS_llseek, blk_fd, 0, 0, (long)res, SEEK_END);
	if (r < 0) {
		report_error("open", "llseek", r);
		return -1;
	}
	blk_size = ((u64)res[1] << 32) | res[0];
	put("IOBENCH-DEV ");
	put(path);
	put(" size=");
	putu(blk_size);
	put(" direct=");
	putu((u64)direct);
	put("\n");
	if (blk_size < SEQ_BS) {
		report_error("open", "size", 0);
		return -1;
	}
	return 0;
}

static void blk_job(const char *job, int write, int random, u64 dur_ns)
{
	u32 bs = random ? RAND_BS : SEQ_BS, mask = random ? 15 : 0;
	/* Number of bs-sized blocks (bs is a power of two: no 64-bit division). */
	u64 nblk64 = blk_size >> (random ? 12 : 20);
	u32 nblk = nblk64 > 0xffffffffULL ? 0xffffffffU : (u32)nblk64;
	u32 x = 2463534242U, blk = 0;
	u64 t0, t, off, bytes = 0, ops = 0;
	long r;

	/*
	 * No fill loop: on PVM every first touch of a page costs the guest
	 * kernel's (emulated) page clearing, ~0.1 s per page.  Writes send
	 * whatever the buffer holds (zeros, or what an earlier read put there).
	 * One untimed op first, so the buffer is faulted in outside the window.
	 */
	trace("blk-warmup");
	r = sys5(write ? SYS_pwrite64 : SYS_pread64, blk_fd, (long)buf, bs, 0, 0);
	if (r != (long)bs) {
		report_error(job, write ? "pwrite" : "pread", r);
		return;
	}
	trace("blk-go");
	t0 = t = now_ns();
	for (;;) {
		if (random) {
			x ^= x << 13;
			x ^= x >> 17;
			x ^= x << 5;
			blk = x % nblk;
		} else {
			blk = ops == 0 ? 0 : blk + 1;
			if (blk >= nblk)
				blk = 0;
		}
		off = (u64)blk << (random ? 12 : 20);
		do
			r = sys5(write ? SYS_pwrite64 : SYS_pread64, blk_fd, (long)buf, bs,
				 (long)(u32)off, (long)(u32)(off >> 32));
		while (r == -EINTR);
		if (r != (long)bs) {
			report_error(job, write ? "pwrite" : "pread", r);
			return;
		}
		bytes += bs;
		ops++;
		if ((ops & mask) == 0) {
			t = now_ns();
			if (t - t0 >= dur_ns)
				break;
		}
	}
	report(job, bytes, t - t0, ops);
	put("\n");
	trace("blk-reported");
}

/* ---------------------------------------------------------------- network -- */

static u16 be16(u16 v)
{
	return (u16)((v >> 8) | (v << 8));
}

/* "A.B.C.D:PORT" -> big-endian address and port; 0 on success. */
static int parse_addr(const char *s, struct sockaddr_in *sa)
{
	u32 a = 0, i, part;
	const char *p = s;

	for (i = 0; i < 4; i++) {
		part = parse_u32(p, &p);
		if (part > 255 || *p != (i < 3 ? '.' : ':'))
			return -1;
		a |= part << (8 * i); /* network order in memory */
		p++;
	}
	sa->sin_family = AF_INET;
	sa->sin_addr = a;
	sa->sin_port = be16((u16)parse_u32(p, 0));
	for (i = 0; i < 8; i++)
		sa->sin_zero[i] = 0;
	return 0;
}

static long write_all(long fd, const u8 *p, u32 n)
{
	long r;

	while (n) {
		r = sys3(SYS_write, fd, (long)p, n);
		if (r == -EINTR || r == -EAGAIN)
			continue;
		if (r <= 0)
			return r ? r : -1;
		p += r;
		n -= (u32)r;
	}
	return 0;
}

static long read_full(long fd, u8 *p, u32 n)
{
	long r;

	while (n) {
		r = sys3(SYS_read, fd, (long)p, n);
		if (r == -EINTR)
			continue;
		if (r <= 0)
			return r ? r : -1;
		p += r;
		n -= (u32)r;
	}
	return 0;
}

static void net_job(const char *job, const struct sockaddr_in *sa, int tx, u32 dur_ms)
{
	u8 hdr[5] = { tx ? 'T' : 'R', (u8)dur_ms, (u8)(dur_ms >> 8), (u8)(dur_ms >> 16),
		      (u8)(dur_ms >> 24) };
	u64 t0, t, bytes = 0, ops = 0, peer = 0, dur_ns = (u64)dur_ms * 1000000ULL;
	struct sockaddr_in local = { 0 };
	char reply[32];
	long fd, r;
	u32 i, n = 0;

	trace("net-socket");
	fd = sys3(SYS_socket, AF_INET, SOCK_STREAM, 0);
	if (fd < 0) {
		report_error(job, "socket", fd);
		return;
	}
	/*
	 * Bind an explicit local port: the kernel's first connect() of an unbound
	 * socket fills its 256 KiB source-port perturbation table with random
	 * bytes (__inet_hash_connect, table_perturb): 13-30 s of emulated kernel
	 * code on PVM.  The port comes from the clock (a new one per connection).
	 */
	local.sin_family = AF_INET;
	local.sin_port = be16((u16)(40000 + ((u32)now_ns() >> 10) % 20000));
	r = sys3(SYS_bind, fd, (long)&local, sizeof(local));
	if (r < 0)
		report_error(job, "bind-local-port", r); /* goes on: the kernel picks one */
	trace("net-connect");
	do
		r = sys3(SYS_connect, fd, (long)sa, sizeof(*sa));
	while (r == -EINTR);
	if (r < 0) {
		report_error(job, "connect", r);
		goto out;
	}
	trace("net-connected");
	t0 = now_ns();
	r = write_all(fd, hdr, sizeof(hdr));
	if (r < 0) {
		report_error(job, "header", r);
		goto out;
	}
	if (tx) {
		do {
			r = write_all(fd, buf, NET_BUF);
			if (r < 0) {
				report_error(job, "write", r);
				goto out;
			}
			bytes += NET_BUF;
			ops++;
			t = now_ns();
		} while (t - t0 < dur_ns);
		sys3(SYS_shutdown, fd, SHUT_WR, 0);
		for (;;) { /* the peer's count, then EOF */
			r = sys3(SYS_read, fd, (long)(reply + n), sizeof(reply) - 1 - n);
			if (r == -EINTR)
				continue;
			if (r < 0) {
				report_error(job, "reply", r);
				goto out;
			}
			if (r == 0 || (n += (u32)r) >= sizeof(reply) - 1)
				break;
		}
		t = now_ns();
		reply[n] = 0;
		for (i = 0; i < n && reply[i] >= '0' && reply[i] <= '9'; i++)
			peer = peer * 10 + (u64)(reply[i] - '0');
		report(job, bytes, t - t0, ops);
		put(" peer_bytes=");
		putu(peer);
		put("\n");
	} else {
		for (;;) {
			r = sys3(SYS_read, fd, (long)buf, NET_BUF);
			if (r == -EINTR)
				continue;
			if (r < 0) {
				report_error(job, "read", r);
				goto out;
			}
			if (r == 0)
				break;
			bytes += (u64)r;
			ops++;
		}
		t = now_ns();
		report(job, bytes, t - t0, ops);
		put("\n");
	}
out:
	sys3(SYS_close, fd, 0, 0);
}

/* Peer mode: one connection at a time, forever (the harness kills us). */
static void serve(u32 port)
{
	struct sockaddr_in sa = { 0 };
	u8 hdr[5];
	u64 t0, t, bytes, dur_ns;
	long s, c, r;
	int one = 1;
	u32 i;

	for (i = 0; i < NET_BUF; i++)
		buf[i] = (u8)(i * 13 + 5);
	s = sys3(SYS_socket, AF_INET, SOCK_STREAM, 0);
	if (s < 0) {
		report_error("serve", "socket", s);
		return;
	}
	sys5(SYS_setsockopt, s, SOL_SOCKET, SO_REUSEADDR, (long)&one, sizeof(one));
	sa.sin_family = AF_INET;
	sa.sin_port = be16((u16)port);
	r = sys3(SYS_bind, s, (long)&sa, sizeof(sa));
	if (r < 0) {
		report_error("serve", "bind", r);
		return;
	}
	r = sys3(SYS_listen, s, 8, 0);
	if (r < 0) {
		report_error("serve", "listen", r);
		return;
	}
	put("IOBENCH-SERVE port=");
	putu(port);
	put("\n");
	for (;;) {
		c = sys5(SYS_accept4, s, 0, 0, 0, 0);
		if (c < 0)
			continue;
		bytes = 0;
		if (read_full(c, hdr, sizeof(hdr)) < 0) {
			sys3(SYS_close, c, 0, 0);
			continue;
		}
		dur_ns = (u64)((u32)hdr[1] | (u32)hdr[2] << 8 | (u32)hdr[3] << 16 |
			       (u32)hdr[4] << 24) * 1000000ULL;
		t0 = t = now_ns();
		if (hdr[0] == 'T') {
			for (;;) {
				r = sys3(SYS_read, c, (long)buf, NET_BUF);
				if (r == -EINTR)
					continue;
				if (r <= 0)
					break;
				bytes += (u64)r;
			}
			t = now_ns();
			{ /* the reply: the count, in decimal */
				char num[24], *d = fmtu(num, bytes);
				write_all(c, (const u8 *)d, slen(d));
			}
			put("IOBENCH-SERVED rx");
		} else {
			do {
				if (write_all(c, buf, NET_BUF) < 0)
					break;
				bytes += NET_BUF;
				t = now_ns();
			} while (t - t0 < dur_ns);
			put("IOBENCH-SERVED tx");
		}
		put(" bytes=");
		putu(bytes);
		put(" ns=");
		putu(t - t0);
		put("\n");
		sys3(SYS_close, c, 0, 0);
	}
}

/* ------------------------------------------------------------------- main -- */

static void finish(void)
{
	put("IOBENCH-DONE\n");
	if (!is_init)
		sys3(SYS_exit_group, 0, 0, 0);
	sys3(SYS_ioctl, out_fd, TCSBRK, 1); /* let the console send it all */
	sys5(SYS_reboot, (long)LINUX_REBOOT_MAGIC1, (long)LINUX_REBOOT_MAGIC2,
	     (long)LINUX_REBOOT_CMD_POWER_OFF, 0, 0);
	sys3(SYS_exit, 1, 0, 0);
}

__attribute__((used, noreturn)) void iobench_main(long *sp)
{
	long argc = sp[0];
	char **envp = (char **)(sp + 1 + argc + 1);
	const char *jobs, *v, *p, *end;
	struct sockaddr_in sa;
	int have_net = 0, direct = 1;
	u32 dur_ms = 3000, n, i;
	char job[16];
	long r;

	is_init = sys3(SYS_getpid, 0, 0, 0) == 1;
	if (is_init) {
		/* stdout is /dev/console if the initramfs has that node. */
		if (sys3(SYS_write, out_fd, (long)"", 0) < 0)
			out_fd = sys3(SYS_open, (long)"/dev/console", O_WRONLY, 0);
		sys3(SYS_mkdir, (long)"/dev", 0755, 0);
		r = sys5(SYS_mount, (long)"devtmpfs", (long)"/dev", (long)"devtmpfs", 0, 0);
		if (r < 0 && r != -EBUSY)
			report_error("init", "mount-devtmpfs", r);
	}

	v = getenv_(envp, "iobench_serve=");
	if (v) {
		serve(parse_u32(v, 0));
		sys3(SYS_exit_group, 1, 0, 0);
	}

	start_ns = now_ns();
	v = getenv_(envp, "iobench_trace=");
	tracing = v && v[0] == '1';
	put("\nIOBENCH-START pid=");
	putu((u64)sys3(SYS_getpid, 0, 0, 0));
	put("\n");
	v = getenv_(envp, "iobench_ms=");
	if (v)
		dur_ms = parse_u32(v, 0);
	v = getenv_(envp, "iobench_direct=");
	if (v)
		direct = v[0] != '0';
	v = getenv_(envp, "iobench_net=");
	if (v) {
		if (parse_addr(v, &sa) == 0)
			have_net = 1;
		else
			report_error("net", "address", 0);
	}
	jobs = getenv_(envp, "iobench=");
	if (!jobs)
		jobs = "";

	for (p = jobs; *p; p = *end ? end + 1 : end) {
		for (end = p; *end && *end != ','; end++)
			;
		n = (u32)(end - p);
		if (n >= sizeof(job))
			n = sizeof(job) - 1;
		for (i = 0; i < n; i++)
			job[i] = p[i];
		job[n] = 0;
		if (!n)
			continue;
		if (job[0] == 's' || (job[0] == 'r' && job[1] == 'a')) { /* block */
			if (blk_fd < 0) {
				v = getenv_(envp, "iobench_dev=");
				if (!v || blk_open(v, direct) < 0) {
					if (!v)
						report_error(job, "no-iobench_dev", 0);
					continue;
				}
			}
			if (streq(job, "seqr"))
				blk_job("seqr", 0, 0, (u64)dur_ms * 1000000ULL);
			else if (streq(job, "seqw"))
				blk_job("seqw", 1, 0, (u64)dur_ms * 1000000ULL);
			else if (streq(job, "randr"))
				blk_job("randr", 0, 1, (u64)dur_ms * 1000000ULL);
			else if (streq(job, "randw"))
				blk_job("randw", 1, 1, (u64)dur_ms * 1000000ULL);
			else
				report_error(job, "unknown-job", 0);
		} else if (streq(job, "tx") || streq(job, "rx")) {
			if (!have_net)
				report_error(job, "no-iobench_net", 0);
			else
				net_job(job, &sa, job[0] == 't', dur_ms);
		} else {
			report_error(job, "unknown-job", 0);
		}
	}
	if (blk_fd >= 0)
		sys3(SYS_close, blk_fd, 0, 0);
	finish();
	for (;;)
		;
}
