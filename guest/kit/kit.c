/*
 * Keel guest test kit: a tiny freestanding guest that boots through Keel's real loader paths
 * (PVH ELF, 64-bit ELF, bzImage) and exercises one behaviour per run, chosen on the kernel
 * command line with `test=NAME`. It reports on COM1 as lines the host test parses:
 *
 *   KIT: <free text>
 *   KIT-PASS <name>            the check held
 *   KIT-FAIL <name>: <why>     the check did not hold
 *
 * and then ends the VM the way the test asks (ACPI S5 power-off unless the test is about
 * another exit). Every check reports; nothing here loops forever without a bound.
 *
 * The PCI and virtio tests (pci-enum, virtio-rng, virtio-blk, virtio-hostile) and the kit's
 * virtio driver are in virtio.c (blk-read-rate in blk_rate.c, the snapshot/restore counter
 * guest snapcount in snapcount.c); kit.h has what the files
 * share. The long-running guests of the chaos test (chaos, blk-soak) are in chaos.c and
 * soak.c; the CPU and memory limit guests (spin, cpu-job, touch-ram) in limits.c.
 */

#include "kit.h"
#include "virtio.h"
#include "limits.h"
#include "chaos.h"

#define KIT_PVH 1
#define KIT_LINUX64 2

#define COM1 0x3f8
#define PM_SLEEP_CONTROL 0x600
#define PM_RESET 0x602
/* One page below Keel's boot page tables (0x9000): code, then the count and per-APIC-ID flags. */
#define AP_BASE 0x8000
#define AP_COUNT (AP_BASE + 0x100)
#define AP_SEEN (AP_BASE + 0x110)
/* Between the PCI ECAM window and the IOAPIC: nothing decodes it. */
#define UNBACKED_MMIO 0xf0000000ULL
#define ROM_BASE 0xe0000ULL
#define TIMER_VECTOR 0x40

extern char ap_trampoline[], ap_trampoline_end[];
extern void timer_isr(void);
extern volatile u32 timer_ticks;

/* ---- serial output ---- */

void putc(char c) {
    for (int i = 0; i < 100000 && !(inb(COM1 + 5) & 0x20); i++)
        ;
    outb(COM1, (u8)c);
}
void puts(const char *s) { while (*s) putc(*s++); }
void putdec(u64 v) {
    char b[24]; int n = 0;
    do { b[n++] = (char)('0' + v % 10); v /= 10; } while (v);
    while (n) putc(b[--n]);
}
void puthex(u64 v) {
    puts("0x");
    int started = 0;
    for (int s = 60; s >= 0; s -= 4) {
        int d = (int)((v >> s) & 0xf);
        if (d || started || s == 0) { putc("0123456789abcdef"[d]); started = 1; }
    }
}

static int failures;
const char *current;
static void pass(void) { puts("KIT-PASS "); puts(current); puts("\n"); }
void fail(const char *why) { failures++; puts("KIT-FAIL "); puts(current); puts(": "); puts(why); puts("\n"); }
void check(int ok, const char *why) { if (!ok) fail(why); }

/* ---- strings ---- */

static int streq_n(const char *a, const char *b, int n) {
    for (int i = 0; i < n; i++) { if (a[i] != b[i]) return 0; if (!a[i]) return 1; }
    return 1;
}
static int slen(const char *s) { int n = 0; while (s[n]) n++; return n; }
/* Finds `key=` in the command line; returns the value's start or 0. */
const char *param(const char *cmdline, const char *key) {
    int k = slen(key);
    for (const char *p = cmdline; p && *p; p++) {
        if ((p == cmdline || p[-1] == ' ') && streq_n(p, key, k) && p[k] == '=') return p + k + 1;
    }
    return 0;
}
static int value_is(const char *v, const char *want) {
    int n = slen(want);
    return v && streq_n(v, want, n) && (v[n] == ' ' || v[n] == 0);
}
u64 parse_dec(const char *v) {
    u64 n = 0;
    while (v && *v >= '0' && *v <= '9') n = n * 10 + (u64)(*v++ - '0');
    return n;
}

/* ---- boot information, from either protocol ---- */

