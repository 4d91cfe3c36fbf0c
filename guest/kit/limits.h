/*
 * The kit's resource-limit tests (limits.c): guests that use all the CPU or all the RAM they
 * are given, for the host-side tests of Keel's cgroup limits (crates/keel/tests/limits.rs).
 */
#ifndef KIT_LIMITS_H
#define KIT_LIMITS_H

struct boot;

/* test=spin [secs=N] [cpus=N]: every vCPU busy-loops for N seconds (default 5, LAPIC timer),
   then the VM powers off. */
void test_spin(struct boot *b);
/* test=cpu-job [iters=N]: a fixed integer hash loop between "KIT: job start" and
   "KIT: job done ... checksum=0x..." lines. */
void test_cpu_job(struct boot *b);
/* test=touch-ram [hold=N]: writes one word in every 4 KiB page of RAM above 2 MiB, checks a
   sample, optionally sleeps N seconds (halted) and checks every page again. */
void test_touch_ram(struct boot *b);
/* test=ticks [secs=N]: prints "KIT: tick N" at ~10 Hz (LAPIC timer, halted in between) for N
   seconds: a guest whose progress the host can watch stop and resume (pause/resume). */
void test_ticks(struct boot *b);

#endif
