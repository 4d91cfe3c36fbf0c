/*
 * test=chaos seed=N secs=N: a hostile guest. For `secs` seconds it runs rounds, each picking
 * at random: port I/O over 0..0xffff; MMIO over every BAR, the whole BAR window, ECAM, the
 * IOAPIC, the LAPIC and unbacked addresses; PCI configuration writes (BARs moved to random
 * and overlapping addresses, command, MSI-X); or a virtio device brought up with rings in odd
 * places and then fed corrupt descriptors (outside RAM, loops, huge lengths, bad indices),
 * index jumps, notify storms, resets mid-flight and garbage in every register. Keel must
 * survive all of it; a device that stops answering is fine.
 *
 * The guest keeps itself alive, and nothing more: it never lets a device DMA below SCRATCH
 * (its code, stack and page tables), so every address it hands a device is in that device's
 * scratch area or where no RAM is; MSI-X, IOAPIC and LAPIC writes keep fixed delivery of a
 * vector >= 0x20 (no NMI/INIT/SMI, no exception vectors); the ports that end the VM on
 * purpose get values that do not; the UART and the LAPIC are put back before it prints or
 * sleeps. A progress line every ~5 s, `KIT-PASS chaos` at the end, then `exit=` as usual.
 */
#include "kit.h"
#include "chaos.h"
#include "virtio_dev.h"

#define SCRATCH 0x800000ULL             /* below: the kit's own memory */
#define AREA 0x100000ULL                /* scratch RAM per device */
#define MAXDEV 8
#define MAXQ 8
#define IOAPIC 0xfec00000ULL
#define COM1 0x3f8
#define DEV_BALLOON 0x1045

struct cq { u16 size, idx; u64 desc, avail, used; };
struct cdev {
    struct vdev v;                      /* as probed at boot */
    u64 cur;                            /* where BAR 0 is now */
    u64 area;
    int balloon;
    u16 nq;                             /* queues we track (<= MAXQ) */
    struct cq q[MAXQ];
};

static struct cdev devs[MAXDEV];
static int ndev;
static u64 ram_top;
static u32 lapic_id;
static char cmdline_copy[512];
/* What the guest did, for the progress lines. */
static u64 n_port, n_mmio, n_cfg, n_chains, n_notify, n_resets, n_broken, n_used, n_bringups;

static u32 rn(u32 n) { return n ? (u32)(rnd() % n) : 0; }

/* ---- the clock ---- */

static u64 tsc_per_ms, tsc0;
static inline u64 rdtsc(void) { u32 lo, hi; __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi)); return (u64)hi << 32 | lo; }

int clock_init(void) {
    mmio_write32(LAPIC + 0x320, 0x10000 | KIT_TIMEOUT_VECTOR);  /* masked one-shot */
    mmio_write32(LAPIC + 0x380, 0xffffffff);
    u32 c0 = mmio_read32(LAPIC + 0x390), c = c0;
    u64 t0 = rdtsc();
    for (int i = 0; i < 2000000 && c0 - c < 20000000; i++) c = mmio_read32(LAPIC + 0x390);
    u64 t1 = rdtsc();
    mmio_write32(LAPIC + 0x380, 0);
    u64 ns = c0 - c;
    tsc_per_ms = ns >= 1000000 ? (t1 - t0) * 1000000 / ns : 0;
    if (tsc_per_ms < 100000 || tsc_per_ms > 100000000) tsc_per_ms = 0;  /* 0.1-100 GHz */
    tsc0 = rdtsc();
    puts("KIT: clock tsc_per_ms="); putdec(tsc_per_ms); puts("\n");
    return tsc_per_ms != 0;
}
u64 clock_ms(void) { return tsc_per_ms ? (rdtsc() - tsc0) / tsc_per_ms : 0; }

/* ---- keeping the guest alive ---- */

static void uart_restore(void) {
    outb(COM1 + 3, 0x03);                   /* 8N1, divisor latch off */
    outb(COM1 + 1, 0x00);                   /* no interrupts */
    outb(COM1 + 4, 0x08);                   /* OUT2, no loopback */
}

/* Software-enabled, ID as at boot, nothing blocked or storming, LINT0 (the PIC) masked. */
static void lapic_sane(void) {
    mmio_write32(LAPIC + 0x20, lapic_id << 24);
    mmio_write32(LAPIC + 0xf0, 0x1ff);
    mmio_write32(LAPIC + 0x80, 0);
    mmio_write32(LAPIC + 0x380, 0);
    mmio_write32(LAPIC + 0x3e0, 0xb);
    mmio_write32(LAPIC + 0x320, 0x10000 | KIT_TIMEOUT_VECTOR);
    for (u32 r = 0x330; r <= 0x370; r += 0x10) mmio_write32(LAPIC + r, 0x10000 | 0x3f);
    mmio_write32(LAPIC + 0x2f0, 0x10000 | 0x3f);
    mmio_write32(LAPIC + 0xe0, 0xffffffff);
}

