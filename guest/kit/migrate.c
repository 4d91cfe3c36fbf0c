/*
 * test=migrate [fill=F] [dirty=N] [span=M] [secs=S]: a guest for live-migration tests that
 * measures its own pause. With fill=F it first writes every page of F MiB above 4 MiB once
 * (so a migration has that much memory to move: an idle guest that has used its RAM). A periodic LAPIC timer wakes it every millisecond; at each wake it reads the
 * TSC, stores it in a ring of timestamps in its RAM and keeps the largest gap between two
 * wakes. With dirty=N it also writes N MiB of its RAM a second: one u64 (the TSC) into each
 * of the next pages of an M MiB span above 4 MiB (default 256), round and round, spread over
 * the ticks. On COM1:
 *
 *   KIT: migrate start tsc_khz=<k> fill=<F> dirty=<N> span=<M>
 *   KIT: gap second=<s> max_us=<largest gap that second> all_max_us=<largest yet> ticks=<t>
 *
 * one gap line a second (of TSC time), the TSC rate measured against the LAPIC timer (1 GHz
 * on KVM) over 100 ms first. A guest that was paused sees the pause as one long gap. It stops
 * after S seconds (0, the default: runs until the VM is killed), then passes and powers off.
 */
#include "kit.h"

#define GAP_VECTOR 0x44
#define CAL_VECTOR 0x45
#define TICK_NS 1000000u                /* 1 ms at the LAPIC timer's 1 GHz */
#define RING 4096                       /* timestamps kept: the last ~4 s */
#define SPAN_BASE 0x400000ULL           /* 4 MiB: above the kit and its stack */

static volatile u64 stamps[RING];

static inline u64 rdtsc(void) { u32 lo, hi; __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi)); return (u64)hi << 32 | lo; }

/* TSC ticks per millisecond, against a 100 ms one-shot LAPIC timer. */
static u64 tsc_khz(void) {
    mmio_write32(LAPIC + 0x320, CAL_VECTOR);   /* one-shot */
    u32 seen = irq_count[CAL_VECTOR];
    u64 t0 = rdtsc();
    mmio_write32(LAPIC + 0x380, 100u * TICK_NS);
    while (irq_count[CAL_VECTOR] == seen) __asm__ volatile("sti; hlt; cli" : : : "memory");
    return (rdtsc() - t0) / 100;
}

void test_migrate(struct boot *b) {
    u64 dirty = parse_dec(param(b->cmdline, "dirty"));
    const char *sp = param(b->cmdline, "span");
    u64 span = sp ? parse_dec(sp) : 256;
    u64 secs = parse_dec(param(b->cmdline, "secs"));
    u64 fill = parse_dec(param(b->cmdline, "fill"));
    u64 span_pages = (span << 20) / 4096;
    u64 top = b->ram_top & ~0xfffULL;
    if (dirty && (span_pages == 0 || SPAN_BASE + (span << 20) > top)) {
        fail("span= does not fit in RAM above 4 MiB");
        return;
    }
    if (SPAN_BASE + (fill << 20) > top) { fail("fill= does not fit in RAM above 4 MiB"); return; }
    for (u64 a = SPAN_BASE; a < SPAN_BASE + (fill << 20); a += 4096)
        mmio_write64(a, a * 0x9e3779b97f4a7c15ULL | 1);
    idt_install_all();
    lapic_enable();
    u64 khz = tsc_khz();
    if (!khz) { fail("the TSC does not count"); return; }
    puts("KIT: migrate start tsc_khz="); putdec(khz); puts(" fill="); putdec(fill);
    puts(" dirty="); putdec(dirty);
    puts(" span="); putdec(span); puts("\n");
    mmio_write32(LAPIC + 0x320, GAP_VECTOR | (1 << 17)); /* periodic */
    mmio_write32(LAPIC + 0x380, TICK_NS);
    u32 seen = irq_count[GAP_VECTOR];
    u64 last = rdtsc(), window = last, max_gap = 0, all_max = 0, ticks = 0, second = 0;
    u64 n = 0, page = 0, credit = 0;
    while (secs == 0 || second < secs) {
        while (irq_count[GAP_VECTOR] == seen) __asm__ volatile("sti; hlt; cli" : : : "memory");
        seen = irq_count[GAP_VECTOR];
        u64 t = rdtsc();
        u64 gap = t - last;
        last = t;
        stamps[n++ % RING] = t;
        ticks++;
        if (gap > max_gap) max_gap = gap;
        /* dirty MiB/s is dirty * 256 pages a second: that much credit per second of ticks. */
        credit += dirty * 256;
        while (credit >= 1000) {
            credit -= 1000;
            mmio_write64(SPAN_BASE + page * 4096 + (n % 512) * 8, t);
            page = page + 1 == span_pages ? 0 : page + 1;
        }
        if (t - window >= khz * 1000) {
            u64 us = max_gap * 1000 / khz;
            if (us > all_max) all_max = us;
            second++;
            puts("KIT: gap second="); putdec(second); puts(" max_us="); putdec(us);
            puts(" all_max_us="); putdec(all_max); puts(" ticks="); putdec(ticks); puts("\n");
            window = t;
            max_gap = 0;
            ticks = 0;
        }
    }
    mmio_write32(LAPIC + 0x380, 0);
}
