/*
 * A minimal virtio 1.x PCI driver for the kit, and the tests that use it.
 *
 * Keel's transport (crates/virtio/src/pci.rs): one 32-bit memory BAR 0 of 0x8000 bytes with the
 * common configuration at 0x0, ISR at 0x1000, device configuration at 0x2000, notifications at
 * 0x3000 (multiplier 4), the MSI-X table at 0x4000 and its PBA at 0x6000; capabilities MSI-X,
 * then virtio types 1, 3, 4, 2 and 5. Configuration space is reached through ECAM (bus 0 at
 * 0xe0000000) and, for cross-checks, through ports 0xCF8/0xCFC.
 *
 * The driver keeps one split virtqueue of QSIZE entries per device in a page of kit memory
 * (descriptors at +0, available ring at +0x400, used ring at +0x800) and routes MSI-X entry 0
 * (configuration changes) and entry 1 (queue 0) to IDT vectors on this CPU.
 */
#include "kit.h"
#include "virtio.h"

#define ECAM_BASE 0xe0000000ULL
#define ECAM_BUS_SIZE 0x100000ULL
#define PCI_MMIO_START 0xc0000000ULL
#define PCI_MMIO_END 0xe0000000ULL
#define VIRTIO_VENDOR 0x1af4
#define VIRTIO_DEVICE_BASE 0x1040
#define DEV_BLK 0x1042
#define DEV_RNG 0x1044
#define BAR_SIZE 0x8000ULL

/* Common configuration registers (virtio 1.2 §4.1.4.3). */
#define C_DFSELECT 0x00
#define C_DF 0x04
#define C_GFSELECT 0x08
#define C_GF 0x0c
#define C_MSIX 0x10
#define C_NUMQ 0x12
#define C_STATUS 0x14
#define C_QSELECT 0x16
#define C_QSIZE 0x18
#define C_QMSIX 0x1a
#define C_QENABLE 0x1c
#define C_QNOTIFYOFF 0x1e
#define C_QDESC 0x20
#define C_QAVAIL 0x28
#define C_QUSED 0x30
#define COMMON_LEN 0x38

#define S_ACK 1
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FEATURES_OK 8
#define S_NEEDS_RESET 0x40
#define S_READY (S_ACK | S_DRIVER | S_FEATURES_OK)

#define F_VERSION_1 (1ULL << 32)
#define F_INDIRECT (1ULL << 28)
#define F_BLK_SIZE (1ULL << 6)
#define F_BLK_FLUSH (1ULL << 9)

#define D_NEXT 1
#define D_WRITE 2
#define D_INDIRECT 4

#define NO_VECTOR 0xffff
#define QSIZE 16

#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4
#define T_GET_ID 8
#define ST_OK 0
#define ST_IOERR 1
#define ST_UNSUPP 2

/* Guest-physical addresses no RAM backs (64 MiB guests; far above any RAM Keel gives). */
#define FAR_AWAY 0x7fffffff0000ULL

struct desc { u64 addr; u32 len; u16 flags, next; };
struct used_elem { u32 id, len; };

struct vq {
    u16 size, max;
    volatile struct desc *desc;
    volatile u16 *avail;                /* flags, idx, ring[size] */
    volatile u16 *used;                 /* flags, idx, then used_elem[size] */
    u16 avail_idx, last_used;
    u64 notify;
};

struct vdev {
    const char *name;
    int slot;
    u16 device_id;
    u16 command;                        /* as found: restored after garbage */
    u32 bar0_reg;
    u64 bar;
    u64 common, isr, devcfg, notify;
    u32 devcfg_len, notify_len, notify_mult;
    u8 msix_cap, cfg_cap;
    u16 msix_size;
    u64 msix_table, msix_pba;
    u16 num_queues;
    u8 caps[16];
    int ncaps;
    u64 offered, features;
    u8 vec_config, vec_queue;           /* IDT vectors of MSI-X entries 0 and 1 */
    u8 *ring;                           /* one page for the virtqueue */
    u8 *buf;                            /* two pages for request buffers */
    struct vq q;
};

static u8 ring_pages[2][4096] __attribute__((aligned(4096)));
static u8 buf_pages[2][8192] __attribute__((aligned(4096)));

/* ---- small helpers ---- */

static void put2hex(u32 v) { putc("0123456789abcdef"[(v >> 4) & 0xf]); putc("0123456789abcdef"[v & 0xf]); }
static void put4hex(u32 v) { put2hex(v >> 8); put2hex(v); }
/* Zeroes `n` bytes (a multiple of 8, 8-aligned) a qword at a time: every instruction of this
   guest is emulated under PVM, so fewer is faster. */
static void zero(volatile void *p, u32 n) {
    volatile u64 *q = (volatile u64 *)p;
    for (u32 i = 0; i < n / 8; i++) q[i] = 0;
}

/* Byte `i` of the test disk the host creates, and what the guest writes to sector 1. */
static u8 disk_byte(u64 i) { return (u8)((i >> 9) * 31 + i * 7 + 3); }
static u8 written_byte(u32 j) { return (u8)(j * 5 + 0x4b); }

/* A fixed-seed xorshift: every run makes the same accesses. */
static u64 prng = 0x9e3779b97f4a7c15ULL;
static u64 rnd(void) { prng ^= prng << 13; prng ^= prng >> 7; prng ^= prng << 17; return prng; }

/* ---- configuration space ---- */

static u64 cfg(int slot, u32 off) { return ECAM_BASE + ((u64)slot << 15) + off; }
static u32 cf8_read32(int slot, u32 off) {
    outl(0xcf8, 0x80000000u | (u32)slot << 11 | (off & 0xfc));
    return inl(0xcfc);
}

static const char *type_name(u16 type) {
    switch (type) {
    case 1: return "net";
    case 2: return "blk";
    case 4: return "rng";
    case 5: return "balloon";
    case 19: return "vsock";
    default: return "unknown";
    }
}

