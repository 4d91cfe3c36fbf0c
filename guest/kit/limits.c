/*
 * Resource-limit tests: a guest that keeps every vCPU busy (spin), a fixed CPU-bound job whose
 * wall time the host measures (cpu-job), and a guest that touches all of its RAM (touch-ram).
 * The host side (crates/keel/tests/limits.rs) puts these VMs under cgroup limits and checks
 * what the kernel enforces.
 */

#include "kit.h"
#include "limits.h"

/* Where the APs' code and counters live (one page below Keel's boot page tables; the smp test
   uses the same page, but never in the same VM run). */
#define SPIN_BASE 0x8000
#define SPIN_COUNT (SPIN_BASE + 0x100)  /* APs that started */
#define SPIN_STOP (SPIN_BASE + 0x104)   /* set by the BSP: APs halt */
#define SPIN_WORK (SPIN_BASE + 0x200)   /* one u32 loop counter per APIC ID (256 of them) */
#define SPIN_VECTOR 0x42
/* KVM's LAPIC timer runs at 1 GHz with divide-by-1: 100 ms is 10^8 ticks. */
#define TICK_NS 100000000u

/*
 * The AP side, copied to SPIN_BASE and entered in real mode after SIPI (CS = SPIN_BASE >> 4):
 * count itself in, then loop incrementing its own counter until the BSP sets SPIN_STOP.
 */
extern char spin_trampoline[], spin_trampoline_end[];
__asm__(
    ".pushsection .text\n"
    ".code16\n"
    ".globl spin_trampoline, spin_trampoline_end\n"
    "spin_trampoline:\n"
    "    cli\n"
    "    xor %ax, %ax\n"
    "    mov %ax, %ds\n"
    "    mov $1, %eax\n"
    "    cpuid\n"
    "    shr $24, %ebx\n"
    "    shl $2, %bx\n"
    "    lock incl 0x8100\n"            /* SPIN_COUNT */
    "1:  incl 0x8200(%bx)\n"            /* SPIN_WORK[apic id] */
    "    cmpl $0, 0x8104\n"             /* SPIN_STOP */
    "    je 1b\n"
    "2:  cli\n"
    "    hlt\n"
    "    jmp 2b\n"
    "spin_trampoline_end:\n"
    ".code64\n"
    ".popsection\n");

static void icr(u32 low) {
    mmio_write32(LAPIC + 0x310, 0);
    mmio_write32(LAPIC + 0x300, low);
    for (int i = 0; i < 1000 && (mmio_read32(LAPIC + 0x300) & (1 << 12)); i++)
        ;
}

/* One step of the hash both the spin loop and the job use (a 64-bit finaliser). */
static inline u64 mix(u64 h, u64 i) {
    h ^= i;
    h *= 0xff51afd7ed558ccdULL;
    return h ^ (h >> 33);
}

void test_spin(struct boot *b) {
    u64 secs = parse_dec(param(b->cmdline, "secs"));
    if (!secs) secs = 5;
    u64 want_aps = parse_dec(param(b->cmdline, "cpus"));
    want_aps = want_aps ? want_aps - 1 : 0;
    volatile u32 *count = (volatile u32 *)SPIN_COUNT, *stop = (volatile u32 *)SPIN_STOP;
    volatile u32 *work = (volatile u32 *)SPIN_WORK;
    *count = 0;
    *stop = 0;
    for (int i = 0; i < 256; i++) work[i] = 0;
    for (char *s = spin_trampoline, *d = (char *)SPIN_BASE; s < spin_trampoline_end; s++, d++) *d = *s;
    /* INIT, then SIPI twice, to every CPU but this one. */
    icr(0x000c4500);
    icr(0x000c4600 | (SPIN_BASE >> 12));
    icr(0x000c4600 | (SPIN_BASE >> 12));
    for (u64 i = 0; i < 100000000ULL && *count < want_aps; i++)
        __asm__ volatile("pause");
    puts("KIT: spinning on "); putdec(*count + 1); puts(" vCPUs for "); putdec(secs); puts(" s\n");
    check(*count >= want_aps, "not every AP started");

    idt_install_all();
    lapic_enable();
    mmio_write32(LAPIC + 0x320, SPIN_VECTOR | (1 << 17)); /* periodic */
    mmio_write32(LAPIC + 0x380, TICK_NS);
    u64 h = 1, loops = 0;
    __asm__ volatile("sti");
    while (irq_count[SPIN_VECTOR] < secs * 10) {
        h = mix(h, loops);
        loops++;
    }
    __asm__ volatile("cli");
    mmio_write32(LAPIC + 0x380, 0);
    *stop = 1;
    u64 ap_loops = 0;
    for (int i = 0; i < 256; i++) ap_loops += work[i];
    puts("KIT: spin done bsp loops="); putdec(loops); puts(" ap loops="); putdec(ap_loops);
    puts(" hash="); puthex(h); puts("\n");
    check(loops > 0, "the BSP did not loop");
    check(*count == 0 || ap_loops > 0, "the APs did not loop");
}