static void nap(u32 us) { lapic_sane(); sleep_until_irq(us); }

static u32 safe_msi_data(u32 v) { return (v & ~0x700u) | 0x20; }

/* Scratch RAM the CPU may write: the device areas and everything above them. */
static int in_scratch(u64 a, u64 n) { return a >= SCRATCH && a + n >= a && a + n <= ram_top; }

/* An address to hand device `c`: mostly in its own area (any alignment), else where no RAM
   is, or straddling the end of RAM. The balloon reads frame numbers from its buffers, so
   its rings (`ring`) and buffers live in separate halves and never straddle anything. */
static u64 dma_addr(struct cdev *c, u64 r, int ring) {
    u64 lo = c->area, span = AREA;
    if (c->balloon) {
        if (ring) span = AREA / 2 - 0x4000;
        else { lo += AREA / 2; span = AREA / 2; }
    }
    switch ((r >> 4) & 15) {
    case 9: return lo + ((r >> 12) % span & ~0xfffULL);
    case 10: return FAR_AWAY + ((r >> 12) & 0xffff);
    case 11: return c->balloon ? FAR_AWAY : ram_top - ((r >> 12) & 0x1fff);
    case 12: return LAPIC + ((r >> 12) & 0xfff);
    case 13: return PCI_MMIO_START + ((r >> 12) & 0x1fffffff);
    case 14: return ~0ULL - ((r >> 12) & 0xfff);
    case 15: return 0xa0000 + ((r >> 12) & 0x3ffff);           /* VGA hole, ROM */
    default: return lo + (r >> 12) % span;
    }
}

static u32 dma_len(u64 r) {
    switch (r & 7) {
    case 0: return 0;
    case 1: return 0xffffffff;
    case 2: return 0x80000000u | (u32)(r >> 8);
    case 3: return 512 * (1 + (u32)((r >> 8) & 7));
    case 4: return 1 + (u32)((r >> 8) & 15);
    default: return (u32)((r >> 8) & 0xfff);
    }
}

/* A value for a garbage write: 0, 0..3, all-ones, a byte, or anything. */
static u64 garbage(u64 r) {
    switch ((r >> 32) & 3) {
    case 0: return (r >> 40) & 1 ? 0 : (r >> 41) & 3;
    case 1: return ~0ULL;
    case 2: return (r >> 40) & 0xff;
    default: return r * 0x9e3779b97f4a7c15ULL;
    }
}

static void poke(u64 a, u32 size, int read, u64 v) {
    mmio_poke(a, size, read, v);
    n_mmio++;
}

/* ---- BAR 0 of a device, wherever it is now ---- */

static int bar_live(struct cdev *c) { return c->cur >= PCI_MMIO_START && c->cur + BAR_SIZE <= PCI_MMIO_END; }
static u64 common_off(struct cdev *c) { return c->v.common - c->v.bar; }
static void bar_w16(struct cdev *c, u64 off, u16 v) { if (bar_live(c)) mmio_write16(c->cur + off, v); }
static u16 bar_r16(struct cdev *c, u64 off) { return bar_live(c) ? mmio_read16(c->cur + off) : 0xffff; }

/* Fresh harmless ring addresses for every queue (a reset zeroes them: a ring at 0 would let
   the device write the kit's low memory and read descriptors from it). */
static void queues_safe(struct cdev *c) {
    u64 co = common_off(c);
    for (u16 q = 0; q < c->v.num_queues && bar_live(c); q++) {
        mmio_write16(c->cur + co + C_QSELECT, q);
        for (int w = 0; w < 3; w++) mmio_write64(c->cur + co + C_QDESC + 8 * w, dma_addr(c, rnd(), 1));
    }
}

/* A write to BAR 0 at `off`, except that queue addresses get dma_addr values and MSI-X data
   keeps fixed delivery; a status write (maybe a reset) is followed by safe queue addresses. */
static void bar_write(struct cdev *c, u64 off, u32 size, u64 v) {
    if (!bar_live(c)) return;
    u64 co = common_off(c);
    u64 toff = c->v.msix_table - c->v.bar, tend = c->v.msix_pba - c->v.bar;
    if (off < co + C_QUSED + 8 && off + size > co + C_QDESC) {
        u64 w = off < co + C_QDESC ? 0 : (off - co - C_QDESC) / 8;
        mmio_write64(c->cur + co + C_QDESC + 8 * (w > 2 ? 2 : w), dma_addr(c, v, 1));
        n_mmio++;
        return;
    }
    if (off < tend && off + size > toff) {
        u64 e = off < toff ? toff : toff + ((off - toff) & ~15ULL);
        if (off < e + 12 && off + size > e + 8) {
            mmio_write32(c->cur + e + 8, safe_msi_data((u32)v));
            n_mmio++;
            return;
        }
    }
    poke(c->cur + off, size, 0, v);
    if (off <= co + C_STATUS && off + size > co + C_STATUS) queues_safe(c);
}