/* Reads what a driver needs from configuration space and checks it is sane. */
static int probe(int slot, struct vdev *d) {
    int ok = 1;
#define PCHECK(c, why) do { if (!(c)) { fail(why); ok = 0; } } while (0)
    d->slot = slot;
    d->device_id = mmio_read16(cfg(slot, 2));
    d->name = type_name(d->device_id - VIRTIO_DEVICE_BASE);
    d->command = mmio_read16(cfg(slot, 4));
    d->bar0_reg = mmio_read32(cfg(slot, 0x10));
    d->bar = d->bar0_reg & ~0xfULL;
    PCHECK((d->bar0_reg & 0x7) == 0, "BAR 0 is not a 32-bit memory BAR");
    PCHECK(d->bar >= PCI_MMIO_START && d->bar + BAR_SIZE <= PCI_MMIO_END && !(d->bar & (BAR_SIZE - 1)),
           "BAR 0 is not a naturally aligned range inside the PCI MMIO window");
    PCHECK(d->command & 2, "memory decoding is off");
    PCHECK(mmio_read16(cfg(slot, 6)) & 0x10, "status register lacks the capability-list bit");
    u32 seen = 0;
    u8 p = mmio_read8(cfg(slot, 0x34)) & 0xfc;
    int steps = 0;
    d->ncaps = 0;
    while (p && steps++ < 48) {
        u8 id = mmio_read8(cfg(slot, p));
        u8 next = mmio_read8(cfg(slot, p + 1));
        if (d->ncaps < 16) d->caps[d->ncaps++] = id == 0x09 ? mmio_read8(cfg(slot, p + 3)) : id;
        if (id == 0x11) {
            u16 ctl = mmio_read16(cfg(slot, p + 2));
            u32 t = mmio_read32(cfg(slot, p + 4)), pba = mmio_read32(cfg(slot, p + 8));
            d->msix_cap = p;
            d->msix_size = (ctl & 0x7ff) + 1;
            PCHECK((t & 7) == 0 && (pba & 7) == 0, "MSI-X table or PBA is not in BAR 0");
            u64 toff = t & ~7u, poff = pba & ~7u;
            PCHECK(toff + 16ULL * d->msix_size <= BAR_SIZE, "MSI-X table runs past BAR 0");
            PCHECK(poff + 8ULL * ((d->msix_size + 63) / 64) <= BAR_SIZE, "MSI-X PBA runs past BAR 0");
            PCHECK(toff + 16ULL * d->msix_size <= poff || poff + 8 <= toff, "MSI-X table and PBA overlap");
            d->msix_table = d->bar + toff;
            d->msix_pba = d->bar + poff;
        } else if (id == 0x09) {
            u8 len = mmio_read8(cfg(slot, p + 2)), type = mmio_read8(cfg(slot, p + 3));
            u8 bar = mmio_read8(cfg(slot, p + 4));
            u32 off = mmio_read32(cfg(slot, p + 8)), length = mmio_read32(cfg(slot, p + 12));
            if (type >= 1 && type <= 4) {
                PCHECK(len >= 16, "virtio capability shorter than 16 bytes");
                PCHECK(bar == 0, "virtio structure outside BAR 0");
                PCHECK(length > 0 && off < BAR_SIZE && length <= BAR_SIZE - off, "virtio structure runs past BAR 0");
                PCHECK(!(seen & (1u << type)), "a virtio structure appears twice");
                u64 at = d->bar + off;
                if (type == 1) { d->common = at; PCHECK(length >= COMMON_LEN, "common configuration too short"); }
                if (type == 3) d->isr = at;
                if (type == 4) { d->devcfg = at; d->devcfg_len = length; }
                if (type == 2) {
                    PCHECK(len >= 20, "notify capability has no multiplier");
                    d->notify = at;
                    d->notify_len = length;
                    d->notify_mult = mmio_read32(cfg(slot, p + 16));
                }
            } else if (type == 5) {
                PCHECK(len >= 20, "PCI configuration access capability shorter than 20 bytes");
                d->cfg_cap = p;
            }
            seen |= 1u << (type & 31);
        }
        p = next & 0xfc;
    }
    PCHECK(steps < 48, "capability list does not end");
    PCHECK(d->msix_cap != 0, "no MSI-X capability");
    PCHECK((seen & 0x3e) == 0x3e, "a virtio capability (common, notify, ISR, device, PCI cfg) is missing");
    if (!ok) return 0;
    d->num_queues = mmio_read16(d->common + C_NUMQ);
    PCHECK(d->num_queues >= 1, "device has no queues");
    PCHECK(d->msix_size == d->num_queues + 1, "MSI-X table size is not queues + 1");
    PCHECK(d->notify_mult >= 2 && d->notify_len >= (u32)d->num_queues * d->notify_mult,
           "notification area too small for one slot per queue");
    return ok;
#undef PCHECK
}

/* Finds the `nth` (from 0) function with virtio device ID `device_id` and probes it. */
static int find_device(u16 device_id, int nth, struct vdev *d, int index) {
    for (int slot = 0; slot < 32; slot++) {
        u32 id = mmio_read32(cfg(slot, 0));
        if (id != ((u32)device_id << 16 | VIRTIO_VENDOR) || nth--) continue;
        zero((volatile u8 *)d, sizeof(*d));
        d->ring = ring_pages[index];
        d->buf = buf_pages[index];
        d->vec_config = 0x50 + 2 * index;
        d->vec_queue = 0x51 + 2 * index;
        return probe(slot, d);
    }
    return 0;
}

/* Sizes a BAR the way firmware does: decoding off, all-ones, read, restore. */
static u32 bar_size_mask(int slot, int bar) {
    u64 reg = cfg(slot, 0x10 + 4 * bar);
    u16 cmd = mmio_read16(cfg(slot, 4));
    u32 orig = mmio_read32(reg);
    mmio_write16(cfg(slot, 4), cmd & ~3);
    mmio_write32(reg, 0xffffffff);
    u32 mask = mmio_read32(reg);
    mmio_write32(reg, orig);
    mmio_write16(cfg(slot, 4), cmd);
    return mask;
}

/* Through the VIRTIO_PCI_CAP_PCI_CFG window: BAR 0 at `off`, `len` bytes. */
static void cfg_window(struct vdev *d, u32 off, u32 len) {
    mmio_write8(cfg(d->slot, d->cfg_cap + 4), 0);
    mmio_write32(cfg(d->slot, d->cfg_cap + 8), off);
    mmio_write32(cfg(d->slot, d->cfg_cap + 12), len);
}

/* ---- device bring-up ---- */

static void status_set(struct vdev *d, u8 s) { mmio_write8(d->common + C_STATUS, s); }
static u8 status_get(struct vdev *d) { return mmio_read8(d->common + C_STATUS); }

static void msix_entry(struct vdev *d, int i, u64 addr, u32 data, u32 ctl) {
    u64 e = d->msix_table + 16 * i;
    mmio_write32(e, (u32)addr);
    mmio_write32(e + 4, (u32)(addr >> 32));
    mmio_write32(e + 8, data);
    mmio_write32(e + 12, ctl);
}
static void msix_control(struct vdev *d, u16 v) { mmio_write16(cfg(d->slot, d->msix_cap + 2), v); }
static u64 msi_address(void) { return 0xfee00000ULL | (u64)(mmio_read32(LAPIC + 0x20) >> 24) << 12; }

/* Reset, ACKNOWLEDGE, DRIVER, features (VERSION_1 and what `want` names), FEATURES_OK, and
   MSI-X entries 0 (configuration) and 1 (queue 0) to this CPU. */
static int vdev_begin(struct vdev *d, u64 want) {
    u64 c = d->common;
    status_set(d, 0);
    if (status_get(d) != 0) { fail("device status is not 0 after a reset"); return 0; }
    status_set(d, S_ACK);
    status_set(d, S_ACK | S_DRIVER);
    mmio_write32(c + C_DFSELECT, 0);
    u64 offered = mmio_read32(c + C_DF);
    mmio_write32(c + C_DFSELECT, 1);
    offered |= (u64)mmio_read32(c + C_DF) << 32;
    d->offered = offered;
    if (!(offered & F_VERSION_1)) { fail("device does not offer VIRTIO_F_VERSION_1"); return 0; }
    d->features = offered & (want | F_VERSION_1);
    mmio_write32(c + C_GFSELECT, 0);
    mmio_write32(c + C_GF, (u32)d->features);
    mmio_write32(c + C_GFSELECT, 1);
    mmio_write32(c + C_GF, (u32)(d->features >> 32));
    status_set(d, S_READY);
    if (!(status_get(d) & S_FEATURES_OK)) { fail("FEATURES_OK did not stick"); return 0; }
    u64 addr = msi_address();
    msix_entry(d, 0, addr, d->vec_config, 0);
    msix_entry(d, 1, addr, d->vec_queue, 0);
    msix_control(d, 0x8000);
    mmio_write16(c + C_MSIX, 0);
    if (mmio_read16(c + C_MSIX) != 0) { fail("configuration MSI-X vector did not stick"); return 0; }
    return 1;
}

/* Programs queue 0 with rings at the given guest-physical addresses (not yet enabled). */
static void queue_program(struct vdev *d, u16 size, u64 desc, u64 avail, u64 used) {
    u64 c = d->common;
    mmio_write16(c + C_QSELECT, 0);
    d->q.max = mmio_read16(c + C_QSIZE);
    mmio_write16(c + C_QSIZE, size);
    mmio_write16(c + C_QMSIX, 1);
    mmio_write64(c + C_QDESC, desc);                    /* one 8-byte write ... */
    mmio_write32(c + C_QAVAIL, (u32)avail);             /* ... and 4-byte halves */
    mmio_write32(c + C_QAVAIL + 4, (u32)(avail >> 32));
    mmio_write32(c + C_QUSED, (u32)used);
    mmio_write32(c + C_QUSED + 4, (u32)(used >> 32));
    d->q.notify = d->notify + (u64)mmio_read16(c + C_QNOTIFYOFF) * d->notify_mult;
    d->q.size = size;
    d->q.desc = (volatile struct desc *)desc;
    d->q.avail = (volatile u16 *)avail;
    d->q.used = (volatile u16 *)used;
    d->q.avail_idx = 0;
    d->q.last_used = 0;
}

static u64 ring_desc(struct vdev *d) { return (u64)d->ring; }
static u64 ring_avail(struct vdev *d) { return (u64)d->ring + 0x400; }
static u64 ring_used(struct vdev *d) { return (u64)d->ring + 0x800; }

