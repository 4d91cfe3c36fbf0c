/*
 * What the kit's C files share: types, port and MMIO accessors, COM1 reporting, boot
 * information, and interrupt plumbing (IDT, LAPIC, per-vector counts).
 */
#ifndef KIT_H
#define KIT_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define LAPIC 0xfee00000ULL

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outw(u16 port, u16 v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port)); }
static inline void outl(u16 port, u32 v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u16 inw(u16 port) { u16 v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port)); return v; }
static inline u32 inl(u16 port) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port)); return v; }

/* MMIO (and shared-memory) accesses of exactly the size named: one instruction each. */
static inline u8 mmio_read8(u64 a) { return *(volatile u8 *)a; }
static inline u16 mmio_read16(u64 a) { return *(volatile u16 *)a; }
static inline u32 mmio_read32(u64 a) { return *(volatile u32 *)a; }
static inline u64 mmio_read64(u64 a) { return *(volatile u64 *)a; }
static inline void mmio_write8(u64 a, u8 v) { *(volatile u8 *)a = v; }
static inline void mmio_write16(u64 a, u16 v) { *(volatile u16 *)a = v; }
static inline void mmio_write32(u64 a, u32 v) { *(volatile u32 *)a = v; }
static inline void mmio_write64(u64 a, u64 v) { *(volatile u64 *)a = v; }
static inline u8 mem_read8(u64 a) { return *(volatile u8 *)a; }
static inline void mem_write8(u64 a, u8 v) { *(volatile u8 *)a = v; }
/* A full barrier (a locked no-op), between the driver's ring writes and the device. */
static inline void mb(void) { __asm__ volatile("lock; addl $0, (%%rsp)" : : : "memory", "cc"); }

/* ---- reporting on COM1 (kit.c) ---- */
void putc(char c);
void puts(const char *s);
void putdec(u64 v);
void puthex(u64 v);
extern const char *current;
void fail(const char *why);
void check(int ok, const char *why);

/* ---- boot information ---- */
struct boot {
    const char *proto;
    const char *cmdline;
    u64 rsdp;
    u64 ram;          /* bytes of usable RAM in the memory map */
    u64 ram_top;      /* end of the highest RAM entry below 4 GiB */
    u32 map_entries;
    u64 initrd, initrd_size;
};
const char *param(const char *cmdline, const char *key);
u64 parse_dec(const char *v);

/* ---- interrupts (kit.c, entry.S) ---- */
/* Points IDT entry `vector` at `handler` and loads the IDT. */
void idt_set(int vector, void (*handler)(void));
/* Every vector goes to a counting handler: 32..255 are counted in irq_count[] and EOI'd
   (0xff, the spurious vector, is not EOI'd); an exception (0..31) is reported as a failure
   and ends the VM. */
void idt_install_all(void);
extern volatile u32 irq_count[256];
/* Software-enables the LAPIC (timer divide by 1). */
void lapic_enable(void);
/* Sleeps (sti; hlt; cli) until an interrupt arrives or about `us` microseconds pass (the
   LAPIC timer on vector KIT_TIMEOUT_VECTOR wakes it). */
#define KIT_TIMEOUT_VECTOR 0x41
void sleep_until_irq(u32 us);

/* ---- tests in files of their own ---- */
void test_migrate(struct boot *b);     /* migrate.c */

#endif