static void status_write(struct cdev *c, u8 s) { bar_write(c, common_off(c) + C_STATUS, 1, s); }
static u8 status_read(struct cdev *c) { return bar_live(c) ? mmio_read8(c->cur + common_off(c) + C_STATUS) : 0xff; }

/* A random access somewhere in BAR 0, biased towards the structures. */
static void bar_garbage(struct cdev *c) {
    u64 r = rnd(), sel = r & 15, off = (r >> 8) & 0xffff;
    u64 toff = c->v.msix_table - c->v.bar, poff = c->v.msix_pba - c->v.bar;
    if (sel < 5) off = common_off(c) + off % COMMON_LEN;
    else if (sel == 5) off = (c->v.isr - c->v.bar) + (off & 15);
    else if (sel < 8) off = (c->v.devcfg - c->v.bar) + (off & 63);
    else if (sel < 10) off = (c->v.notify - c->v.bar) + (off & 31);
    else if (sel < 13) off = toff + off % (16ULL * c->v.msix_size + 16);
    else if (sel == 13) off = poff + (off & 15);
    else off &= BAR_SIZE - 1;
    u32 size = 1u << ((r >> 24) & 3);
    if ((r >> 26) & 3) off &= ~(u64)(size - 1);
    if (off + size > BAR_SIZE) off = BAR_SIZE - size;
    if (((r >> 28) & 3) == 0) { if (bar_live(c)) poke(c->cur + off, size, 1, 0); }
    else bar_write(c, off, size, garbage(r));
}

/* ---- configuration space ---- */

static struct cdev *dev_at(int slot) {
    for (int i = 0; i < ndev; i++) if (devs[i].v.slot == slot) return &devs[i];
    return 0;
}

static void refresh_bar(struct cdev *c) { c->cur = mmio_read32(cfg(c->v.slot, 0x10)) & ~0xfULL; }

/* A configuration write (ECAM or 0xCF8/0xCFC). A write into the PCI_CFG window's data lands
   in BAR 0: aim the window at harmless registers first. */
static void cfg_write(int slot, int fn, u32 reg, u32 size, u32 v, int ports) {
    struct cdev *c = fn == 0 ? dev_at(slot) : 0;
    if (ports) reg &= 0xff;
    if (c && c->v.cfg_cap && reg < c->v.cfg_cap + 20u && reg + size > c->v.cfg_cap + 16u) {
        static const u32 safe[] = {0x0, 0x4, 0x8, 0xc, 0x10, 0x18, 0x1c, 0x1000, 0x2000, 0x2010, 0x3000, 0x6000};
        mmio_write8(cfg(slot, c->v.cfg_cap + 4), 0);
        mmio_write32(cfg(slot, c->v.cfg_cap + 8), safe[rn(sizeof(safe) / sizeof(safe[0]))]);
        mmio_write32(cfg(slot, c->v.cfg_cap + 12), 4);
    }
    if (ports) {
        outl(0xcf8, 0x80000000u | (u32)slot << 11 | (u32)fn << 8 | (reg & 0xfc));
        u16 port = 0xcfc + (reg & 3);
        if (size == 1) outb(port, (u8)v); else if (size == 2) outw(port, (u16)v); else outl(port, v);
    } else {
        u64 a = ECAM_BASE + ((u64)slot << 15) + ((u64)fn << 12) + reg;
        if (size == 1) mmio_write8(a, (u8)v); else if (size == 2) mmio_write16(a, (u16)v); else mmio_write32(a, v);
    }
    n_cfg++;
    if (c && reg < 0x14 && reg + size > 0x04) refresh_bar(c);
}

/* BARs, command registers and MSI-X back as Keel assigned them (decoding off around it). */
static void pci_restore_all(void) {
    for (int i = 0; i < ndev; i++) {
        struct cdev *c = &devs[i];
        mmio_write16(cfg(c->v.slot, 4), 0);
        mmio_write32(cfg(c->v.slot, 0x10), c->v.bar0_reg);
        for (int b = 1; b < 6; b++) mmio_write32(cfg(c->v.slot, 0x10 + 4 * b), 0);
    }
    for (int i = 0; i < ndev; i++) {
        struct cdev *c = &devs[i];
        mmio_write16(cfg(c->v.slot, c->v.msix_cap + 2), 0x8000);
        mmio_write16(cfg(c->v.slot, 4), c->v.command);
        c->cur = c->v.bar;
    }
}