/* The whole bring-up with the driver's own rings; checks every register it wrote. */
static int vdev_init(struct vdev *d, u64 want) {
    if (!vdev_begin(d, want)) return 0;
    zero(d->ring, QSIZE * sizeof(struct desc));
    zero(d->ring + 0x400, 64);
    zero(d->ring + 0x800, 8 + QSIZE * sizeof(struct used_elem));
    queue_program(d, QSIZE, ring_desc(d), ring_avail(d), ring_used(d));
    u64 c = d->common;
    int ok = 1;
    if (d->q.max < QSIZE) { fail("queue 0 is smaller than the kit's queue"); ok = 0; }
    if (mmio_read16(c + C_QSIZE) != QSIZE) { fail("queue size did not stick"); ok = 0; }
    if (mmio_read16(c + C_QMSIX) != 1) { fail("queue MSI-X vector did not stick"); ok = 0; }
    if (mmio_read64(c + C_QDESC) != ring_desc(d) || mmio_read32(c + C_QAVAIL) != (u32)ring_avail(d) ||
        mmio_read32(c + C_QAVAIL + 4) != 0 || mmio_read64(c + C_QUSED) != ring_used(d)) {
        fail("queue ring addresses do not read back");
        ok = 0;
    }
    mmio_write16(c + C_QENABLE, 1);
    if (mmio_read16(c + C_QENABLE) != 1) { fail("queue enable did not stick"); ok = 0; }
    status_set(d, S_READY | S_DRIVER_OK);
    u8 s = status_get(d);
    if (!(s & S_DRIVER_OK) || (s & S_NEEDS_RESET)) { fail("device did not accept DRIVER_OK"); ok = 0; }
    return ok;
}

/* ---- requests ---- */

static void set_desc(struct vdev *d, u16 i, u64 addr, u32 len, u16 flags, u16 next) {
    d->q.desc[i].addr = addr;
    d->q.desc[i].len = len;
    d->q.desc[i].flags = flags;
    d->q.desc[i].next = next;
}

/* Makes `head` available (without notifying). */
static void vq_make_avail(struct vdev *d, u16 head) {
    struct vq *q = &d->q;
    q->avail[2 + q->avail_idx % q->size] = head;
    mb();
    q->avail_idx++;
    q->avail[1] = q->avail_idx;
    mb();
}

/* Makes `head` available and notifies (a write of the queue index to its notify address). */
static void vq_post(struct vdev *d, u16 head) {
    vq_make_avail(d, head);
    mmio_write16(d->q.notify, 0);
}

enum { W_TIMEOUT, W_USED, W_RESET };

/* Waits (hlt, woken by the MSI or a 1 ms timer) for a used element or DEVICE_NEEDS_RESET. */
static int vq_wait(struct vdev *d, u32 *id, u32 *len) {
    struct vq *q = &d->q;
    for (int i = 0; i < 2000; i++) {
        if (q->used[1] != q->last_used) {
            mb();
            volatile struct used_elem *e = (volatile struct used_elem *)(q->used + 2) + q->last_used % q->size;
            *id = e->id;
            *len = e->len;
            q->last_used++;
            return W_USED;
        }
        if (status_get(d) & S_NEEDS_RESET) return W_RESET;
        sleep_until_irq(1000);
    }
    return W_TIMEOUT;
}

/* Waits until vector `v` has fired more than `before` times; false after ~`ms` ms. */
static int wait_irq(u8 v, u32 before, int ms) {
    for (int i = 0; i < ms && irq_count[v] == before; i++) sleep_until_irq(1000);
    return irq_count[v] != before;
}

static int wait_status(struct vdev *d, u8 bits, int ms) {
    for (int i = 0; i < ms; i++) {
        if ((status_get(d) & bits) == bits) return 1;
        sleep_until_irq(1000);
    }
    return (status_get(d) & bits) == bits;
}

/* One 64-byte request to virtio-rng: the buffer must come back changed, with an MSI. */
static int rng_request(struct vdev *d) {
    volatile u8 *buf = d->buf;
    for (int i = 0; i < 64; i++) buf[i] = 0xcc;
    set_desc(d, 0, (u64)buf, 64, D_WRITE, 0);
    u32 before = irq_count[d->vec_queue], id = 0, len = 0;
    vq_post(d, 0);
    int r = vq_wait(d, &id, &len);
    if (r != W_USED) {
        fail(r == W_RESET ? "rng: a valid request put the device in NEEDS_RESET" : "rng: no used buffer within 2 s");
        return 0;
    }
    int changed = 0;
    for (int i = 0; i < 64; i++) changed += buf[i] != 0xcc;
    int ok = id == 0 && len == 64 && changed >= 32;
    check(id == 0, "rng: used element names the wrong descriptor");
    check(len == 64, "rng: used length is not 64");
    check(changed >= 32, "rng: the buffer did not change");
    int irq = wait_irq(d->vec_queue, before, 2000);
    check(irq, "rng: no MSI-X interrupt for the used buffer");
    return ok && irq;
}

struct blk_hdr { u32 type, reserved; u64 sector; };

/* A virtio-blk request: header, optional data (`dev_writes`: the device writes it), status.
   Returns W_*; the status byte and used length come back through the pointers. */
static int blk_request(struct vdev *d, u32 type, u64 sector, u64 data, u32 len, int dev_writes,
                       u8 *status, u32 *used_len) {
    volatile struct blk_hdr *h = (volatile struct blk_hdr *)d->buf;
    volatile u8 *st = d->buf + 16;
    h->type = type;
    h->reserved = 0;
    h->sector = sector;
    *st = 0xee;
    set_desc(d, 0, (u64)h, 16, D_NEXT, 1);
    if (len) {
        set_desc(d, 1, data, len, D_NEXT | (dev_writes ? D_WRITE : 0), 2);
        set_desc(d, 2, (u64)st, 1, D_WRITE, 0);
    } else {
        set_desc(d, 1, (u64)st, 1, D_WRITE, 0);
    }
    u32 id = 0;
    vq_post(d, 0);
    int r = vq_wait(d, &id, used_len);
    *status = *st;
    if (r == W_USED && id != 0) fail("blk: used element names the wrong descriptor");
    return r;
}

static u64 blk_data(struct vdev *d) { return (u64)d->buf + 0x1000; }

/* Sector 0 as the host wrote it, computed once. */
static u64 sector0[64];
static int sector0_ready;

/* Reads sector 0 and compares it with the host's pattern. */
static int blk_read_check(struct vdev *d) {
    volatile u64 *data = (volatile u64 *)blk_data(d);
    if (!sector0_ready) {
        for (int i = 0; i < 512; i++) ((volatile u8 *)sector0)[i] = disk_byte(i);
        sector0_ready = 1;
    }
    zero(data, 512);
    u8 st = 0xff;
    u32 len = 0;
    int r = blk_request(d, T_IN, 0, (u64)data, 512, 1, &st, &len);
    if (r != W_USED || st != ST_OK) {
        fail(r == W_USED ? "blk: reading sector 0 failed" : r == W_RESET ? "blk: a read put the device in NEEDS_RESET" : "blk: no used buffer within 2 s");
        return 0;
    }
    check(len == 513, "blk: a 512-byte read did not report 513 bytes used");
    for (int i = 0; i < 64; i++)
        if (data[i] != sector0[i]) { fail("blk: sector 0 differs from the host's pattern"); return 0; }
    return 1;
}

static int normal_request(struct vdev *d) {
    return d->device_id == DEV_RNG ? rng_request(d) : blk_read_check(d);
}

static u64 wanted_features(struct vdev *d) {
    return F_VERSION_1 | F_INDIRECT | (d->device_id == DEV_BLK ? F_BLK_FLUSH | F_BLK_SIZE : 0);
}

static void irq_setup(void) {
    idt_install_all();
    lapic_enable();
}

/* ---- test=pci-enum ---- */