struct hvm_start_info {
    u32 magic, version, flags, nr_modules;
    u64 modlist_paddr, cmdline_paddr, rsdp_paddr, memmap_paddr;
    u32 memmap_entries, reserved;
};
struct hvm_memmap { u64 addr, size; u32 type, reserved; };
struct hvm_mod { u64 paddr, size, cmdline, reserved; };

static void read_boot(struct boot *b, u64 info, int proto) {
    if (proto == KIT_PVH) {
        struct hvm_start_info *si = (struct hvm_start_info *)info;
        b->proto = si->magic == 0x336ec578 ? "pvh" : "pvh-bad-magic";
        b->cmdline = (const char *)si->cmdline_paddr;
        b->rsdp = si->rsdp_paddr;
        b->map_entries = si->memmap_entries;
        struct hvm_memmap *m = (struct hvm_memmap *)si->memmap_paddr;
        for (u32 i = 0; i < si->memmap_entries; i++)
            if (m[i].type == 1) {
                b->ram += m[i].size;
                if (m[i].addr + m[i].size <= 0x100000000ULL && m[i].addr + m[i].size > b->ram_top)
                    b->ram_top = m[i].addr + m[i].size;
            }
        if (si->nr_modules) {
            struct hvm_mod *mod = (struct hvm_mod *)si->modlist_paddr;
            b->initrd = mod->paddr;
            b->initrd_size = mod->size;
        }
    } else {
        u8 *bp = (u8 *)info;
        b->proto = "linux64";
        b->cmdline = (const char *)(u64)*(u32 *)(bp + 0x228);
        b->rsdp = *(u64 *)(bp + 0x70);
        b->map_entries = bp[0x1e8];
        for (u32 i = 0; i < b->map_entries; i++) {
            u8 *e = bp + 0x2d0 + 20 * i;
            if (*(u32 *)(e + 16) == 1) {
                u64 end = *(u64 *)e + *(u64 *)(e + 8);
                b->ram += *(u64 *)(e + 8);
                if (end <= 0x100000000ULL && end > b->ram_top) b->ram_top = end;
            }
        }
        b->initrd = *(u32 *)(bp + 0x218);
        b->initrd_size = *(u32 *)(bp + 0x21c);
    }
}

/* ---- ACPI ---- */

static int sum_ok(const u8 *p, u32 n) { u8 s = 0; for (u32 i = 0; i < n; i++) s += p[i]; return s == 0; }

struct acpi { int ok; u32 lapics; u32 ioapics; u16 sleep_port; u16 reset_port; u8 reset_value; u8 hw_reduced; };

static void read_acpi(u64 rsdp, struct acpi *a) {
    const u8 *r = (const u8 *)rsdp;
    a->ok = 0;
    if (!rsdp || !streq_n((const char *)r, "RSD PTR ", 8) || !sum_ok(r, 20) || !sum_ok(r, 36)) return;
    const u8 *x = (const u8 *)*(u64 *)(r + 24);
    if (!streq_n((const char *)x, "XSDT", 4) || !sum_ok(x, *(u32 *)(x + 4))) return;
    u32 n = (*(u32 *)(x + 4) - 36) / 8;
    for (u32 i = 0; i < n; i++) {
        const u8 *t = (const u8 *)*(u64 *)(x + 36 + 8 * i);
        u32 len = *(u32 *)(t + 4);
        if (!sum_ok(t, len)) return;
        if (streq_n((const char *)t, "APIC", 4)) {
            for (u32 off = 44; off + 2 <= len && t[off + 1]; off += t[off + 1]) {
                if (t[off] == 0 && (*(u32 *)(t + off + 4) & 1)) a->lapics++;
                if (t[off] == 1) a->ioapics++;
            }
        }
        if (streq_n((const char *)t, "FACP", 4)) {
            a->hw_reduced = (*(u32 *)(t + 112) >> 20) & 1;
            a->reset_port = (u16)*(u64 *)(t + 116 + 4);
            a->reset_value = t[128];
            a->sleep_port = (u16)*(u64 *)(t + 244 + 4);
        }
    }
    a->ok = 1;
}

/* ---- ways to end the VM ---- */

static void power_off(u16 sleep_port) {
    outb(sleep_port ? sleep_port : PM_SLEEP_CONTROL, (5 << 2) | (1 << 5));
}

