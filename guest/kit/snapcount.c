/*
 * test=snapcount [secs=N] [slots=N]: a guest for snapshot/restore tests. At ~10 Hz (a periodic
 * LAPIC timer, halted in between) it counts, and for each count writes one sector of its first
 * virtio-blk disk, waits for the write to complete, and says so on COM1:
 *
 *   KIT: snapcount start slots=<slots> secs=<secs>
 *   KIT: count=<n> tsc=<t>          exactly one per completed write, n = 1, 2, 3, ...
 *
 * Count n goes to sector n % slots (slots default 128, at least 2, at most the disk): 512
 * bytes of "KEELSNAP", n (u64 LE), the TSC read at that tick (u64 LE), then words 3..63 =
 * n * 0x9e3779b97f4a7c15 + w (u64 LE; crates/guest-kit/src/snapcount.rs computes the same).
 * Every tick it also reads back the sector of count n-1 and checks it holds exactly what was
 * written (a lost write fails), and checks the TSC moved forward since the tick before (a
 * clock that went back fails).
 *
 * The counter and everything it checks against live in guest RAM only, so a guest restored
 * from a snapshot continues from its memory, not from its disk. It stops after count
 * secs * 10 (its own ticks: time the VM spent paused or not running does not count), then
 * passes and powers off as usual; secs=0 (the default) runs until the VM is killed.
 */
#include "kit.h"
#include "virtio.h"
#include "virtio_dev.h"

#define TICK_VECTOR 0x43
#define TICK_NS 100000000u              /* KVM's LAPIC timer: 1 GHz at divide-by-1 */
#define WAIT_TICKS 30                   /* a request not done within ~3 s has failed */
#define SECTOR_WORDS 64

/* The guest's whole state: in RAM, never read back from the disk. */
static u64 count, last_tsc, slots;
static u32 seen_ticks;

static inline u64 rdtsc(void) { u32 lo, hi; __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi)); return (u64)hi << 32 | lo; }

/* Word `w` (3..63) of the sector of count `n`. */
static u64 fill_word(u64 n, u32 w) { return n * 0x9e3779b97f4a7c15ULL + w; }

/* "KEELSNAP" as a little-endian u64. */
#define MAGIC 0x50414e534c45454bULL

/* One request (header, 512 bytes of data, status) with the periodic tick as its timeout:
   the timer is never reprogrammed, so the 10 Hz cadence holds. 1 on OK. */
static int sector_io(struct vdev *d, u32 type, u64 sector, volatile u64 *data) {
    volatile struct blk_hdr *h = (volatile struct blk_hdr *)d->buf;
    volatile u8 *st = d->buf + 16;
    h->type = type;
    h->reserved = 0;
    h->sector = sector;
    *st = 0xee;
    set_desc(d, 0, (u64)h, 16, D_NEXT, 1);
    set_desc(d, 1, (u64)data, 512, D_NEXT | (type == T_IN ? D_WRITE : 0), 2);
    set_desc(d, 2, (u64)st, 1, D_WRITE, 0);
    struct vq *q = &d->q;
    vq_post(d, 0);
    u32 start = irq_count[TICK_VECTOR];
    while (q->used[1] == q->last_used) {
        if (status_get(d) & S_NEEDS_RESET) { fail("the disk needs a reset"); return 0; }
        if (irq_count[TICK_VECTOR] - start > WAIT_TICKS) { fail("a disk request did not complete within 3 s"); return 0; }
        __asm__ volatile("sti; hlt; cli" : : : "memory");
    }
    mb();
    volatile struct used_elem *e = (volatile struct used_elem *)(q->used + 2) + q->last_used % q->size;
    u32 id = e->id, len = e->len;
    q->last_used++;
    u32 want_len = type == T_IN ? 513 : 1;
    if (id != 0 || *st != ST_OK || len != want_len) {
        puts("KIT: snapcount request type="); putdec(type); puts(" sector="); putdec(sector);
        puts(" id="); putdec(id); puts(" status="); putdec(*st); puts(" len="); putdec(len); puts("\n");
        fail("a disk request did not complete with OK");
        return 0;
    }
    return 1;
}

/* The sector of count `n`, written at TSC `tsc`, still holds exactly that. */
static int check_sector(volatile u64 *data, u64 n, u64 tsc) {
    u64 sector = n % slots;
    const char *why = 0;
    u32 bad = 0;
    if (data[0] != MAGIC) why = "magic";
    else if (data[1] != n) why = "count";
    else if (data[2] != tsc) why = "tsc";
    else
        for (u32 w = 3; w < SECTOR_WORDS && !why; w++)
            if (data[w] != fill_word(n, w)) { why = "pattern"; bad = w; }
    if (!why) return 1;
    puts("KIT: snapcount lost write: sector "); putdec(sector); puts(" should hold count "); putdec(n);
    puts(" but its "); puts(why); if (bad) { puts(" word "); putdec(bad); }
    puts(" differs (magic="); puthex(data[0]); puts(" count="); putdec(data[1]); puts(" tsc=");
    putdec(data[2]); puts(")\n");
    fail("lost write: a sector written the tick before does not hold its count");
    return 0;
}

void test_snapcount(struct boot *b) {
    u64 secs = parse_dec(param(b->cmdline, "secs"));
    const char *sp = param(b->cmdline, "slots");
    slots = sp ? parse_dec(sp) : 128;
    struct vdev d;
    if (!find_device(DEV_BLK, 0, &d, 0)) { fail("no usable virtio-blk device"); return; }
    irq_setup();
    if (!vdev_init(&d, wanted_features(&d))) return;
    u64 sectors = mmio_read32(d.devcfg) | (u64)mmio_read32(d.devcfg + 4) << 32;
    if (slots < 2 || slots > sectors) { fail("slots= must be 2 up to the disk's sector count"); return; }
    volatile u64 *wr = (volatile u64 *)blk_data(&d);
    volatile u64 *rd = wr + SECTOR_WORDS;
    puts("KIT: snapcount start slots="); putdec(slots); puts(" secs="); putdec(secs); puts("\n");
    count = 0;
    last_tsc = 0;
    seen_ticks = irq_count[TICK_VECTOR];
    mmio_write32(LAPIC + 0x320, TICK_VECTOR | (1 << 17)); /* periodic */
    mmio_write32(LAPIC + 0x380, TICK_NS);
    while (secs == 0 || count < secs * 10) {
        while (irq_count[TICK_VECTOR] == seen_ticks) __asm__ volatile("sti; hlt; cli" : : : "memory");
        seen_ticks = irq_count[TICK_VECTOR];   /* ticks missed while busy are not made up */
        u64 t = rdtsc();
        if (count && t <= last_tsc) {
            puts("KIT: snapcount clock went back: tsc="); putdec(t); puts(" after "); putdec(last_tsc); puts("\n");
            fail("clock went back");
            break;
        }
        u64 n = count + 1;
        wr[0] = MAGIC;
        wr[1] = n;
        wr[2] = t;
        for (u32 w = 3; w < SECTOR_WORDS; w++) wr[w] = fill_word(n, w);
        if (!sector_io(&d, T_OUT, n % slots, wr)) break;
        count = n;
        puts("KIT: count="); putdec(n); puts(" tsc="); putdec(t); puts("\n");
        if (n > 1) {
            zero(rd, 512);
            if (!sector_io(&d, T_IN, (n - 1) % slots, rd) || !check_sector(rd, n - 1, last_tsc)) break;
        }
        last_tsc = t;
    }
    mmio_write32(LAPIC + 0x380, 0);
    puts("KIT: snapcount done count="); putdec(count); puts("\n");
    status_set(&d, 0);
}
