/*
 * test=virtio-hostile: a guest that abuses Keel's virtio-pci devices — garbage in every
 * register, descriptors outside RAM, loops, runaway queues, bad rings, MSI-X misuse — and
 * checks after each case that the device still serves a normal request after a reset.
 */
#include "kit.h"
#include "virtio.h"
#include "virtio_dev.h"

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

/* One random access of `size` bytes at `a`: a read, or a write of `v` (chaos.c too). */
void mmio_poke(u64 a, u32 size, int read, u64 v) {
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

/* Lets interrupts already on their way arrive: a device may signal just after the driver
   sees its used element (Keel starts a device on its event loop, so the first request after
   a reset can complete late), so a count taken next sees only what follows. Returns once
   vector `v` has been quiet for ~20 ms, within ~2 s. */
static void settle(u8 v) {
    u32 last = irq_count[v];
    for (int quiet = 0, i = 0; quiet < 20 && i < 2000; i++) {
        sleep_until_irq(1000);
        if (irq_count[v] == last) quiet++;
        else { last = irq_count[v]; quiet = 0; }
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
    settle(v);
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
    settle(v);
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
    settle(v);
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