/* ---- tests ---- */

static void test_hello(struct boot *b) {
    puts("KIT: hello via "); puts(b->proto); puts("\n");
    puts("KIT: cmdline: "); puts(b->cmdline ? b->cmdline : "(none)"); puts("\n");
    check(b->cmdline != 0 && param(b->cmdline, "test") != 0, "command line not found");
}

static void test_memory(struct boot *b) {
    puts("KIT: ram="); putdec(b->ram); puts(" entries="); putdec(b->map_entries);
    puts(" initrd="); puthex(b->initrd); puts("+"); putdec(b->initrd_size); puts("\n");
    u64 want = parse_dec(param(b->cmdline, "expect_ram"));
    if (want) check(b->ram == want, "memory map does not add up to expect_ram");
    u64 isize = parse_dec(param(b->cmdline, "expect_initrd"));
    if (isize) {
        check(b->initrd_size == isize, "initrd size differs");
        check((b->initrd & 0xfff) == 0, "initrd not page aligned");
        /* The host fills the initrd with bytes i*7+3 (mod 256). */
        int good = 1;
        for (u64 i = 0; i < b->initrd_size && good; i += 4093)
            good = mem_read8(b->initrd + i) == (u8)(i * 7 + 3);
        check(good, "initrd content differs");
        /* Touch the last byte of RAM the map promises below 4 GiB. */
    }
    /* Every RAM byte of the first region after 1 MiB is writable: probe its last page. */
    u64 top = b->ram < 0xc0000000ULL ? b->ram : 0xc0000000ULL;
    if (top > 0x200000) {
        u64 probe = (top & ~0xfffULL) - 0x1000;
        if (b->initrd && probe >= b->initrd && probe < b->initrd + b->initrd_size) probe = 0x200000;
        mem_write8(probe, 0x5a);
        check(mem_read8(probe) == 0x5a, "RAM near the top is not writable");
    }
}

static void test_acpi(struct boot *b) {
    struct acpi a = {0};
    read_acpi(b->rsdp, &a);
    check(a.ok, "ACPI tables missing or checksums wrong");
    /* The RSDP must also be where a legacy scan of 0xe0000..0xfffff finds it. */
    int found = 0;
    for (u64 p = 0xe0000; p < 0x100000; p += 16)
        if (streq_n((const char *)p, "RSD PTR ", 8)) { found = p == b->rsdp; break; }
    check(found, "RSDP not found by the legacy BIOS-area scan");
    puts("KIT: madt lapics="); putdec(a.lapics); puts(" ioapics="); putdec(a.ioapics);
    puts(" hw_reduced="); putdec(a.hw_reduced); puts(" sleep="); puthex(a.sleep_port);
    puts(" reset="); puthex(a.reset_port); puts("\n");
    u64 want = parse_dec(param(b->cmdline, "cpus"));
    if (want) check(a.lapics == want, "MADT local APIC count differs from cpus=");
    check(a.ioapics == 1, "expected one IOAPIC");
    check(a.hw_reduced == 1, "FADT is not hardware-reduced");
}

/* The MP table, found the way Linux looks for it: the floating pointer at the start of the
 * EBDA, its configuration table, and one enabled processor entry per vCPU. */
static void test_mptable(struct boot *b) {
    const u8 *fp = 0;
    for (u64 p = 0x9fc00; p < 0xa0000; p += 16)
        if (streq_n((const char *)p, "_MP_", 4)) { fp = (const u8 *)p; break; }
    check(fp != 0, "no MP floating pointer in the EBDA");
    if (!fp) return;
    check(sum_ok(fp, 16), "MP floating pointer checksum");
    const u8 *t = (const u8 *)(u64)*(const u32 *)(fp + 4);
    check(streq_n((const char *)t, "PCMP", 4), "MP configuration table signature");
    u16 len = *(const u16 *)(t + 4), count = *(const u16 *)(t + 34);
    check(sum_ok(t, len), "MP configuration table checksum");
    u32 cpus = 0, bsps = 0, ioapics = 0, irqs = 0, off = 44;
    for (u16 i = 0; i < count && off < len; i++) {
        u8 type = t[off];
        if (type == 0) { cpus += t[off + 3] & 1; bsps += (t[off + 3] >> 1) & 1; off += 20; continue; }
        if (type == 2) ioapics++;
        if (type == 3) irqs++;
        off += 8;
    }
    puts("KIT: mptable cpus="); putdec(cpus); puts(" ioapics="); putdec(ioapics);
    puts(" isa irqs="); putdec(irqs); puts("\n");
    check(off == len, "MP entries do not add up to the table length");
    check(bsps == 1, "expected exactly one bootstrap processor");
    u64 want = parse_dec(param(b->cmdline, "cpus"));
    if (want) check(cpus == want, "MP processor count differs from cpus=");
    check(ioapics == 1 && irqs == 16, "expected one IOAPIC and 16 ISA interrupts");
}