void test_pci_enum(struct boot *b) {
    int virtio = 0, bridges = 0;
    for (int slot = 0; slot < 32; slot++) {
        u32 id = mmio_read32(cfg(slot, 0));
        check(id == cf8_read32(slot, 0), "ECAM and 0xCF8/0xCFC disagree on a vendor/device ID");
        if (id == 0xffffffff) continue;
        u32 class_rev = mmio_read32(cfg(slot, 8));
        check(class_rev == cf8_read32(slot, 8), "ECAM and 0xCF8/0xCFC disagree on class/revision");
        check(mmio_read32(cfg(slot, 0x10)) == cf8_read32(slot, 0x10), "ECAM and 0xCF8/0xCFC disagree on BAR 0");
        check(mmio_read32(cfg(slot, 0x34)) == cf8_read32(slot, 0x34), "ECAM and 0xCF8/0xCFC disagree on the capability pointer");
        for (u32 f = 1; f < 8; f++)
            check(mmio_read32(cfg(slot, 0) + (f << 12)) == 0xffffffff, "a function other than 0 answered");
        /* Interrupt line is a scratch register: write through 0xCFC, read through ECAM. */
        outl(0xcf8, 0x80000000u | (u32)slot << 11 | 0x3c);
        outb(0xcfc, 0x5a);
        check(mmio_read8(cfg(slot, 0x3c)) == 0x5a, "a write through 0xCFC is not visible through ECAM");
        mmio_write8(cfg(slot, 0x3c), 0);
        puts("KIT: pci 00:"); put2hex(slot); puts(".0 "); put4hex(id & 0xffff); puts(":"); put4hex(id >> 16);
        if (slot == 0) {
            puts(" host bridge class="); put2hex(class_rev >> 24); put2hex(class_rev >> 16); puts("\n");
            check(id == 0x00081b36 && class_rev >> 16 == 0x0600, "00:00.0 is not the 1b36:0008 host bridge");
            bridges++;
            continue;
        }
        if ((id & 0xffff) != VIRTIO_VENDOR || (id >> 16) < VIRTIO_DEVICE_BASE) {
            puts(" (not a virtio 1.x device)\n");
            fail("unexpected device on bus 0");
            continue;
        }
        struct vdev d;
        zero((volatile u8 *)&d, sizeof(d));
        int ok = probe(slot, &d);
        puts(" virtio-"); puts(d.name); puts(" bar0="); puthex(d.bar);
        u32 mask = bar_size_mask(slot, 0);
        u64 size = (u64)(~(mask & ~0xfu)) + 1;
        puts(" size="); puthex(size & 0xffffffffULL);
        check(mask == ((u32)~(BAR_SIZE - 1) | (d.bar0_reg & 0xf)), "BAR 0 size mask is not ~(0x8000-1) with its flags");
        check(mmio_read32(cfg(slot, 0x10)) == d.bar0_reg, "BAR 0 did not come back after sizing");
        for (int bar = 1; bar < 6; bar++)
            check(bar_size_mask(slot, bar) == 0, "an unimplemented BAR sizes as non-zero");
        check((class_rev & 0xff) >= 1, "virtio 1.x devices have revision 1 or more");
        check(mmio_read16(cfg(slot, 0x2c)) == VIRTIO_VENDOR && mmio_read16(cfg(slot, 0x2e)) >= 0x40,
              "subsystem IDs are not 1af4 / 0x40 or more");
        puts(" queues="); putdec(d.num_queues); puts(" msix="); putdec(d.msix_size);
        puts(" notify_mult="); putdec(d.notify_mult); puts(" caps=");
        for (int i = 0; i < d.ncaps; i++) {
            if (i) puts(",");
            if (d.caps[i] == 0x11) puts("msix"); else putdec(d.caps[i]);
        }
        puts("\n");
        if (ok) {
            /* BAR 0 decodes again after sizing, and agrees with the PCI_CFG window. */
            check(mmio_read16(d.common + C_NUMQ) == d.num_queues, "BAR 0 does not decode after sizing");
            cfg_window(&d, C_NUMQ, 2);
            check((mmio_read32(cfg(slot, d.cfg_cap + 16)) & 0xffff) == d.num_queues,
                  "the PCI_CFG window does not read num_queues");
            cfg_window(&d, C_DFSELECT, 4);
            mmio_write32(cfg(slot, d.cfg_cap + 16), 1);
            check(mmio_read32(d.common + C_DFSELECT) == 1, "a write through the PCI_CFG window did not reach BAR 0");
            mmio_write32(d.common + C_DFSELECT, 0);
            check(mmio_read16(cfg(slot, d.msix_cap + 2)) >> 14 == 0, "MSI-X is enabled or masked at boot");
            check(status_get(&d) == 0, "device status is not 0 at boot");
        }
        virtio++;
    }
    check(bridges == 1, "no host bridge at 00:00.0");
    check(mmio_read32(ECAM_BASE + ECAM_BUS_SIZE) == 0xffffffff, "ECAM answers beyond bus 0");
    u64 want = parse_dec(param(b->cmdline, "devices"));
    puts("KIT: pci-enum found "); putdec(virtio); puts(" virtio devices\n");
    check(virtio == (int)want, "virtio device count differs from devices=");
    puts("KIT: pci-enum done\n");
}

/* Moves BAR 0 to `bar` (decoding off around the change) and follows it. */
static void bar_move(struct vdev *d, u64 bar) {
    u64 delta = bar - d->bar;
    mmio_write16(cfg(d->slot, 4), d->command & ~2);
    mmio_write32(cfg(d->slot, 0x10), (u32)bar);
    mmio_write16(cfg(d->slot, 4), d->command);
    d->bar0_reg = mmio_read32(cfg(d->slot, 0x10));
    d->bar += delta;
    d->common += delta;
    d->isr += delta;
    d->devcfg += delta;
    d->notify += delta;
    d->msix_table += delta;
    d->msix_pba += delta;
    d->q.notify += delta;
}

/* ---- test=virtio-rng ---- */

void test_virtio_rng(struct boot *b) {
    (void)b;
    struct vdev d;
    if (!find_device(DEV_RNG, 0, &d, 0)) { fail("no usable virtio-rng device"); return; }
    irq_setup();
    if (!vdev_init(&d, F_VERSION_1 | F_INDIRECT)) return;
    puts("KIT: rng features="); puthex(d.offered); puts(" accepted="); puthex(d.features); puts("\n");
    check(rng_request(&d), "rng: first request");
    /* A chain of two writable buffers. */
    volatile u8 *buf = d.buf;
    for (int i = 0; i < 96; i++) buf[i] = 0xcc;
    set_desc(&d, 0, (u64)buf, 32, D_WRITE | D_NEXT, 1);
    set_desc(&d, 1, (u64)buf + 32, 64, D_WRITE, 0);
    u32 id = 0, len = 0, before = irq_count[d.vec_queue];
    vq_post(&d, 0);
    check(vq_wait(&d, &id, &len) == W_USED && id == 0 && len == 96, "rng: a two-buffer chain did not fill 96 bytes");
    check(wait_irq(d.vec_queue, before, 2000), "rng: no MSI-X interrupt for the two-buffer chain");
    /* An indirect table of two buffers. */
    if (d.features & F_INDIRECT) {
        volatile struct desc *t = (volatile struct desc *)(d.buf + 0x1000);
        t[0] = (struct desc){(u64)buf, 16, D_WRITE | D_NEXT, 1};
        t[1] = (struct desc){(u64)buf + 16, 16, D_WRITE, 0};
        set_desc(&d, 0, (u64)t, 2 * sizeof(struct desc), D_INDIRECT, 0);
        before = irq_count[d.vec_queue];
        vq_post(&d, 0);
        check(vq_wait(&d, &id, &len) == W_USED && id == 0 && len == 32, "rng: an indirect table did not fill 32 bytes");
        check(wait_irq(d.vec_queue, before, 2000), "rng: no MSI-X interrupt for the indirect table");
    } else {
        fail("rng: the device does not offer VIRTIO_F_INDIRECT_DESC");
    }
    /* The ISR reads 1 (a queue interrupt) and clears on read. */
    u8 isr = mmio_read8(d.isr);
    u8 isr2 = mmio_read8(d.isr);
    puts("KIT: rng queue MSIs="); putdec(irq_count[d.vec_queue]); puts(" config MSIs="); putdec(irq_count[d.vec_config]);
    puts(" isr="); putdec(isr); puts(" then "); putdec(isr2); puts("\n");
    check(isr2 == 0, "reading the ISR did not clear it");
    check(irq_count[d.vec_queue] >= 3, "fewer queue interrupts than requests");
    check(irq_count[d.vec_config] == 0, "a configuration interrupt arrived");
    /* Move BAR 0 to the top of the window while the device runs: it answers there only, and
       a notify written to the old address (where a stale ioeventfd would still listen) does
       not reach it. Then the new notify address works, and so does moving back. */
    u64 home = d.bar, old_common = d.common, old_notify = d.q.notify;
    bar_move(&d, PCI_MMIO_END - 0x100000);
    puts("KIT: rng BAR 0 moved to "); puthex(d.bar); puts("\n");
    check(d.bar0_reg == (u32)(PCI_MMIO_END - 0x100000), "BAR 0 did not take the new address");
    check(mmio_read16(d.common + C_NUMQ) == d.num_queues, "the device does not answer at its new BAR address");
    check(mmio_read32(old_common) == 0xffffffff, "the old BAR address still answers");
    check(status_get(&d) & S_DRIVER_OK, "moving BAR 0 changed the device status");
    set_desc(&d, 0, (u64)buf, 64, D_WRITE, 0);
    vq_make_avail(&d, 0);
    mmio_write16(old_notify, 0);
    sleep_until_irq(5000);
    check(d.q.used[1] == d.q.last_used, "a notify at the old BAR address reached the device (a stale ioeventfd)");
    before = irq_count[d.vec_queue];
    mmio_write16(d.q.notify, 0);
    check(vq_wait(&d, &id, &len) == W_USED && len == 64, "a notify at the new BAR address did not reach the device");
    check(wait_irq(d.vec_queue, before, 2000), "no MSI-X interrupt after the BAR moved");
    bar_move(&d, home);
    check(rng_request(&d), "rng: a request after moving BAR 0 back");
    status_set(&d, 0);
    puts("KIT: virtio-rng done\n");
}

