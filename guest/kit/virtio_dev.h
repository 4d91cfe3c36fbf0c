/*
 * Internals shared by the kit's virtio driver (virtio.c) and its hostile-guest tests
 * (virtio_hostile.c): register offsets, the driver's per-device state, and its helpers.
 */
#ifndef KIT_VIRTIO_DEV_H
#define KIT_VIRTIO_DEV_H

#include "kit.h"

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

/* What waiting for a request's completion found. */
enum { W_TIMEOUT, W_USED, W_RESET };

/* A virtio-blk request header. */
struct blk_hdr { u32 type, reserved; u64 sector; };

/* Pseudo-random state of the garbage generators (fixed seed: runs are deterministic). */
extern u64 prng;

u64 blk_data(struct vdev *d);
/* One virtio-blk request (header, optional data, status) on queue 0; returns W_*. */
int blk_request(struct vdev *d, u32 type, u64 sector, u64 data, u32 len, int dev_writes,
                u8 *status, u32 *used_len);
u64 cfg(int slot, u32 off);
int find_device(u16 device_id, int nth, struct vdev *d, int index);
void irq_setup(void);
u64 msi_address(void);
void msix_control(struct vdev *d, u16 v);
/* One access of `size` (1, 2, 4, 8) bytes at `a`: a read, or a write of `v`. */
void mmio_poke(u64 a, u32 size, int read, u64 v);
int normal_request(struct vdev *d);
void queue_program(struct vdev *d, u16 size, u64 desc, u64 avail, u64 used);
u64 ring_avail(struct vdev *d);
u64 ring_desc(struct vdev *d);
u64 ring_used(struct vdev *d);
u64 rnd(void);
void set_desc(struct vdev *d, u16 i, u64 addr, u32 len, u16 flags, u16 next);
u8 status_get(struct vdev *d);
void status_set(struct vdev *d, u8 s);
int vdev_begin(struct vdev *d, u64 want);
int vdev_init(struct vdev *d, u64 want);
void vq_post(struct vdev *d, u16 head);
int vq_wait(struct vdev *d, u32 *id, u32 *len);
int wait_irq(u8 v, u32 before, int ms);
int wait_status(struct vdev *d, u8 bits, int ms);
u64 wanted_features(struct vdev *d);
void zero(volatile void *p, u32 n);

#endif