static void cfg_round(void) {
    int ports = rn(4) == 0;
    for (int i = 0; i < 60; i++) {
        u64 r = rnd();
        int slot = rn(4) == 0 ? (int)rn(32) : ndev ? devs[rn(ndev)].v.slot : 0;
        struct cdev *c = dev_at(slot), *o = ndev ? &devs[rn(ndev)] : 0;
        u32 reg = (u32)(r >> 8) & 0xfff, size = 1u << ((r >> 24) % 3), v = (u32)garbage(r);
        switch (r & 7) {
        case 0: case 1:                                      /* BAR 0 somewhere */
            reg = 0x10; size = 4;
            switch ((r >> 28) & 3) {
            case 0: v = (u32)(PCI_MMIO_START + ((r >> 32) % 0x4000) * BAR_SIZE); break;
            case 1: v = o ? o->v.bar0_reg : v; break;       /* on top of another device */
            case 2: v = c ? c->v.bar0_reg : v; break;
            default: break;
            }
            break;
        case 2: reg = 0x10 + 4 * rn(6); size = 4; break;     /* any BAR */
        case 3: reg = 4; size = 2; v = rn(4) ? (v & 0x7) : v; break;  /* command */
        case 4: if (c) { reg = c->v.msix_cap + 2; size = 2; v = rn(2) ? (v & 0xc000) : v; } break;
        case 5: reg = 0x40 + (reg & 0x7f); break;            /* the capabilities */
        default: break;
        }
        if ((r >> 30) & 1) reg &= ~(size - 1);
        if (reg + size > 0x1000) reg = 0x1000 - size;
        if (((r >> 31) & 7) == 0) {
            u64 a = cfg(slot, reg & ~3u);
            (void)mmio_read32(a);
            n_cfg++;
        } else {
            cfg_write(slot, rn(8) == 0 ? (int)rn(8) : 0, reg, size, v, ports);
        }
    }
}

/* ---- ports ---- */

static const u16 hot_ports[] = {0x20, 0x21, 0x40, 0x41, 0x42, 0x43, 0x60, 0x61, 0x64, 0x70, 0x71,
                                0x80, 0x92, 0xa0, 0xa1, 0x3f8, 0x3f9, 0x3fa, 0x3fb, 0x3fc, 0x3fd,
                                0x3fe, 0x3ff, 0x4d0, 0x4d1, 0x510, 0x600, 0x601, 0x602, 0xcf8,
                                0xcf9, 0xcfc, 0xcfd, 0xcfe, 0xcff};

static void port_round(void) {
    for (int i = 0; i < 150; i++) {
        u64 r = rnd();
        u16 port = (r & 1) ? hot_ports[(r >> 1) % (sizeof(hot_ports) / sizeof(hot_ports[0]))] : (u16)(r >> 8);
        if ((r >> 24) & 1) port += (u16)((r >> 25) & 3);
        u32 size = 1u << ((r >> 27) % 3);
        u32 v = (u32)garbage(r);
        n_port++;
        if (((r >> 29) & 3) == 0) {
            if (size == 1) (void)inb(port); else if (size == 2) (void)inw(port); else (void)inl(port);
            continue;
        }
        /* The ports that end the VM on purpose get everything but that. */
        if (port == 0x600) v &= ~0x20u;                      /* no SLP_EN */
        if (port == 0x602 && (u8)v == 1) v ^= 3;             /* not the reset value */
        if (port == 0x64 && (u8)v == 0xfe) v ^= 1;           /* not the reset command */
        if (port == 0xcf9) v &= ~0x04u;                      /* no reset */
        if (port >= 0xcfc && port <= 0xcff) {
            u32 addr = inl(0xcf8);
            if ((addr & 0x80000000u) && ((addr >> 16) & 0xff) == 0) {
                cfg_write((int)(addr >> 11) & 31, (int)(addr >> 8) & 7, (addr & 0xfc) + (port - 0xcfc), size, v, 1);
                continue;
            }
        }
        if (size == 1) outb(port, (u8)v); else if (size == 2) outw(port, (u16)v); else outl(port, v);
    }
    uart_restore();
}

/* ---- memory-mapped I/O ---- */

static void window_write(u64 a, u32 size, u64 v) {
    for (int i = 0; i < ndev; i++) {
        struct cdev *c = &devs[i];
        if (bar_live(c) && a >= c->cur && a < c->cur + BAR_SIZE) {
            if (a + size > c->cur + BAR_SIZE) return;
            bar_write(c, a - c->cur, size, v);
            for (int j = i + 1; j < ndev; j++)
                if (devs[j].cur == c->cur) queues_safe(&devs[j]);
            return;
        }
    }
    poke(a, size, 0, v);
}