static void lapic_icr(u32 dest, u32 low) {
    mmio_write32(LAPIC + 0x310, dest << 24);
    mmio_write32(LAPIC + 0x300, low);
    for (int i = 0; i < 1000 && (mmio_read32(LAPIC + 0x300) & (1 << 12)); i++)
        ;
}

static void test_smp(struct boot *b) {
    struct acpi a = {0};
    read_acpi(b->rsdp, &a);
    u32 n = a.lapics;
    volatile u32 *count = (volatile u32 *)AP_COUNT;
    volatile u8 *seen = (volatile u8 *)AP_SEEN;
    for (int i = 0; i < 256; i++) seen[i] = 0;
    *count = 0;
    for (char *s = ap_trampoline, *d = (char *)AP_BASE; s < ap_trampoline_end; s++, d++) *d = *s;
    u32 bsp = mmio_read32(LAPIC + 0x20) >> 24;
    /* INIT, then SIPI twice, to every CPU but this one (the MP spec's sequence). */
    lapic_icr(0, 0x000c4500);
    lapic_icr(0, 0x000c4600 | (AP_BASE >> 12));
    lapic_icr(0, 0x000c4600 | (AP_BASE >> 12));
    for (u64 spin = 0; spin < 200000000ULL && *count < n - 1; spin++)
        __asm__ volatile("pause");
    puts("KIT: bsp apic id="); putdec(bsp); puts(" aps up="); putdec(*count); puts(" of ");
    putdec(n - 1); puts(" ids:");
    for (u32 i = 0; i < 256; i++) if (seen[i]) { puts(" "); putdec(i); }
    puts("\n");
    check(*count == n - 1, "not every AP came up");
    for (u32 i = 0; i < n; i++)
        if (i != bsp && !seen[i]) { fail("an AP with the expected APIC ID is missing"); break; }
}

static void test_io(struct boot *b) {
    (void)b;
    /* Nothing behind port 0x1234: reads float high, writes vanish. */
    check(inb(0x1234) == 0xff, "unhandled inb is not 0xff");
    check(inw(0x1234) == 0xffff, "unhandled inw is not 0xffff");
    check(inl(0x1234) == 0xffffffff, "unhandled inl is not all-ones");
    outb(0x1234, 0x55); outw(0x1236, 0x5555); outl(0x1238, 0x55555555);
    /* PCI config mechanism #1: the host bridge at 00.0, nothing at 00:1f.0 (all-ones),
       nothing on bus 1, and a disabled address register reads all-ones too. */
    outl(0xcf8, 0x80000000);
    check(inl(0xcfc) == 0x00081b36, "no host bridge at PCI 00:00.0");
    check(inl(0xcf8) == 0x80000000, "PCI address register did not hold its value");
    outl(0xcf8, 0x80000000 | (31 << 11));
    check(inl(0xcfc) == 0xffffffff, "an empty PCI slot answered");
    outl(0xcf8, 0x80010000);
    check(inl(0xcfc) == 0xffffffff, "PCI bus 1 answered");
    outl(0xcf8, 0x00000000);
    check(inl(0xcfc) == 0xffffffff, "PCI data port answered with the address disabled");
    /* The UART scratch register holds what is written. */
    outb(COM1 + 7, 0xa5);
    check(inb(COM1 + 7) == 0xa5, "UART scratch register lost its value");
    /* CMOS: a plausible BCD year and century, and a valid-RAM status. */
    outb(0x70, 0x32);
    u8 century = inb(0x71);
    outb(0x70, 0x0d);
    check(inb(0x71) & 0x80, "CMOS register D says the RTC is invalid");
    check(century == 0x20 || century == 0x21, "CMOS century is not BCD 20 or 21");
    /* i8042: status reads, a non-reset command is ignored. */
    (void)inb(0x64);
    outb(0x64, 0xaa);
    /* POST codes. */
    outb(0x80, 0x42);
    puts("KIT: io checks done\n");
}

