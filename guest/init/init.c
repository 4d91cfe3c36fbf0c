/*
 * keel-init: the tiny static 32-bit /init of Keel's test initramfs.
 *
 * Freestanding (no libc), i386, system calls through `int $0x80` only, no
 * x87/MMX/SSE instructions: this is the kind of user space that runs on PVM
 * (see guest/README.md).  Behaviour:
 *
 *   1. mounts proc on /proc, sysfs on /sys and devtmpfs on /dev;
 *   2. prints "KEEL-INIT-OK" on its own line to stdout (/dev/console);
 *   3. prints "keel-init: cpus=N mem_kib=M" (N: sched_getaffinity of init,
 *      M: MemTotal from /proc/meminfo);
 *   4. makes 1000 getpid() calls and checks they all return 1;
 *   5. acts on the environment variable keel_exit (an unknown, undotted
 *      kernel parameter `keel_exit=...` reaches init's envp):
 *        poweroff (default) -> reboot(LINUX_REBOOT_CMD_POWER_OFF)
 *        reboot             -> reboot(LINUX_REBOOT_CMD_RESTART)
 *        halt               -> reboot(LINUX_REBOOT_CMD_HALT)
 *        panic              -> exit(1): the kernel panics ("Attempted to
 *                              kill init!"), with panic=-1 it reboots at once
 *      after printing "keel-init: exit=<mode>".
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
#define SYS_sched_getaffinity 242

#define O_RDONLY 0
#define O_WRONLY 1
#define TCSBRK 0x5409 /* with arg 1: tcdrain() */

#define LINUX_REBOOT_MAGIC1 0xfee1deadU
#define LINUX_REBOOT_MAGIC2 672274793U
#define LINUX_REBOOT_CMD_RESTART 0x01234567U
#define LINUX_REBOOT_CMD_HALT 0xCDEF0123U
#define LINUX_REBOOT_CMD_POWER_OFF 0x4321FEDCU

typedef unsigned int u32;

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
	if (r < 0) {
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

static long mem_total_kib(void)
{
	static char buf[4096];
	long fd, n, total = 0, got = 0;
	char *p;

	fd = sys3(SYS_open, (long)"/proc/meminfo", O_RDONLY, 0);
	if (fd < 0)
		return fd;
	while (got < (long)sizeof(buf) - 1) {
		n = sys3(SYS_read, fd, (long)(buf + got), sizeof(buf) - 1 - got);
		if (n <= 0)
			break;
		got += n;
	}
	sys3(SYS_close, fd, 0, 0);
	buf[got] = 0;
	for (p = buf; *p; p++) {
		if ((p == buf || p[-1] == '\n') && starts_with(p, "MemTotal:")) {
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

__attribute__((used, noreturn)) void keel_main(long *sp)
{
	long argc = sp[0];
	char **envp = (char **)(sp + 1 + argc + 1);
	const char *mode = "poweroff";
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

	for (i = 0; envp[i]; i++)
		if (starts_with(envp[i], "keel_exit="))
			mode = envp[i] + 10;

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