static void mmio_round(void) {
    for (int i = 0; i < ndev; i++) refresh_bar(&devs[i]);
    for (int i = 0; i < 150; i++) {
        u64 r = rnd(), a;
        u32 size = 1u << ((r >> 8) & 3);
        int read = ((r >> 10) & 3) == 0;
        u64 v = garbage(rnd());
        switch (r & 7) {
        case 0: case 1: case 2:
            if (ndev) bar_garbage(&devs[rn(ndev)]);
            continue;
        case 3:                                              /* anywhere in the BAR window */
            a = (PCI_MMIO_START + ((r >> 12) % (PCI_MMIO_END - PCI_MMIO_START))) & ~(u64)(size - 1);
            if (read) poke(a, size, 1, 0); else window_write(a, size, v);
            continue;
        case 4: {                                            /* ECAM, any function */
            u32 off = (u32)(r >> 12) % ECAM_BUS_SIZE;
            if (size == 8) size = 4;
            off &= ~(size - 1);
            if (read) poke(ECAM_BASE + off, size, 1, 0);
            else cfg_write((int)(off >> 15) & 31, (int)(off >> 12) & 7, off & 0xfff, size, (u32)v, 0);
            continue;
        }
        case 5: {                                            /* IOAPIC: select, then window */
            u32 sel = (u32)(r >> 12) & 0x3f;
            mmio_write32(IOAPIC, sel);
            u32 w = (u32)v;
            if (sel >= 0x10 && !(sel & 1)) w = (w & ~0x700u) | ((w & 0xff) < 0x20 ? 0x20 : 0);
            if (read) (void)mmio_read32(IOAPIC + 0x10); else mmio_write32(IOAPIC + (rn(8) ? 0x10 : 0x40), w);
            n_mmio += 2;
            continue;
        }
        case 6: {                                            /* LAPIC, never the ICR */
            u32 reg = (u32)(r >> 12) & 0x3f0;
            u32 w = (u32)v;
            if (reg == 0x300 || reg == 0x310) reg = 0xb0;
            if ((reg >= 0x320 && reg <= 0x370) || reg == 0x2f0) w = (w & ~0x700u) | ((w & 0xff) < 0x20 ? 0x20 : 0);
            if (reg == 0xf0) w |= 0x20;
            if (read) (void)mmio_read32(LAPIC + reg); else mmio_write32(LAPIC + reg, w);
            n_mmio++;
            continue;
        }
        default: {                                           /* no device, or the ROM */
            static const u64 holes[][2] = {{0xa0000, 0x40000}, {0xe0000, 0x20000}, {0xe0100000ULL, 0x1eb00000ULL},
                                           {0xfec01000ULL, 0x1ff000}, {0xfee01000ULL, 0x11ff000ULL}};
            u32 h = rn(6);
            if (h == 5) a = ram_top + ((r >> 12) % (PCI_MMIO_START - ram_top));
            else a = holes[h][0] + ((r >> 12) % holes[h][1]);
            a &= ~(u64)(size - 1);
            poke(a, size, read, v);
        }
        }
    }
    lapic_sane();
}

/* ---- virtqueues ---- */

static u64 notify_addr(struct cdev *c, u16 q) { return c->cur + (c->v.notify - c->v.bar) + (u64)q * c->v.notify_mult; }

static void notify(struct cdev *c, u16 q) {
    if (!bar_live(c)) return;
    mmio_write16(notify_addr(c, q), q);
    n_notify++;
}

/* What a request's first buffer holds: garbage, with the fields a device parses made
   plausible half of the time (a block request, a vsock header, a net header, frame numbers). */
static void fill_buffer(struct cdev *c, u64 a, u32 len) {
    if (len > 64) len = 64;
    if (!in_scratch(a, 64)) return;
    volatile u8 *p = (volatile u8 *)a;
    if (c->balloon) {
        volatile u32 *pfn = (volatile u32 *)(a & ~3ULL);
        u64 lo = SCRATCH >> 12, n = (ram_top - SCRATCH) >> 12;
        for (u32 i = 0; i < 16; i++) {
            u64 r = rnd();
            switch (r & 3) {
            case 0: pfn[i] = (u32)(lo + (r >> 8) % n); break;            /* scratch: released */
            case 1: pfn[i] = (u32)(ram_top >> 12) + (u32)((r >> 8) & 0xffff); break;  /* no RAM */
            case 2: pfn[i] = (u32)(r >> 32) | 0x100000u; break;         /* far above 4 GiB */
            default: pfn[i] = (r >> 8) & 1 ? (u32)((r >> 9) & 7) : 0xa0 + (u32)((r >> 9) & 0x5f); break;
            }
        }
        return;
    }
    for (u32 i = 0; i + 8 <= 64; i += 8) *(volatile u64 *)(p + i) = garbage(rnd());
    if (rn(2)) return;
    u64 r = rnd();
    switch (c->v.device_id) {
    case DEV_BLK: {
        static const u32 types[] = {T_IN, T_OUT, T_FLUSH, T_GET_ID, 11, 13};
        *(volatile u32 *)p = types[rn(6)];
        *(volatile u64 *)(p + 8) = (r & 3) ? (r >> 8) & 0x1fff : garbage(r);
        break;
    }
    case 0x1053:                                             /* vsock: a header */
        *(volatile u64 *)p = 3 + rn(2);                      /* src_cid */
        *(volatile u64 *)(p + 8) = rn(4) ? 2 : garbage(r);   /* dst_cid: the host */
        *(volatile u32 *)(p + 16) = 1024 + rn(4);            /* src_port */
        *(volatile u32 *)(p + 20) = rn(4) ? 1000 + rn(4) : (u32)r;  /* dst_port */
        *(volatile u32 *)(p + 24) = rn(2) ? rn(64) : (u32)garbage(r);  /* len */
        *(volatile u16 *)(p + 28) = rn(4) ? 1 : (u16)r;       /* type: stream */
        *(volatile u16 *)(p + 30) = (u16)(1 + rn(7));         /* op */
        *(volatile u32 *)(p + 36) = rn(2) ? 65536 : (u32)r;   /* buf_alloc */
        break;
    case 0x1041:                                             /* net: a header, then a frame */
        *(volatile u64 *)p = rn(2) ? 0 : r;
        break;
    default:
        break;
    }
}

