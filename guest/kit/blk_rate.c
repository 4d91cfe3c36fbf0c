/*
 * test=blk-read-rate: reads the whole first virtio-blk disk as fast as the device lets it, in
 * `req=` KiB requests (default 64) with up to SLOTS in flight, and brackets the reads with
 * markers on COM1 so the host can time them against a configured rate limit:
 *
 *   KIT: blk-read-rate start bytes=<disk size> req=<bytes>
 *   KIT: blk-read-rate end requests=<n>
 *
 * Every request must complete with OK, and the first bytes of each must match the host's
 * pattern (so the reads are real). No timeout on a single request (a limited device makes the
 * guest wait): only 30 s without any progress is a failure.
 */
#include "kit.h"
#include "virtio.h"
#include "virtio_dev.h"

/* Requests in flight: 3 descriptors each in the kit's 16-entry queue. */
#define SLOTS 4
#define MAX_REQ (128u << 10)

static u8 data[SLOTS][MAX_REQ] __attribute__((aligned(4096)));

/* Byte `i` of the test disk the host creates (as in virtio.c). */
static u8 pattern(u64 i) { return (u8)((i >> 9) * 31 + i * 7 + 3); }

struct slot { u64 offset; int busy; };

static void post_read(struct vdev *d, int s, u64 offset, u32 len) {
    volatile struct blk_hdr *h = (volatile struct blk_hdr *)(d->buf + 32 * s);
    volatile u8 *st = d->buf + 32 * s + 16;
    h->type = T_IN;
    h->reserved = 0;
    h->sector = offset / 512;
    *st = 0xee;
    u16 first = (u16)(3 * s);
    set_desc(d, first, (u64)h, 16, D_NEXT, first + 1);
    set_desc(d, first + 1, (u64)data[s], len, D_NEXT | D_WRITE, first + 2);
    set_desc(d, first + 2, (u64)st, 1, D_WRITE, 0);
    vq_post(d, first);
}

void test_blk_read_rate(struct boot *b) {
    struct vdev d;
    if (!find_device(DEV_BLK, 0, &d, 0)) { fail("no usable virtio-blk device"); return; }
    irq_setup();
    if (!vdev_init(&d, wanted_features(&d))) return;
    u64 size = (mmio_read32(d.devcfg) | (u64)mmio_read32(d.devcfg + 4) << 32) * 512;
    const char *req_param = param(b->cmdline, "req");
    u32 req = req_param ? (u32)parse_dec(req_param) << 10 : 64u << 10;
    if (req == 0 || req > MAX_REQ || req % 512) { fail("req= must be 1..128 (KiB)"); return; }
    if (size == 0 || size % req) { fail("the disk size is not a multiple of req="); return; }
    struct slot slots[SLOTS] = {{0, 0}};
    u64 next = 0, done = 0, requests = 0;
    puts("KIT: blk-read-rate start bytes="); putdec(size); puts(" req="); putdec(req); puts("\n");
    for (int s = 0; s < SLOTS && next < size; s++) {
        slots[s].offset = next;
        slots[s].busy = 1;
        post_read(&d, s, next, req);
        next += req;
    }
    struct vq *q = &d.q;
    int idle_ms = 0;
    while (done < size) {
        if (q->used[1] == q->last_used) {
            if (status_get(&d) & S_NEEDS_RESET) { fail("the device needs a reset"); return; }
            if (++idle_ms > 30000) { fail("no read completed for 30 s"); return; }
            sleep_until_irq(1000);
            continue;
        }
        idle_ms = 0;
        mb();
        volatile struct used_elem *e = (volatile struct used_elem *)(q->used + 2) + q->last_used % q->size;
        u32 id = e->id, len = e->len;
        q->last_used++;
        int s = (int)(id / 3);
        if (id % 3 || s >= SLOTS || !slots[s].busy) { fail("a used element names no request in flight"); return; }
        volatile u8 *st = d.buf + 32 * s + 16;
        if (*st != ST_OK || len != req + 1) { fail("a read did not complete with OK and req+1 bytes"); return; }
        for (u32 j = 0; j < 16; j++)
            if (data[s][j] != pattern(slots[s].offset + j)) { fail("read data differs from the host's pattern"); return; }
        done += req;
        requests++;
        slots[s].busy = 0;
        if (next < size) {
            slots[s].offset = next;
            slots[s].busy = 1;
            post_read(&d, s, next, req);
            next += req;
        }
    }
    puts("KIT: blk-read-rate end requests="); putdec(requests); puts("\n");
    status_set(&d, 0);
}