static void test_mmio(struct boot *b) {
    (void)b;
    check(mmio_read32(UNBACKED_MMIO) == 0xffffffff, "unbacked MMIO read is not all-ones");
    mmio_write32(UNBACKED_MMIO, 0x12345678);
    check(mmio_read32(UNBACKED_MMIO + 4) == 0xffffffff, "unbacked MMIO read after write changed");
    /* The VGA hole is unbacked too. */
    check(mem_read8(0xa0000) == 0xff, "VGA hole read is not 0xff");
    /* The ROM area is read-only: the RSDP signature survives a write. */
    u8 before = mem_read8(ROM_BASE);
    mem_write8(ROM_BASE, (u8)~before);
    u8 after = mem_read8(ROM_BASE);
    puts("KIT: rom byte before="); puthex(before); puts(" after write="); puthex(after); puts("\n");
    if (value_is(param(b->cmdline, "rom"), "ro")) check(after == before, "a guest write changed the ROM");
}

struct idt_entry { u16 off0, sel; u8 ist, type; u16 off1; u32 off2, zero; };
static struct idt_entry idt[256] __attribute__((aligned(16)));

static void idt_entry_set(int vector, void (*handler)(void)) {
    u64 isr = (u64)handler;
    u16 cs;
    __asm__ volatile("mov %%cs, %0" : "=r"(cs));
    idt[vector] = (struct idt_entry){(u16)isr, cs, 0, 0x8e, (u16)(isr >> 16), (u32)(isr >> 32), 0};
}

static void idt_load(void) {
    struct { u16 limit; u64 base; } __attribute__((packed)) idtr = {sizeof(idt) - 1, (u64)idt};
    __asm__ volatile("lidt %0" : : "m"(idtr));
}

void idt_set(int vector, void (*handler)(void)) {
    idt_entry_set(vector, handler);
    idt_load();
}

/* 256 stubs of 16 bytes each (entry.S): push a dummy error code where the CPU pushes none,
   push the vector, and call kit_isr. */
extern char isr_stubs[];
volatile u32 irq_count[256];

void idt_install_all(void) {
    for (int v = 0; v < 256; v++) idt_entry_set(v, (void (*)(void))(isr_stubs + 16 * v));
    idt_load();
    /* The kit takes interrupts from the LAPIC only. A firmware may have left the legacy PICs
       on, the PIT's IRQ 0 at vector 8 (QEMU's does): mask both so no IRQ looks like a #DF. */
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
}

/* Called from the stubs with interrupts off. */
void kit_isr(u64 vector, u64 *frame) {
    if (vector < 32) {
        /* frame: error code, rip, cs, rflags, rsp, ss */
        puts("KIT-FAIL "); puts(current); puts(": exception "); putdec(vector);
        puts(" error="); puthex(frame[0]); puts(" rip="); puthex(frame[1]); puts("\n");
        power_off(0);
        for (;;) __asm__ volatile("cli; hlt");
    }
    irq_count[vector]++;
    if (vector != 0xff) mmio_write32(LAPIC + 0xb0, 0);
}

void lapic_enable(void) {
    mmio_write32(LAPIC + 0xf0, 0x1ff);          /* software-enable the LAPIC */
    mmio_write32(LAPIC + 0x3e0, 0xb);           /* timer: divide by 1 */
}

void sleep_until_irq(u32 us) {
    /* KVM's LAPIC timer counts at 1 GHz: 1000 ticks a microsecond at divide-by-1. */
    mmio_write32(LAPIC + 0x320, KIT_TIMEOUT_VECTOR);
    mmio_write32(LAPIC + 0x380, us * 1000);
    __asm__ volatile("sti; hlt; cli" : : : "memory");
    mmio_write32(LAPIC + 0x380, 0);             /* disarm: an early wake leaves no stray tick */
}