/* A chain of 1-6 descriptors at a random head: addresses from dma_addr, lengths from
   dma_len, random flags (indirect tables too), nexts that run on, loop or leave the table. */
static void post_chain(struct cdev *c, u16 qi) {
    struct cq *q = &c->q[qi];
    n_chains++;
    if (!q->size || q->size > 256 || !in_scratch(q->desc, 16ULL * q->size) || !in_scratch(q->avail, 4 + 2ULL * q->size)) {
        notify(c, qi);
        return;
    }
    volatile struct desc *d = (volatile struct desc *)q->desc;
    u16 head = rn(16) ? (u16)rn(q->size) : (u16)rnd(), i = head % q->size;
    u32 n = 1 + rn(6);
    for (u32 k = 0; k < n; k++) {
        u64 r = rnd();
        u64 a = dma_addr(c, r, 0);
        u32 len = dma_len(r >> 40);
        u16 flags = (u16)((k + 1 < n ? D_NEXT : 0) | ((r >> 50) & 1 ? D_WRITE : 0));
        u16 next = (u16)((i + 1) % q->size);
        if (((r >> 51) & 7) == 0) next = (u16)(r >> 54);             /* out of the table */
        else if (((r >> 51) & 7) == 1) next = head;                  /* a loop */
        if (((r >> 56) & 15) == 0 && in_scratch(a, 16 * 8)) {
            flags |= D_INDIRECT;
            volatile struct desc *t = (volatile struct desc *)a;
            for (u16 j = 0; j < 8; j++) {
                u64 tr = rnd();
                t[j].addr = dma_addr(c, tr, 0);
                t[j].len = dma_len(tr >> 40);
                t[j].flags = (u16)((tr >> 50) & 7);
                t[j].next = (tr >> 53) & 1 ? (u16)(j + 1) : (u16)(tr >> 54);
            }
            len = rn(4) ? 16 * (1 + rn(8)) : dma_len(r);
        } else if (k == 0) {
            fill_buffer(c, a, len);
        }
        d[i].addr = a;
        d[i].len = len;
        d[i].flags = flags;
        d[i].next = next;
        i = next % q->size;
    }
    volatile u16 *av = (volatile u16 *)q->avail;
    av[2 + q->idx % q->size] = head;
    mb();
    q->idx += rn(16) ? 1 : (u16)rnd();                               /* an index jump */
    av[1] = q->idx;
    mb();
    notify(c, qi);
}

/* Queue `qi`: a size (mostly the maximum or a power of two below it, sometimes 0, odd or too
   big), rings in one of several layouts (standard, misaligned, all at one address, each
   anywhere dma_addr goes), a vector, enabled (usually). */
