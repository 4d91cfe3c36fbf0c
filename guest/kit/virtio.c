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
#include "virtio_dev.h"

static u8 ring_pages[2][4096] __attribute__((aligned(4096)));
static u8 buf_pages[2][8192] __attribute__((aligned(4096)));

/* ---- small helpers ---- */

static void put2hex(u32 v) { putc("0123456789abcdef"[(v >> 4) & 0xf]); putc("0123456789abcdef"[v & 0xf]); }
static void put4hex(u32 v) { put2hex(v >> 8); put2hex(v); }
/* Zeroes `n` bytes (a multiple of 8, 8-aligned) a qword at a time: every instruction of this
   guest is emulated under PVM, so fewer is faster. */
void zero(volatile void *p, u32 n) {
    volatile u64 *q = (volatile u64 *)p;
    for (u32 i = 0; i < n / 8; i++) q[i] = 0;
}

/* Byte `i` of the test disk the host creates, and what the guest writes to sector 1. */
static u8 disk_byte(u64 i) { return (u8)((i >> 9) * 31 + i * 7 + 3); }
static u8 written_byte(u32 j) { return (u8)(j * 5 + 0x4b); }

/* A fixed-seed xorshift: every run makes the same accesses. */
u64 prng = 0x9e3779b97f4a7c15ULL;
u64 rnd(void) { prng ^= prng << 13; prng ^= prng >> 7; prng ^= prng << 17; return prng; }

/* ---- configuration space ---- */

u64 cfg(int slot, u32 off) { return ECAM_BASE + ((u64)slot << 15) + off; }
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
int find_device(u16 device_id, int nth, struct vdev *d, int index) {
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

void status_set(struct vdev *d, u8 s) { mmio_write8(d->common + C_STATUS, s); }
u8 status_get(struct vdev *d) { return mmio_read8(d->common + C_STATUS); }

static void msix_entry(struct vdev *d, int i, u64 addr, u32 data, u32 ctl) {
    u64 e = d->msix_table + 16 * i;
    mmio_write32(e, (u32)addr);
    mmio_write32(e + 4, (u32)(addr >> 32));
    mmio_write32(e + 8, data);
    mmio_write32(e + 12, ctl);
}
void msix_control(struct vdev *d, u16 v) { mmio_write16(cfg(d->slot, d->msix_cap + 2), v); }
u64 msi_address(void) { return 0xfee00000ULL | (u64)(mmio_read32(LAPIC + 0x20) >> 24) << 12; }

/* Reset, ACKNOWLEDGE, DRIVER, features (VERSION_1 and what `want` names), FEATURES_OK, and
   MSI-X entries 0 (configuration) and 1 (queue 0) to this CPU. */
int vdev_begin(struct vdev *d, u64 want) {
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
void queue_program(struct vdev *d, u16 size, u64 desc, u64 avail, u64 used) {
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

u64 ring_desc(struct vdev *d) { return (u64)d->ring; }
u64 ring_avail(struct vdev *d) { return (u64)d->ring + 0x400; }
u64 ring_used(struct vdev *d) { return (u64)d->ring + 0x800; }

/* The whole bring-up with the driver's own rings; checks every register it wrote. */
int vdev_init(struct vdev *d, u64 want) {
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

void set_desc(struct vdev *d, u16 i, u64 addr, u32 len, u16 flags, u16 next) {
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
void vq_post(struct vdev *d, u16 head) {
    vq_make_avail(d, head);
    mmio_write16(d->q.notify, 0);
}


/* Waits (hlt, woken by the MSI or a 1 ms timer) for a used element or DEVICE_NEEDS_RESET. */
int vq_wait(struct vdev *d, u32 *id, u32 *len) {
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
int wait_irq(u8 v, u32 before, int ms) {
    for (int i = 0; i < ms && irq_count[v] == before; i++) sleep_until_irq(1000);
    return irq_count[v] != before;
}

int wait_status(struct vdev *d, u8 bits, int ms) {
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


/* A virtio-blk request: header, optional data (`dev_writes`: the device writes it), status.
   Returns W_*; the status byte and used length come back through the pointers. */
int blk_request(struct vdev *d, u32 type, u64 sector, u64 data, u32 len, int dev_writes,
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

u64 blk_data(struct vdev *d) { return (u64)d->buf + 0x1000; }

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

int normal_request(struct vdev *d) {
    return d->device_id == DEV_RNG ? rng_request(d) : blk_read_check(d);
}

u64 wanted_features(struct vdev *d) {
    return F_VERSION_1 | F_INDIRECT | (d->device_id == DEV_BLK ? F_BLK_FLUSH | F_BLK_SIZE : 0);
}

void irq_setup(void) {
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