void test_cpu_job(struct boot *b) {
    u64 iters = parse_dec(param(b->cmdline, "iters"));
    if (!iters) iters = 1000000;
    puts("KIT: job start\n");
    u64 h = 0x9e3779b97f4a7c15ULL;
    for (u64 i = 0; i < iters; i++) h = mix(h, i);
    puts("KIT: job done iters="); putdec(iters); puts(" checksum="); puthex(h); puts("\n");
}

/* Below 2 MiB: the boot data (zero page, PVH info, page tables, command line, ACPI tables) and
   the kit itself (linked at 1 MiB); everything from here to the top of RAM is free. */
#define TOUCH_FLOOR 0x200000ULL

static inline u64 pattern(u64 addr) { return (addr * 0x9e3779b97f4a7c15ULL) ^ 0x5a5a5a5a5a5a5a5aULL; }

/* Pages from `from` to `to` (every `step`th) that do not hold their pattern. */
static u64 bad_pages(u64 from, u64 to, u64 step) {
    u64 bad = 0;
    for (u64 a = from; a < to; a += 4096 * step)
        if (*(volatile u64 *)a != pattern(a)) bad++;
    return bad;
}

static int kit_end_marker;

void test_touch_ram(struct boot *b) {
    u64 top = b->ram_top & ~0xfffULL;
    check((u64)&kit_end_marker < TOUCH_FLOOR, "the kit reaches above 2 MiB: move TOUCH_FLOOR");
    if (top <= TOUCH_FLOOR) { fail("no RAM above 2 MiB"); return; }
    /* RAM the map has that this test does not reach: below 2 MiB, or above 4 GiB (not in the
       kit's identity map). */
    u64 untouched = b->ram - (top - TOUCH_FLOOR);
    puts("KIT: touching "); putdec((top - TOUCH_FLOOR) >> 20); puts(" MiB of "); putdec(b->ram >> 20);
    puts(" MiB RAM\n");
    check(untouched <= TOUCH_FLOOR, "RAM beyond what the kit can reach (above 4 GiB?)");
    u64 pages = 0;
    for (u64 a = TOUCH_FLOOR; a < top; a += 4096) {
        *(volatile u64 *)a = pattern(a);
        pages++;
    }
    puts("KIT: touched "); putdec(pages); puts(" pages\n");
    check(bad_pages(TOUCH_FLOOR, top, 7) == 0, "a sampled page lost its pattern");
    check(*(volatile u64 *)(top - 4096) == pattern(top - 4096), "the last page lost its pattern");
    u64 hold = parse_dec(param(b->cmdline, "hold"));
    if (hold) {
        idt_install_all();
        lapic_enable();
        for (u64 i = 0; i < hold * 10; i++) sleep_until_irq(100000);
        u64 bad = bad_pages(TOUCH_FLOOR, top, 1);
        puts("KIT: after "); putdec(hold); puts(" s every page rechecked, bad="); putdec(bad); puts("\n");
        check(bad == 0, "pages lost their pattern while the VM was held");
    }
}

void test_ticks(struct boot *b) {
    (void)b;
    u64 secs = parse_dec(param(b->cmdline, "secs"));
    if (!secs) secs = 5;
    idt_install_all();
    lapic_enable();
    mmio_write32(LAPIC + 0x320, SPIN_VECTOR | (1 << 17)); /* periodic, ~10 Hz */
    mmio_write32(LAPIC + 0x380, TICK_NS);
    u32 seen = 0;
    while (seen < secs * 10) {
        __asm__ volatile("sti; hlt; cli");
        while (seen < irq_count[SPIN_VECTOR]) {
            seen++;
            puts("KIT: tick "); putdec(seen); puts("\n");
        }
    }
    mmio_write32(LAPIC + 0x380, 0);
}