static void setup_queue(struct cdev *c, u16 qi) {
    u64 co = common_off(c);
    struct cq *q = &c->q[qi];
    bar_w16(c, co + C_QSELECT, qi);
    u16 max = bar_r16(c, co + C_QSIZE), size;
    u32 pick = rn(16);
    if (pick < 12) size = (u16)(max >> rn(4));
    else if (pick == 12) size = 0;
    else if (pick == 13) size = (u16)rnd();
    else if (pick == 14) size = (u16)(max + 1);
    else size = 3;
    bar_w16(c, co + C_QSIZE, size);
    q->size = bar_r16(c, co + C_QSIZE);
    u64 r = rnd(), base = dma_addr(c, r, 1);
    switch ((r >> 40) & 7) {
    case 0: case 1: case 2: case 3: case 4:
        q->desc = base & ~0xfULL;
        q->avail = q->desc + 16ULL * q->size;
        q->used = (q->avail + 6 + 2ULL * q->size + 3) & ~3ULL;
        break;
    case 5:
        q->desc = base | 1;
        q->avail = base + 16ULL * q->size + 1;
        q->used = q->avail + 6 + 2ULL * q->size + 1;
        break;
    case 6:
        q->desc = q->avail = q->used = base;
        break;
    default:
        q->desc = base;
        q->avail = dma_addr(c, rnd(), 1);
        q->used = dma_addr(c, rnd(), 1);
        break;
    }
    q->idx = 0;
    if (q->size <= 256 && in_scratch(q->avail & ~7ULL, 8)) *(volatile u64 *)(q->avail & ~7ULL) = 0;
    if (q->size <= 256 && in_scratch(q->used & ~7ULL, 8)) *(volatile u64 *)(q->used & ~7ULL) = 0;
    if (bar_live(c)) {
        mmio_write64(c->cur + co + C_QDESC, q->desc);
        mmio_write64(c->cur + co + C_QAVAIL, q->avail);
        mmio_write64(c->cur + co + C_QUSED, q->used);
    }
    bar_w16(c, co + C_QMSIX, rn(4) ? (u16)(1 + qi) : (u16)rnd());
    bar_w16(c, co + C_QENABLE, rn(8) ? 1 : (u16)garbage(rnd()));
}

/* Reset, features (the offered ones, a random subset or garbage), MSI-X entries with safe
   data, every queue, DRIVER_OK. */
static void bring_up(struct cdev *c) {
    u64 co = common_off(c);
    n_bringups++;
    status_write(c, 0);
    status_write(c, S_ACK);
    status_write(c, S_ACK | S_DRIVER);
    bar_write(c, co + C_DFSELECT, 4, 0);
    u64 offered = bar_live(c) ? mmio_read32(c->cur + co + C_DF) : 0;
    bar_write(c, co + C_DFSELECT, 4, 1);
    offered |= bar_live(c) ? (u64)mmio_read32(c->cur + co + C_DF) << 32 : 0;
    u64 want = rn(4) ? offered & (rnd() | F_VERSION_1) : garbage(rnd());
    bar_write(c, co + C_GFSELECT, 4, 0);
    bar_write(c, co + C_GF, 4, (u32)want);
    bar_write(c, co + C_GFSELECT, 4, 1);
    bar_write(c, co + C_GF, 4, (u32)(want >> 32));
    status_write(c, S_READY);
    u64 t = c->v.msix_table - c->v.bar, addr = msi_address();
    for (u16 e = 0; e < c->v.msix_size && bar_live(c); e++) {
        mmio_write64(c->cur + t + 16 * e, rn(8) ? addr : garbage(rnd()));
        mmio_write32(c->cur + t + 16 * e + 8, safe_msi_data(0x60 + rn(0x90)));
        mmio_write32(c->cur + t + 16 * e + 12, rn(8) == 0);
    }
    bar_write(c, co + C_MSIX, 2, rn(4) ? 0 : (u16)rnd());
    for (u16 qi = 0; qi < c->nq; qi++) setup_queue(c, qi);
    status_write(c, rn(8) ? S_READY | S_DRIVER_OK : (u8)rnd());
}

static void observe(struct cdev *c) {
    if (status_read(c) & S_NEEDS_RESET) n_broken++;
    for (u16 qi = 0; qi < c->nq; qi++) {
        struct cq *q = &c->q[qi];
        if (q->size && q->size <= 256 && in_scratch(q->used, 4)) n_used += ((volatile u16 *)q->used)[1] != 0;
    }
}

static void virtio_round(struct cdev *c) {
    pci_restore_all();
    bring_up(c);
    int steps = 10 + (int)rn(40);
    for (int s = 0; s < steps; s++) {
        u16 qi = c->nq ? (u16)rn(c->nq) : 0;
        switch (rn(16)) {
        case 0: case 1: case 2: case 3: case 4: case 5:
            post_chain(c, qi);
            break;
        case 6: {                                            /* a notify storm */
            u32 n = 20 + rn(200);
            for (u32 i = 0; i < n; i++) notify(c, rn(8) ? qi : (u16)rn(c->v.num_queues + 2));
            break;
        }
        case 7:                                              /* a reset mid-flight */
            post_chain(c, qi);
            status_write(c, 0);
            n_resets++;
            if (rn(2)) bring_up(c);
            break;
        case 8:
            status_write(c, (u8)garbage(rnd()));
            break;
        case 9: case 10: case 11:
            bar_garbage(c);
            break;
        case 12:
            bar_write(c, common_off(c) + C_QSELECT, 2, rn(c->v.num_queues + 1));
            bar_write(c, common_off(c) + C_QSIZE + 2 * rn(4), 2, garbage(rnd()));
            break;
        case 13:
            observe(c);
            if (bar_live(c)) (void)mmio_read8(c->cur + (c->v.isr - c->v.bar));
            break;
        default:
            nap(200 + rn(3000));
            break;
        }
    }
    observe(c);
    if (rn(2)) { status_write(c, 0); n_resets++; }
}

