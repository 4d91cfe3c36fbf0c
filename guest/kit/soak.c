/*
 * test=blk-soak: a well-behaved workload for the chaos test's "normal" VM. For `secs`
 * seconds it writes runs of sectors with patterns unique to (sector, generation), reads
 * random runs back and checks them against its own record, flushes now and then; at the
 * end it reads the whole disk once more and prints a hash of it, which the host checks
 * against the image file.
 */
#include "kit.h"
#include "chaos.h"
#include "virtio_dev.h"

#define SOAK_MAX_SECTORS 2048           /* 1 MiB: the test gives a disk of exactly this */
#define RUN 8                           /* sectors per request at most: the 4 KiB buffer */

static u16 gen_of[SOAK_MAX_SECTORS];    /* generation last written to each sector (0: zeros) */

/* Word `w` of sector `s` as generation `g` wrote it. */
static u64 pattern(u64 s, u16 g, u32 w) {
    if (!g) return 0;
    u64 x = s * 0x9e3779b97f4a7c15ULL ^ (u64)g << 40 ^ w;
    x ^= x >> 31;
    x *= 0x7fb5d329728ea185ULL;
    x ^= x >> 27;
    return x;
}

/* Reads `n` sectors from `s` and checks them; folds them into `*hash` when it is set. */
static int read_check(struct vdev *d, u64 s, u32 n, u64 *hash) {
    volatile u64 *data = (volatile u64 *)blk_data(d);
    u8 st = 0xff;
    u32 len = 0;
    int r = blk_request(d, T_IN, s, (u64)data, n * 512, 1, &st, &len);
    if (r != W_USED || st != ST_OK || len != n * 512 + 1) {
        puts("KIT: soak read of "); putdec(n); puts(" sectors at "); putdec(s); puts(": r=");
        putdec(r); puts(" status="); putdec(st); puts(" len="); putdec(len); puts("\n");
        fail("a read did not complete with OK");
        return 0;
    }
    for (u32 i = 0; i < n; i++)
        for (u32 w = 0; w < 64; w++) {
            u64 v = data[i * 64 + w];
            if (v != pattern(s + i, gen_of[s + i], w)) {
                puts("KIT: soak sector "); putdec(s + i); puts(" word "); putdec(w); puts(" is ");
                puthex(v); puts(" instead of generation "); putdec(gen_of[s + i]); puts("\n");
                fail("a sector does not hold what was last written to it");
                return 0;
            }
            if (hash) *hash = (*hash ^ v) * 0x100000001b3ULL;
        }
    return 1;
}

void test_blk_soak(struct boot *b) {
    u64 secs = parse_dec(param(b->cmdline, "secs"));
    prng ^= parse_dec(param(b->cmdline, "seed")) * 0x2545f4914f6cdd1dULL;
    if (!prng) prng = 1;
    struct vdev d;
    if (!find_device(DEV_BLK, 0, &d, 0)) { fail("no usable virtio-blk device"); return; }
    irq_setup();
    int clock = clock_init();
    if (!vdev_init(&d, wanted_features(&d))) return;
    u64 sectors = mmio_read32(d.devcfg) | (u64)mmio_read32(d.devcfg + 4) << 32;
    if (sectors < RUN || sectors > SOAK_MAX_SECTORS || sectors % RUN) {
        fail("the disk must hold a multiple of 8 sectors, 8 to 2048");
        return;
    }
    puts("KIT: soak "); putdec(sectors); puts(" sectors for "); putdec(secs); puts(" s\n");
    volatile u64 *data = (volatile u64 *)blk_data(&d);
    u64 writes = 0, reads = 0, flushes = 0, next_report = 5000;
    u16 gen = 0;
    /* Without a clock, a bound by count: a few hundred operations a second at best here. */
    for (u64 op = 0; clock ? clock_ms() < secs * 1000 : op < secs * 100; op++) {
        u32 n = 1 + (u32)(rnd() % RUN);
        u64 s = rnd() % (sectors - n + 1);
        if (++gen == 0) gen = 1;
        for (u32 i = 0; i < n; i++)
            for (u32 w = 0; w < 64; w++) data[i * 64 + w] = pattern(s + i, gen, w);
        u8 st = 0xff;
        u32 len = 0;
        if (blk_request(&d, T_OUT, s, (u64)data, n * 512, 0, &st, &len) != W_USED || st != ST_OK) {
            fail("a write did not complete with OK");
            return;
        }
        for (u32 i = 0; i < n; i++) gen_of[s + i] = gen;
        writes++;
        if (op % 4 == 3) {
            if (blk_request(&d, T_FLUSH, 0, 0, 0, 0, &st, &len) != W_USED || st != ST_OK) {
                fail("a flush did not complete with OK");
                return;
            }
            flushes++;
        }
        /* The run just written, then a random one (older generations, or zeros). */
        if (!read_check(&d, s, n, 0)) return;
        u32 m = 1 + (u32)(rnd() % RUN);
        if (!read_check(&d, rnd() % (sectors - m + 1), m, 0)) return;
        reads += 2;
        if (clock && clock_ms() >= next_report) {
            puts("KIT: soak t="); putdec(clock_ms() / 1000); puts(" s writes="); putdec(writes);
            puts(" reads="); putdec(reads); puts(" flushes="); putdec(flushes); puts("\n");
            next_report += 5000;
        }
    }
    u8 st = 0xff;
    u32 len = 0;
    check(blk_request(&d, T_FLUSH, 0, 0, 0, 0, &st, &len) == W_USED && st == ST_OK, "the final flush failed");
    u64 hash = 0xcbf29ce484222325ULL;
    for (u64 s = 0; s < sectors; s += RUN)
        if (!read_check(&d, s, RUN, &hash)) return;
    puts("KIT: soak done writes="); putdec(writes); puts(" reads="); putdec(reads);
    puts(" flushes="); putdec(flushes); puts(" hash="); puthex(hash); puts("\n");
    check(writes > 0, "no write completed");
    status_set(&d, 0);
}