/* ---- test=virtio-blk ---- */

void test_virtio_blk(struct boot *b) {
    struct vdev d;
    if (!find_device(DEV_BLK, 0, &d, 0)) { fail("no usable virtio-blk device"); return; }
    irq_setup();
    if (!vdev_init(&d, wanted_features(&d))) return;
    u64 sectors = mmio_read32(d.devcfg) | (u64)mmio_read32(d.devcfg + 4) << 32;
    puts("KIT: blk features="); puthex(d.offered); puts(" capacity="); putdec(sectors); puts(" sectors\n");
    check(sectors == parse_dec(param(b->cmdline, "sectors")), "capacity differs from sectors=");
    check(d.features & F_BLK_FLUSH, "virtio-blk does not offer FLUSH");
    if (d.features & F_BLK_SIZE) check(mmio_read32(d.devcfg + 20) == 512, "blk_size is not 512");
    check(blk_read_check(&d), "reading sector 0");
    volatile u8 *data = (volatile u8 *)blk_data(&d);
    u8 st;
    u32 len;
    /* Write sector 1, flush, read it back. */
    for (u32 j = 0; j < 512; j++) data[j] = written_byte(j);
    check(blk_request(&d, T_OUT, 1, (u64)data, 512, 0, &st, &len) == W_USED && st == ST_OK && len == 1,
          "writing sector 1 did not complete with OK and 1 byte used");
    check(blk_request(&d, T_FLUSH, 0, 0, 0, 0, &st, &len) == W_USED && st == ST_OK, "flush did not complete with OK");
    zero(data, 1024);
    check(blk_request(&d, T_IN, 1, (u64)data, 1024, 1, &st, &len) == W_USED && st == ST_OK && len == 1025,
          "reading sectors 1-2 did not complete with OK and 1025 bytes used");
    int same = 1;
    for (u32 j = 0; j < 512; j++) same &= data[j] == written_byte(j);
    check(same, "sector 1 does not read back what was written");
    same = 1;
    for (u32 j = 0; j < 512; j++) same &= data[512 + j] == disk_byte(1024 + j);
    check(same, "sector 2 changed");
    /* GET_ID: up to 20 bytes of ID. */
    zero(data, 32);
    check(blk_request(&d, T_GET_ID, 0, (u64)data, 20, 1, &st, &len) == W_USED && st == ST_OK && len == 21,
          "GET_ID did not complete with OK and 21 bytes used");
    puts("KIT: blk id '");
    for (int i = 0; i < 20 && data[i]; i++) putc(data[i] >= 32 && data[i] < 127 ? (char)data[i] : '?');
    puts("'\n");
    check(data[0] != 0, "GET_ID returned an empty ID");
    /* Out of range: past the end, straddling the end, sector overflow, a write past the end. */
    check(blk_request(&d, T_IN, sectors, (u64)data, 512, 1, &st, &len) == W_USED && st == ST_IOERR && len == 1,
          "a read past the end did not fail with IOERR");
    check(blk_request(&d, T_IN, sectors - 1, (u64)data, 1024, 1, &st, &len) == W_USED && st == ST_IOERR,
          "a read straddling the end did not fail with IOERR");
    check(blk_request(&d, T_IN, ~0ULL, (u64)data, 512, 1, &st, &len) == W_USED && st == ST_IOERR,
          "a read at sector 2^64-1 did not fail with IOERR");
    check(blk_request(&d, T_OUT, sectors, (u64)data, 512, 0, &st, &len) == W_USED && st == ST_IOERR,
          "a write past the end did not fail with IOERR");
    check(blk_request(&d, T_IN, 0, (u64)data, 100, 1, &st, &len) == W_USED && st == ST_IOERR,
          "a read of 100 bytes (not whole sectors) did not fail with IOERR");
    /* Unknown request types. */
    check(blk_request(&d, 0x7f, 0, 0, 0, 0, &st, &len) == W_USED && st == ST_UNSUPP && len == 1,
          "an unknown request type did not fail with UNSUPP");
    check(blk_request(&d, 0xffffffff, 0, (u64)data, 512, 1, &st, &len) == W_USED && st == ST_UNSUPP,
          "request type 0xffffffff did not fail with UNSUPP");
    check(blk_read_check(&d), "reading sector 0 after the failed requests");
    puts("KIT: blk queue MSIs="); putdec(irq_count[d.vec_queue]); puts("\n");
    check(irq_count[d.vec_queue] > 0, "no queue interrupt arrived");
    status_set(&d, 0);
    puts("KIT: virtio-blk done\n");
}

/* ---- test=virtio-hostile ---- */

static u64 ram_top;

static void case_start(struct vdev *d, const char *what) {
    puts("KIT: hostile "); puts(d->name); puts(" "); puts(what); puts("\n");
}
static void case_done(struct vdev *d, const char *what) {
    puts("KIT: hostile "); puts(d->name); puts(" "); puts(what); puts(" done\n");
}

/* After a hostile case: reset, bring up again, and one normal request must work. */
static void recover(struct vdev *d, const char *what) {
    if (!vdev_init(d, wanted_features(d)) || !normal_request(d)) {
        puts("KIT: the device does not work after: "); puts(what); puts("\n");
        fail("device unusable after a hostile case (see the line above)");
    }
}

/* Posts a crafted chain at `head`: the request must complete or the device must ask for a
   reset; `max_len` bounds the used length (~0 for any). Returns W_*. */
static int expect_survives(struct vdev *d, u16 head, u32 max_len, const char *what) {
    u32 id = 0, len = 0;
    vq_post(d, head);
    int r = vq_wait(d, &id, &len);
    puts("KIT:   "); puts(what); puts(": ");
    if (r == W_USED) { puts("used len="); putdec(len); }
    else if (r == W_RESET) puts("DEVICE_NEEDS_RESET");
    else puts("nothing within 2 s");
    puts("\n");
    if (r == W_TIMEOUT) fail("a hostile request neither completed nor set DEVICE_NEEDS_RESET");
    if (r == W_USED && len > max_len) fail("a hostile request reported more bytes than it could hold");
    return r;
}

/* The MSI-X data dword: keep fixed delivery and a vector of 0x20 or more, so the garbage
   cannot ask this CPU for an NMI, INIT or SMI (which would be the guest's own doing). */
static u32 safe_msi_data(u32 v) { return (v & ~0x700u) | 0x20; }

