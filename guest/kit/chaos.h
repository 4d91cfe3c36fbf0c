/*
 * The kit's long-running guests (chaos.c, soak.c) and the clock they share.
 */
#ifndef KIT_CHAOS_H
#define KIT_CHAOS_H

#include "kit.h"

struct boot;

/* test=chaos seed=N secs=N: a hostile guest that hammers every port, MMIO region, PCI
   configuration space and virtqueue it can find for `secs` seconds (see chaos.c). */
void test_chaos(struct boot *b);
/* test=blk-soak seed=N secs=N: writes, reads back and verifies patterns on its disk for
   `secs` seconds, then prints a hash of the whole disk for the host to compare. */
void test_blk_soak(struct boot *b);

/* Calibrates the TSC against the LAPIC timer (1 GHz in KVM); 0 when that failed and the
   callers must bound their loops by count instead. Needs the LAPIC enabled. */
int clock_init(void);
/* Milliseconds since clock_init (0 without a clock). */
u64 clock_ms(void);

#endif