/* ---- the test ---- */

/* The ROM area (ACPI and MP tables) is read-only to the guest; devices must not write it
   either (they are handed addresses in it). */
static u64 rom_hash(void) {
    u64 h = 0xcbf29ce484222325ULL;
    for (u64 a = 0xe0000; a < 0x100000; a += 8) h = (h ^ *(volatile u64 *)a) * 0x100000001b3ULL;
    return h;
}

static void progress(u64 round, u64 ms) {
    uart_restore();
    puts("KIT: chaos round "); putdec(round); puts(" t="); putdec(ms / 1000);
    puts(" s ports="); putdec(n_port); puts(" mmio="); putdec(n_mmio); puts(" cfg="); putdec(n_cfg);
    puts(" bringups="); putdec(n_bringups); puts(" chains="); putdec(n_chains); puts(" notifies="); putdec(n_notify);
    puts(" resets="); putdec(n_resets); puts(" needs-reset="); putdec(n_broken); puts(" used="); putdec(n_used);
    puts("\n");
}

void test_chaos(struct boot *b) {
    /* The command line lives in low memory, which the balloon may take: keep a copy. */
    int n = 0;
    for (; b->cmdline && b->cmdline[n] && n < (int)sizeof(cmdline_copy) - 1; n++) cmdline_copy[n] = b->cmdline[n];
    cmdline_copy[n] = 0;
    b->cmdline = cmdline_copy;
    u64 seed = parse_dec(param(b->cmdline, "seed")), secs = parse_dec(param(b->cmdline, "secs"));
    prng = seed * 0x9e3779b97f4a7c15ULL ^ 0x5851f42d4c957f2dULL;
    if (!prng) prng = 1;
    ram_top = b->ram_top;
    irq_setup();
    lapic_id = mmio_read32(LAPIC + 0x20) >> 24;
    lapic_sane();
    int clock = clock_init();
    u64 rom = rom_hash();
    for (int slot = 1; slot < 32 && ndev < MAXDEV; slot++) {
        u32 id = mmio_read32(cfg(slot, 0));
        if ((id & 0xffff) != VIRTIO_VENDOR) continue;
        int nth = 0;
        for (int i = 0; i < ndev; i++) nth += devs[i].v.device_id == (id >> 16);
        struct cdev *c = &devs[ndev];
        if (!find_device((u16)(id >> 16), nth, &c->v, 0)) { fail("a virtio device does not probe cleanly"); return; }
        c->cur = c->v.bar;
        c->area = SCRATCH + AREA * (u64)ndev;
        c->balloon = c->v.device_id == DEV_BALLOON;
        c->nq = c->v.num_queues < MAXQ ? c->v.num_queues : MAXQ;
        puts("KIT: chaos target 00:"); putdec(slot); puts(".0 virtio-"); puts(c->v.name);
        puts(" queues="); putdec(c->v.num_queues); puts(" area="); puthex(c->area); puts("\n");
        ndev++;
    }
    if (ram_top < SCRATCH + AREA * (u64)(ndev + 1)) { fail("too little RAM for the scratch areas (give 64 MiB)"); return; }
    for (int i = 0; i < ndev; i++) queues_safe(&devs[i]);
    puts("KIT: chaos seed="); putdec(seed); puts(" secs="); putdec(secs); puts(" devices="); putdec(ndev);
    puts(clock ? "\n" : " (no clock: bounded by rounds)\n");
    u64 round = 0, next = 5000;
    for (; clock ? clock_ms() < secs * 1000 : round < secs * 20; round++) {
        switch (rn(8)) {
        case 0: port_round(); break;
        case 1: case 2: mmio_round(); break;
        case 3: cfg_round(); break;
        default: if (ndev) virtio_round(&devs[rn(ndev)]); break;
        }
        if (clock && clock_ms() >= next) {
            progress(round, clock_ms());
            next += 5000;
        }
    }
    /* Put everything back, then the VM-ending ports with values that must not end it. */
    pci_restore_all();
    for (int i = 0; i < ndev; i++) status_write(&devs[i], 0);
    lapic_sane();
    uart_restore();
    outb(0x600, 5 << 2);                                     /* S5 without SLP_EN */
    outb(0x600, (3 << 2) | 0x20);                            /* S3: not supported */
    outb(0x602, 0x02);
    outb(0x64, 0xaa);
    outb(0x64, 0xd1);
    outb(0x60, 0xff);
    outb(0xcf9, 0x02);
    progress(round, clock_ms());
    puts(rom_hash() == rom ? "KIT: chaos rom intact\n" : "KIT: chaos rom changed\n");
    puts("KIT: chaos done\n");
}