/* One random access of `size` bytes at `a`: a read, or a write of `v`. */
static void mmio_poke(u64 a, u32 size, int read, u64 v) {
    switch (size | (read ? 16 : 0)) {
    case 1: mmio_write8(a, (u8)v); break;
    case 2: mmio_write16(a, (u16)v); break;
    case 4: mmio_write32(a, (u32)v); break;
    case 8: mmio_write64(a, v); break;
    case 17: (void)mmio_read8(a); break;
    case 18: (void)mmio_read16(a); break;
    case 20: (void)mmio_read32(a); break;
    default: (void)mmio_read64(a); break;
    }
}

/* A value for a garbage write: 0, 0..3, all-ones, a byte, or anything (bits 32-33 of `r`). */
static u64 garbage_value(u64 r) {
    switch ((r >> 32) & 3) {
    case 0: return (r >> 40) & 1 ? 0 : (r >> 41) & 3;
    case 1: return ~0ULL;
    case 2: return (r >> 40) & 0xff;
    default: return r * 0x9e3779b97f4a7c15ULL;
    }
}

#define BAR_GARBAGE 1600
#define CONFIG_GARBAGE 1000

/* (a) Random accesses of every size over BAR 0, then over configuration space. Every field
   of an access comes from one PRNG draw: under PVM each guest instruction costs about a
   microsecond. */
static void hostile_garbage(struct vdev *d) {
    case_start(d, "garbage");
    prng = 0x9e3779b97f4a7c15ULL ^ d->device_id;              /* a sequence per device */
    status_set(d, 0);
    u64 toff = d->msix_table - d->bar, poff = d->msix_pba - d->bar;
    u64 tend = toff + 16ULL * d->msix_size + 16;
    int writes = 0;
    for (int i = 0; i < BAR_GARBAGE; i++) {
        u64 r = rnd(), sel = r & 0xf, off = (r >> 8) & 0xffff;
        if (sel < 6) off %= COMMON_LEN;                          /* 6/16: common config */
        else if (sel == 6) off = 0x1000 + (off & 15);            /* ISR */
        else if (sel == 7) off = 0x2000 + (off & 63);            /* device config */
        else if (sel == 8) off = 0x3000 + (off & 15);            /* notify */
        else if (sel < 12) off = toff + off % (tend - toff);     /* MSI-X table and past it */
        else if (sel == 12) off = poff + (off & 15);             /* PBA */
        else off &= BAR_SIZE - 1;                                /* anywhere */
        u32 size = 1u << ((r >> 24) & 3);
        if ((r >> 26) & 3) off &= ~(u64)(size - 1);              /* 3/4 aligned */
        if (off + size > BAR_SIZE) off = BAR_SIZE - size;
        int read = ((r >> 28) & 7) == 0;                      /* 1/8 reads */
        u64 v = garbage_value(r);
        if (off >= toff && off < tend && (off & 15) == 8 && size >= 4)
            v = (v & ~0xffffffffULL) | safe_msi_data((u32)v);
        mmio_poke(d->bar + off, size, read, v);
        writes += !read;
    }
    puts("KIT:   "); putdec(BAR_GARBAGE); puts(" BAR accesses ("); putdec(writes);
    puts(" writes): status="); puthex(status_get(d)); puts("\n");
    /* Configuration space: BAR registers, command, MSI-X control, the virtio capabilities
       (with the PCI_CFG window into BAR 0), the rest of the header, and anywhere in 4 KiB. */
    writes = 0;
    u32 window = d->cfg_cap + 16;
    for (int i = 0; i < CONFIG_GARBAGE; i++) {
        u64 r = rnd(), sel = r & 0xf;
        u32 off = (r >> 8) & 0xfff;
        /* Moving BAR 0, switching decoding and MSI-X cost Keel KVM ioctls (ioeventfds, GSI
           routes) of about a millisecond each here: enough of them, not a majority. */
        if (sel < 3) off = 0x10 + off % 24;                      /* BARs 0-5 */
        else if (sel < 4) off = 0x04 + (off & 3);                /* command, status */
        else if (sel < 6) off = d->msix_cap + off % 12;          /* MSI-X capability */
        else if (sel < 10) off = 0x40 + (off & 0x7f);            /* virtio capabilities */
        else if (sel < 12) off &= 0x3f;                          /* the header */
        u32 size = 1u << ((r >> 24) % 3);
        if ((r >> 26) & 3) off &= ~(size - 1);
        if (off + size > 0x1000) off = 0x1000 - size;
        int read = ((r >> 28) & 7) == 0;                      /* 1/8 reads */
        u64 v = garbage_value(r);
        /* A write through the PCI_CFG window lands in BAR 0: aim the window away from the
           MSI-X table first (see safe_msi_data). */
        if (!read && off + size > window && off < window + 4) {
            u32 at = (u32)(r >> 44);
            if (at >= toff && at < toff + 0x2000) at &= 0x3f;
            mmio_write32(cfg(d->slot, d->cfg_cap + 8), at);
        }
        writes += !read;
        if (((r >> 36) & 7) == 0) {
            /* One access in eight goes through 0xCF8/0xCFC. */
            outl(0xcf8, 0x80000000u | (u32)d->slot << 11 | (off & 0xfc));
            u16 port = 0xcfc + (off & 3);
            if (read) {
                if (size == 1) (void)inb(port); else if (size == 2) (void)inw(port); else (void)inl(port);
            } else {
                if (size == 1) outb(port, (u8)v); else if (size == 2) outw(port, (u16)v); else outl(port, (u32)v);
            }
        } else {
            mmio_poke(cfg(d->slot, off), size, read, v);
        }
    }
    puts("KIT:   "); putdec(CONFIG_GARBAGE); puts(" configuration accesses ("); putdec(writes);
    puts(" writes): command="); puthex(mmio_read16(cfg(d->slot, 4)));
    puts(" bar0="); puthex(mmio_read32(cfg(d->slot, 0x10)));
    puts(" msix control="); puthex(mmio_read16(cfg(d->slot, d->msix_cap + 2))); puts("\n");
    /* Put BAR 0 and decoding back, MSI-X off until the driver sets it up again. */
    mmio_write16(cfg(d->slot, 4), 0);
    mmio_write32(cfg(d->slot, 0x10), d->bar0_reg);
    mmio_write16(cfg(d->slot, d->msix_cap + 2), 0);
    mmio_write16(cfg(d->slot, 4), d->command);
    check(mmio_read32(cfg(d->slot, 0x10)) == d->bar0_reg, "BAR 0 cannot be programmed back after the garbage");
    check(mmio_read16(cfg(d->slot, 0)) == VIRTIO_VENDOR, "the device vanished from configuration space");
    recover(d, "garbage");
    case_done(d, "garbage");
}

/* (b) Buffers outside guest RAM and straddling its end. */
static void hostile_outside_ram(struct vdev *d) {
    case_start(d, "outside-ram");
    u64 straddle = ram_top - 32;
    if (d->device_id == DEV_RNG) {
        u64 addrs[4];
        addrs[0] = FAR_AWAY;
        addrs[1] = straddle;
        addrs[2] = 0xfee00000ULL;
        addrs[3] = ~0ULL - 31;
        static const char *const names[] = {"buffer at 0x7fffffff0000", "buffer straddling the end of RAM",
                               "buffer on the LAPIC", "buffer at the top of the address space"};
        for (int i = 0; i < 4; i++) {
            set_desc(d, 0, addrs[i], 64, D_WRITE, 0);
            int r = expect_survives(d, 0, 0, names[i]);
            if (r != W_USED) recover(d, names[i]);
        }
    } else {
        volatile struct blk_hdr *h = (volatile struct blk_hdr *)d->buf;
        volatile u8 *st = d->buf + 16;
        static const char *const names[] = {"header at 0x7fffffff0000", "header straddling the end of RAM",
                               "read data at 0x7fffffff0000", "read data straddling the end of RAM",
                               "status at 0x7fffffff0000", "write data at 0x7fffffff0000"};
        for (int i = 0; i < 6; i++) {
            h->type = i == 5 ? T_OUT : T_IN;
            h->reserved = 0;
            h->sector = 0;
            *st = 0xee;
            u64 hdr = i == 0 ? FAR_AWAY : i == 1 ? ram_top - 8 : (u64)h;
            u64 data = i == 2 || i == 5 ? FAR_AWAY : i == 3 ? ram_top - 256 : blk_data(d);
            u64 status = i == 4 ? FAR_AWAY : (u64)st;
            set_desc(d, 0, hdr, 16, D_NEXT, 1);
            set_desc(d, 1, data, 512, D_NEXT | (i == 5 ? 0 : D_WRITE), 2);
            set_desc(d, 2, status, 1, D_WRITE, 0);
            /* With the status byte unwritable, a read may still report its 512 data bytes. */
            int r = expect_survives(d, 0, i == 4 ? 512 : 1, names[i]);
            if (r == W_USED && i != 4 && *st != ST_IOERR) fail("blk: a request with a buffer outside RAM did not fail with IOERR");
            if (r != W_USED) recover(d, names[i]);
        }
    }
    recover(d, "outside-ram");
    case_done(d, "outside-ram");
}

