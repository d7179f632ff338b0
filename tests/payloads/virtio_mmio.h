/* The virtio-mmio registers, status bits and split-ring layout the payloads' virtio drivers
 * use (virtio 1.2 §4.2.2, §2.7). Include after bulwark.h. A driver defines QSIZE first. */
#ifndef VIRTIO_MMIO_H
#define VIRTIO_MMIO_H

#define R_MAGIC 0x000
#define R_DEVICE_ID 0x008
#define R_DEV_FEATURES 0x010
#define R_DEV_FEATURES_SEL 0x014
#define R_DRV_FEATURES 0x020
#define R_DRV_FEATURES_SEL 0x024
#define R_QUEUE_SEL 0x030
#define R_QUEUE_NUM 0x038
#define R_QUEUE_READY 0x044
#define R_NOTIFY 0x050
#define R_STATUS 0x070
#define R_DESC_LO 0x080
#define R_DESC_HI 0x084
#define R_AVAIL_LO 0x090
#define R_AVAIL_HI 0x094
#define R_USED_LO 0x0a0
#define R_USED_HI 0x0a4
#define R_CONFIG 0x100

#define S_ACK 1
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FEATURES_OK 8
#define S_NEEDS_RESET 0x40

#define F_NEXT 1
#define F_WRITE 2

struct desc { bw_u64 addr; bw_u32 len; bw_u16 flags, next; };
struct ring {
    struct desc desc[QSIZE];
    bw_u16 avail_flags, avail_idx, avail_ring[QSIZE], used_event;
    bw_u16 used_flags __attribute__((aligned(4096))), used_idx;
    struct { bw_u32 id, len; } used_ring[QSIZE];
};

#endif