static void test_hlt(struct boot *b) {
    (void)b;
    idt_set(TIMER_VECTOR, timer_isr);
    lapic_enable();
    u32 wakes = 0;
    for (int round = 0; round < 3; round++) {
        u32 before = timer_ticks;
        mmio_write32(LAPIC + 0x320, TIMER_VECTOR); /* one-shot */
        mmio_write32(LAPIC + 0x380, 200000);
        for (int i = 0; i < 1000 && timer_ticks == before; i++) {
            __asm__ volatile("sti; hlt; cli");
            wakes++;
        }
    }
    puts("KIT: timer ticks="); putdec(timer_ticks); puts(" hlt wakes="); putdec(wakes); puts("\n");
    check(timer_ticks == 3, "LAPIC timer did not wake HLT three times");
}

static void test_console(struct boot *b) {
    (void)b;
    /* Read a line from COM1 (polling), echo it. */
    char line[64]; int n = 0;
    for (u64 spin = 0; spin < 400000000ULL && n < 63; spin++) {
        if (inb(COM1 + 5) & 1) {
            char c = (char)inb(COM1);
            if (c == '\n' || c == '\r') break;
            line[n++] = c;
        }
    }
    line[n] = 0;
    puts("KIT: console got '"); puts(line); puts("'\n");
    check(n > 0, "no console input arrived");
}

static void finish(struct boot *b, const char *exit_how) {
    struct acpi a = {0};
    read_acpi(b->rsdp, &a);
    if (failures == 0) pass();
    puts("KIT: exit via "); puts(exit_how ? exit_how : "poweroff"); puts("\n");
    if (!exit_how || value_is(exit_how, "poweroff")) {
        power_off(a.sleep_port);
    } else if (value_is(exit_how, "acpi-reset")) {
        outb(a.reset_port ? a.reset_port : PM_RESET, a.reset_value ? a.reset_value : 1);
    } else if (value_is(exit_how, "i8042")) {
        outb(0x64, 0xfe);
    } else if (value_is(exit_how, "triple-fault")) {
        struct { u16 limit; u64 base; } __attribute__((packed)) none = {0, 0};
        __asm__ volatile("lidt %0; ud2" : : "m"(none));
    } else if (value_is(exit_how, "bad-fetch")) {
        /* Execute from unbacked guest-physical memory: KVM cannot fetch the instruction. */
        ((void (*)(void))UNBACKED_MMIO)();
    }
    /* Nothing above returned control... unless the exit was ignored. */
    puts("KIT-FAIL exit: the VM is still running\n");
    for (;;) __asm__ volatile("cli; hlt");
}

void kit_main(u64 info, int proto) {
    struct boot b = {0};
    read_boot(&b, info, proto);
    const char *test = param(b.cmdline, "test");
    static const struct { const char *name; void (*fn)(struct boot *); } tests[] = {
        {"hello", test_hello}, {"memory", test_memory}, {"acpi", test_acpi}, {"smp", test_smp},
        {"mptable", test_mptable},
        {"io", test_io},       {"mmio", test_mmio},     {"hlt", test_hlt},   {"console", test_console},
        {"pci-enum", test_pci_enum},         {"virtio-rng", test_virtio_rng},
        {"virtio-blk", test_virtio_blk},     {"virtio-hostile", test_virtio_hostile},
        {"spin", test_spin},                 {"cpu-job", test_cpu_job},
        {"touch-ram", test_touch_ram},
        {"ticks", test_ticks},
        {"blk-read-rate", test_blk_read_rate},
        {"chaos", test_chaos},               {"blk-soak", test_blk_soak},
        {"snapcount", test_snapcount},       {"migrate", test_migrate},
    };
    current = "none";
    for (unsigned i = 0; i < sizeof(tests) / sizeof(tests[0]); i++) {
        if (value_is(test, tests[i].name)) {
            current = tests[i].name;
            tests[i].fn(&b);
        }
    }
    if (slen(current) == 4 && streq_n(current, "none", 4) && test) { current = "test"; fail("unknown test name"); }
    finish(&b, param(b.cmdline, "exit"));
}