/* (c) Descriptor loops, in the ring and in indirect tables, and other broken chains. */
static void hostile_loops(struct vdev *d) {
    case_start(d, "loops");
    volatile struct desc *t = (volatile struct desc *)(d->buf + 0x1000);
    u64 buf = (u64)d->buf + 0x800;
    int rng = d->device_id == DEV_RNG;
    /* Each entry: build, then run. A reset follows any case that broke the device. */
    for (int c = 0; c < 9; c++) {
        const char *what = "";
        u32 max = rng ? QSIZE * 16 : 1;
        u16 head = 0;
        volatile struct blk_hdr *h = (volatile struct blk_hdr *)d->buf;
        h->type = T_IN;
        h->reserved = 0;
        h->sector = 0;
        u16 w = rng ? D_WRITE : 0;           /* rng: writable loops; blk: header loops */
        u64 a = rng ? buf : (u64)h;
        switch (c) {
        case 0:
            what = "two descriptors pointing at each other";
            set_desc(d, 0, a, 16, w | D_NEXT, 1);
            set_desc(d, 1, rng ? buf + 16 : (u64)d->buf + 16, 16, D_WRITE | D_NEXT, 0);
            break;
        case 1:
            what = "a descriptor pointing at itself";
            set_desc(d, 0, a, 16, w | D_NEXT, 0);
            break;
        case 2:
            what = "an indirect table that loops";
            for (int i = 0; i < 4; i++)
                t[i] = (struct desc){i == 0 ? a : buf + 16 * i, 16, (u16)((i == 0 ? w : D_WRITE) | D_NEXT), (u16)((i + 1) % 4)};
            set_desc(d, 0, (u64)t, 4 * sizeof(struct desc), D_INDIRECT, 0);
            max = rng ? 64 : 1;
            break;
        case 3:
            what = "an indirect entry pointing at itself";
            t[0] = (struct desc){a, 16, (u16)(w | D_NEXT), 0};
            set_desc(d, 0, (u64)t, 2 * sizeof(struct desc), D_INDIRECT, 0);
            max = rng ? 32 : 1;
            break;
        case 4:
            what = "a nested indirect table";
            t[0] = (struct desc){(u64)t, 32, D_INDIRECT, 0};
            set_desc(d, 0, (u64)t, 2 * sizeof(struct desc), D_INDIRECT, 0);
            max = 1;
            break;
        case 5:
            what = "an indirect table of 20 bytes";
            t[0] = (struct desc){a, 16, w, 0};
            set_desc(d, 0, (u64)t, 20, D_INDIRECT, 0);
            max = 1;
            break;
        case 6:
            what = "an indirect table outside RAM";
            set_desc(d, 0, FAR_AWAY, 4 * sizeof(struct desc), D_INDIRECT, 0);
            max = 1;
            break;
        case 7:
            what = "a next index past the queue";
            set_desc(d, 0, a, 16, w | D_NEXT, 1000);
            max = rng ? 16 : 1;
            break;
        default:
            what = "a head index past the queue";
            set_desc(d, 0, a, 16, w, 0);
            head = 200;
            break;
        }
        int r = expect_survives(d, head, max, what);
        if (r != W_USED) recover(d, what);
    }
    recover(d, "loops");
    case_done(d, "loops");
}

/* (d) The available index far beyond the queue size: the device must ask for a reset. */
static void hostile_overflow(struct vdev *d) {
    case_start(d, "overflow");
    static const u16 jumps[] = {1000, QSIZE + 1, 0x8000};
    for (int i = 0; i < 3; i++) {
        u32 before = irq_count[d->vec_config];
        set_desc(d, 0, (u64)d->buf, 16, D_WRITE, 0);
        d->q.avail_idx += jumps[i];
        d->q.avail[1] = d->q.avail_idx;
        mb();
        mmio_write16(d->q.notify, 0);
        int needs = wait_status(d, S_NEEDS_RESET, 2000);
        int irq = wait_irq(d->vec_config, before, 2000);
        puts("KIT:   avail idx +"); putdec(jumps[i]); puts(": status="); puthex(status_get(d));
        puts(" config MSIs +"); putdec(irq_count[d->vec_config] - before); puts("\n");
        check(needs, "an available index beyond the queue size did not set DEVICE_NEEDS_RESET");
        check(irq, "DEVICE_NEEDS_RESET came without a configuration interrupt");
        recover(d, "overflow");
    }
    case_done(d, "overflow");
}

/* (e) Rings outside RAM (or straddling its end) at DRIVER_OK, and odd queue registers. */
static void hostile_rings(struct vdev *d) {
    case_start(d, "rings");
    u64 c = d->common;
    for (int i = 0; i < 4; i++) {
        static const char *const what[] = {"descriptor table at 0x7fffffff0000", "used ring straddling the end of RAM",
                              "available ring straddling the end of RAM", "descriptor table at the top of the address space"};
        if (!vdev_begin(d, wanted_features(d))) break;
        u64 desc = i == 0 ? FAR_AWAY : i == 3 ? ~0ULL - 0xff : ring_desc(d);
        u64 avail = i == 2 ? ram_top - 16 : ring_avail(d);
        u64 used = i == 1 ? ram_top - 64 : ring_used(d);
        queue_program(d, QSIZE, desc, avail, used);
        mmio_write16(c + C_QENABLE, 1);
        status_set(d, S_READY | S_DRIVER_OK);
        u8 s = status_get(d);
        puts("KIT:   "); puts(what[i]); puts(": status="); puthex(s); puts("\n");
        check(s & S_NEEDS_RESET, "rings outside RAM at DRIVER_OK did not set DEVICE_NEEDS_RESET");
        mmio_write16(d->notify, 0);                  /* a notify to the broken device */
    }
    /* Registers a driver must not write, or not this way. */
    if (vdev_begin(d, wanted_features(d))) {
        mmio_write16(c + C_QSELECT, 0);
        u16 max = mmio_read16(c + C_QSIZE);
        mmio_write16(c + C_QSIZE, 3);
        u16 s3 = mmio_read16(c + C_QSIZE);
        mmio_write16(c + C_QSIZE, 0);
        u16 s0 = mmio_read16(c + C_QSIZE);
        mmio_write16(c + C_QSIZE, max * 2);
        u16 s2 = mmio_read16(c + C_QSIZE);
        mmio_write64(c + C_QDESC, ring_desc(d) + 8);
        u64 mis = mmio_read64(c + C_QDESC);
        puts("KIT:   queue size 3 -> "); putdec(s3); puts(", 0 -> "); putdec(s0); puts(", 2*max -> "); putdec(s2);
        puts("; misaligned descriptor table reads "); puthex(mis); puts("\n");
        check(s3 != 3 && s0 != 0 && s2 != max * 2, "the device took a queue size that is not a power of two up to its maximum");
        mmio_write16(c + C_QSELECT, 7);
        check(mmio_read16(c + C_QSIZE) == 0, "a queue that does not exist has a non-zero size");
        mmio_write16(c + C_QENABLE, 1);
        mmio_write64(c + C_QDESC, FAR_AWAY);
        check(mmio_read16(c + C_QENABLE) == 0, "a queue that does not exist reads as enabled");
        mmio_write16(c + C_QSELECT, 0xffff);
        mmio_write16(c + C_QMSIX, 1);
        check(mmio_read16(c + C_QMSIX) == NO_VECTOR || mmio_read16(c + C_QMSIX) == 0,
              "a queue that does not exist took an MSI-X vector");
        /* DRIVER_OK with queue 0 never enabled: nothing to run, nothing must break. */
        status_set(d, S_READY | S_DRIVER_OK);
        mmio_write16(d->notify, 0);
        puts("KIT:   DRIVER_OK without an enabled queue: status="); puthex(status_get(d)); puts("\n");
    }
    recover(d, "rings");
    case_done(d, "rings");
}

