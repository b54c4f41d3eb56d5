/** What a vhost-user-blk back-end offers: virtio feature bits, protocol features, config layout. */
import {
  VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
  VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
} from '../../../hw/virtio/virtio-blk-abi.js';
import {
  bit, VHOST_USER_F_PROTOCOL_FEATURES, VHOST_USER_PROTOCOL_F_CONFIG, VHOST_USER_PROTOCOL_F_MQ, VHOST_USER_PROTOCOL_F_REPLY_ACK,
  VHOST_USER_PROTOCOL_F_SLAVE_REQ, VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD,
} from './protocol.js';

// virtio 1.x transport feature bits (virtio spec 6, "Reserved Feature Bits").
export const VIRTIO_RING_F_INDIRECT_DESC = 28;
export const VIRTIO_RING_F_EVENT_IDX = 29;
export const VIRTIO_F_VERSION_1 = 32;

/**
 * Largest ring accepted: the virtqueue code's limit (QEMU's vhost-user-blk-pci allows 1024 too;
 * virtio itself allows 32768).
 */
export const MAX_QUEUE_SIZE = 1024;

/**
 * struct virtio_blk_config through the zoned fields (virtio 1.3 5.2.4): 96 bytes. Offsets of
 * the fields this back-end fills.
 */
export const BLK_CONFIG_SIZE = 96;
export const BLK_CFG_CAPACITY = 0;
export const BLK_CFG_SIZE_MAX = 8;
export const BLK_CFG_SEG_MAX = 12;
export const BLK_CFG_BLK_SIZE = 20;
export const BLK_CFG_WCE = 32;
export const BLK_CFG_NUM_QUEUES = 34;
export const BLK_CFG_MAX_DISCARD_SECTORS = 36;
export const BLK_CFG_MAX_DISCARD_SEG = 40;
export const BLK_CFG_DISCARD_ALIGNMENT = 44;
export const BLK_CFG_MAX_WRITE_ZEROES_SECTORS = 48;
export const BLK_CFG_MAX_WRITE_ZEROES_SEG = 52;
export const BLK_CFG_WRITE_ZEROES_MAY_UNMAP = 56;
/** What the virtio-blk request code accepts in one discard or write-zeroes segment. */
export const MAX_DISCARD_SECTORS = 0x3fffff;
export const SECTOR = 512;
export const SIZE_MAX_BYTES = 4 << 20;

/**
 * Features offered: virtio-blk's size_max, seg_max, blk_size, flush, topology, config_wce, mq
 * (and ro for read-only exports); the ring layout the data plane must honour (VERSION_1,
 * INDIRECT_DESC, EVENT_IDX); discard and write-zeroes for writable exports; and vhost-user
 * protocol-feature negotiation. Not offered: LOG_ALL (no migration logging), IOMMU_PLATFORM,
 * packed rings.
 */
export function blkFeatures(readOnly: boolean): bigint {
  let f = bit(VIRTIO_BLK_F_SIZE_MAX) | bit(VIRTIO_BLK_F_SEG_MAX) | bit(VIRTIO_BLK_F_BLK_SIZE) |
    bit(VIRTIO_BLK_F_FLUSH) | bit(VIRTIO_BLK_F_TOPOLOGY) | bit(VIRTIO_BLK_F_CONFIG_WCE) | bit(VIRTIO_BLK_F_MQ) |
    bit(VIRTIO_RING_F_INDIRECT_DESC) | bit(VIRTIO_RING_F_EVENT_IDX) | bit(VIRTIO_F_VERSION_1) |
    bit(VHOST_USER_F_PROTOCOL_FEATURES);
  if (readOnly) f |= bit(VIRTIO_BLK_F_RO);
  else f |= bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES);
  return f;
}

/**
 * Protocol features offered: MQ, REPLY_ACK, CONFIG, the back-end channel (config changes) and
 * inflight tracking (inflight.ts: a restarted back-end resubmits what was in flight).
 */
export const PROTOCOL_FEATURES = bit(VHOST_USER_PROTOCOL_F_MQ) | bit(VHOST_USER_PROTOCOL_F_REPLY_ACK) |
  bit(VHOST_USER_PROTOCOL_F_CONFIG) | bit(VHOST_USER_PROTOCOL_F_SLAVE_REQ) | bit(VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD);

/** A ring's addresses from SET_VRING_ADDR, translated through the current memory table. */
