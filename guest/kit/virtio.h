/*
 * The kit's virtio-pci tests (virtio.c): a minimal driver for Keel's virtio 1.x PCI transport,
 * used both the way a driver should and the way a hostile guest would.
 */
#ifndef KIT_VIRTIO_H
#define KIT_VIRTIO_H

struct boot;

/* test=pci-enum: bus 0 through ECAM and 0xCF8/0xCFC, BAR sizing, capability lists. */
void test_pci_enum(struct boot *b);
/* test=virtio-rng: bring-up with MSI-X, one request, an interrupt, random bytes. */
void test_virtio_rng(struct boot *b);
/* test=virtio-blk: read, write, flush, GET_ID, out-of-range and unknown requests. */
void test_virtio_blk(struct boot *b);
/* test=virtio-hostile: garbage registers, bad descriptors and rings, MSI-X abuse. */
void test_virtio_hostile(struct boot *b);
/* test=blk-read-rate: reads the whole disk between two markers, for timing (blk_rate.c). */
void test_blk_read_rate(struct boot *b);
/* test=snapcount [secs=N] [slots=N]: a 10 Hz counter that writes each count to its disk and
   checks the write before it, for snapshot/restore tests (snapcount.c). */
void test_snapcount(struct boot *b);

#endif