/* Read the PBA's first qword. */
static u64 pba(struct vdev *d) { return mmio_read64(d->msix_pba); }

/* Waits for the used element of a request posted with vq_post; false on anything else. */
static int used_ok(struct vdev *d) {
    u32 id, len;
    return vq_wait(d, &id, &len) == W_USED;
}

static void post_simple(struct vdev *d) {
    if (d->device_id == DEV_RNG) {
        set_desc(d, 0, (u64)d->buf, 16, D_WRITE, 0);
        vq_post(d, 0);
    } else {
        volatile struct blk_hdr *h = (volatile struct blk_hdr *)d->buf;
        h->type = T_FLUSH;
        h->reserved = 0;
        h->sector = 0;
        set_desc(d, 0, (u64)h, 16, D_NEXT, 1);
        set_desc(d, 1, (u64)d->buf + 16, 1, D_WRITE, 0);
        vq_post(d, 0);
    }
}

/* (f) MSI-X abuse: vector numbers past the table, masking and pending bits, garbage
   messages, odd-size and unaligned table accesses, PBA writes, MSI-X off. */
static void hostile_msix(struct vdev *d) {
    case_start(d, "msix");
    u64 c = d->common, e1 = d->msix_table + 16;
    u8 v = d->vec_queue;
    /* Vectors past the table, during setup: the mapping fails and reads NO_VECTOR. */
    if (vdev_begin(d, wanted_features(d))) {
        mmio_write16(c + C_MSIX, 0x7ff);
        check(mmio_read16(c + C_MSIX) == NO_VECTOR, "a configuration vector past the table did not read NO_VECTOR");
        mmio_write16(c + C_QSELECT, 0);
        mmio_write16(c + C_QMSIX, 0x1234);
        check(mmio_read16(c + C_QMSIX) == NO_VECTOR, "a queue vector past the table did not read NO_VECTOR");
        mmio_write16(c + C_QMSIX, d->msix_size);
        check(mmio_read16(c + C_QMSIX) == NO_VECTOR, "queue vector = table size did not read NO_VECTOR");
    }
    recover(d, "vectors past the table");
    /* While the device runs, Keel keeps queue registers as they were at DRIVER_OK. */
    mmio_write16(c + C_QSELECT, 0);
    mmio_write16(c + C_QMSIX, 0x1234);
    puts("KIT:   queue vector 0x1234 written while running reads "); puthex(mmio_read16(c + C_QMSIX)); puts("\n");
    mmio_write16(c + C_QMSIX, 1);

    /* A masked vector: no interrupt, its pending bit set; unmasking delivers it. */
    u32 before = irq_count[v];
    mmio_write32(e1 + 12, 1);
    post_simple(d);
    check(used_ok(d), "msix: a request with its vector masked did not complete");
    u64 p = 0;
    for (int i = 0; i < 200 && !(p & 2); i++) { p = pba(d); if (!(p & 2)) sleep_until_irq(1000); }
    sleep_until_irq(2000);
    check(irq_count[v] == before, "msix: a masked vector interrupted");
    check(p & 2, "msix: a masked vector did not set its pending bit");
    /* Garbage messages while masked: routes to nowhere, NMI/INIT/ExtINT delivery modes. */
    static const u32 garbage[][3] = {{0xdeadbeef, 0x12345678, 0xffffffff}, {0, 0, 0},
                              {0xfee00000, 0, 0x400 | 0x21}, {0xfee00000, 0, 0x500}, {0xffffffff, 0xffffffff, 0x700}};
    for (int i = 0; i < 5; i++) {
        mmio_write32(e1, garbage[i][0]);
        mmio_write32(e1 + 4, garbage[i][1]);
        mmio_write32(e1 + 8, garbage[i][2]);
    }
    /* Entries past the table: ignored; reads all-ones. */
    for (u64 off = 16 * d->msix_size; off < 0x2000; off += 0x3f0) {
        mmio_write32(d->msix_table + (off & ~3ULL), 0xfee00000);
        mmio_write64(d->msix_table + (off & ~7ULL), ~0ULL);
        check(mmio_read32(d->msix_table + (off & ~3ULL)) == 0xffffffff, "msix: an entry past the table does not read all-ones");
    }
    /* Odd sizes and unaligned accesses to entry 1 (the PCI spec leaves them undefined; Keel
       ignores them). The values keep fixed delivery wherever they could land. */
    for (int o = 0; o < 16; o++) {
        mmio_write8(e1 + o, 0x20);
        (void)mmio_read8(e1 + o);
        if (o < 15) { mmio_write16(e1 + o, 0x0020); (void)mmio_read16(e1 + o); }
        if (o % 4 && o < 13) { mmio_write32(e1 + o, 0xfee00000); (void)mmio_read32(e1 + o); }
        if (o % 8 && o < 9) { mmio_write64(e1 + o, ~0ULL); (void)mmio_read64(e1 + o); }
    }
    /* The PBA is read-only. */
    mmio_write64(d->msix_pba, 0);
    mmio_write32(d->msix_pba, 0);
    mmio_write8(d->msix_pba, 0);
    check(pba(d) & 2, "msix: a write to the PBA cleared a pending bit");
    /* A sane message again with 8-byte accesses, then unmask: the pending interrupt arrives. */
    mmio_write64(e1, msi_address());
    mmio_write64(e1 + 8, v);                          /* data = vector, control = 0: unmasked */
    check(mmio_read64(e1) == msi_address() && mmio_read64(e1 + 8) == v, "msix: an entry written with 8-byte accesses does not read back");
    check(wait_irq(v, before, 2000), "msix: unmasking a vector did not deliver its pending interrupt");
    check(!(pba(d) & 2), "msix: the pending bit stayed set after delivery");
    /* Function mask: pending while masked, delivered when cleared. */
    before = irq_count[v];
    msix_control(d, 0xc000);
    post_simple(d);
    check(used_ok(d), "msix: a request under the function mask did not complete");
    sleep_until_irq(2000);
    check(irq_count[v] == before, "msix: the function mask did not hold the interrupt");
    msix_control(d, 0x8000);
    check(wait_irq(v, before, 2000), "msix: clearing the function mask did not deliver the interrupt");
    /* MSI-X off: no message; the ISR says a queue interrupt happened. */
    (void)mmio_read8(d->isr);
    before = irq_count[v];
    msix_control(d, 0);
    post_simple(d);
    check(used_ok(d), "msix: a request with MSI-X disabled did not complete");
    sleep_until_irq(2000);
    check(irq_count[v] == before, "msix: an interrupt arrived with MSI-X disabled");
    check(mmio_read8(d->isr) & 1, "msix: ISR bit 0 not set with MSI-X disabled");
    msix_control(d, 0x8000);
    recover(d, "msix");
    case_done(d, "msix");
}

void test_virtio_hostile(struct boot *b) {
    ram_top = b->ram_top;
    irq_setup();
    /* dev=blk or dev=rng attacks one device (the other stays on the bus); both by default. */
    const char *only = param(b->cmdline, "dev");
    static const u16 ids[] = {DEV_BLK, DEV_RNG};
    int attacked = 0;
    for (int i = 0; i < 2; i++) {
        struct vdev dev, *d = &dev;
        if (!find_device(ids[i], 0, d, i)) { fail("a virtio-blk and a virtio-rng device are needed"); continue; }
        if (only && !(only[0] == d->name[0] && only[1] == d->name[1] && only[2] == d->name[2])) continue;
        attacked++;
        puts("KIT: hostile "); puts(d->name); puts(" ram_top="); puthex(ram_top); puts("\n");
        if (!vdev_init(d, wanted_features(d)) || !normal_request(d)) {
            fail("device does not work before the hostile cases");
            continue;
        }
        hostile_garbage(d);
        hostile_outside_ram(d);
        hostile_loops(d);
        hostile_overflow(d);
        hostile_rings(d);
        hostile_msix(d);
        status_set(d, 0);
        puts("KIT: hostile "); puts(d->name); puts(" done\n");
    }
    check(attacked > 0, "dev= names no device");
    puts("KIT: virtio-hostile done\n");
}
