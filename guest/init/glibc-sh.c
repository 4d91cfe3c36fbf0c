/*
 * keel-sh: the "#!" interpreter of the busybox initramfs's /init script.
 *
 * Debian's busybox-static is linked with glibc.  On PVM, user-mode code sees
 * the host's CPUID, but user-mode SSE/x87 instructions fault, so glibc has to
 * be told not to pick its SSE string functions.  That needs GLIBC_TUNABLES
 * in the environment of the very first busybox process, and nothing can set
 * it before that process starts except the kernel command line or a program
 * like this one.
 *
 * The kernel runs "/bin/keel-sh /init [args]" for "#!/bin/keel-sh".  This
 * program execs "/bin/busybox sh /init [args]" with GLIBC_TUNABLES added to
 * the environment, unless the environment already has it.  Same build rules
 * as init.c: freestanding i386, int $0x80 only.
 */

#define SYS_exit 1
#define SYS_write 4
#define SYS_execve 11

#define TUNABLES "GLIBC_TUNABLES=glibc.cpu.hwcaps=-SSE2,-SSSE3,-SSE4_1,-SSE4_2,-AVX,-AVX2"
#define MAX_ARGS 64
#define MAX_ENV 128

__asm__(".text\n"
	".globl _start\n"
	"_start:\n"
	"	xorl %ebp, %ebp\n"
	"	movl %esp, %eax\n"
	"	andl $-16, %esp\n"
	"	subl $12, %esp\n"
	"	pushl %eax\n"
	"	call keel_sh_main\n"
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

static int starts_with(const char *s, const char *prefix)
{
	while (*prefix)
		if (*s++ != *prefix++)
			return 0;
	return 1;
}

static __attribute__((noreturn)) void fail(const char *msg, unsigned len)
{
	sys3(SYS_write, 2, (long)msg, len);
	sys3(SYS_exit, 127, 0, 0);
	for (;;)
		;
}

__attribute__((used, noreturn)) void keel_sh_main(long *sp)
{
	long argc = sp[0];
	char **argv = (char **)(sp + 1);
	char **envp = argv + argc + 1;
	char *nargv[MAX_ARGS + 2];
	char *nenv[MAX_ENV + 2];
	long i, n = 0, have = 0;

	/* argv: [/bin/keel-sh, /init, args...] -> [sh, /init, args...] */
	nargv[0] = "sh";
	for (i = 1; i < argc && i <= MAX_ARGS; i++)
		nargv[i] = argv[i];
	nargv[i] = 0;

	for (i = 0; envp[i] && n < MAX_ENV; i++) {
		if (starts_with(envp[i], "GLIBC_TUNABLES="))
			have = 1;
		nenv[n++] = envp[i];
	}
	if (!have)
		nenv[n++] = TUNABLES;
	nenv[n] = 0;

	sys3(SYS_execve, (long)"/bin/busybox", (long)nargv, (long)nenv);
	fail("keel-sh: cannot exec /bin/busybox\n", 35);
}
