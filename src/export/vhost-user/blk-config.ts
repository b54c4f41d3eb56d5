/**
 * The virtio-blk config space a vhost-user-blk back-end serves (virtio 1.x 5.2.4): built once
 * from the export's shape, read by GET_CONFIG, and written by SET_CONFIG (writeback only).
 */
import {
  BLK_CFG_BLK_SIZE, BLK_CFG_CAPACITY, BLK_CFG_DISCARD_ALIGNMENT, BLK_CFG_MAX_DISCARD_SECTORS, BLK_CFG_MAX_DISCARD_SEG,
  BLK_CFG_MAX_WRITE_ZEROES_SECTORS, BLK_CFG_MAX_WRITE_ZEROES_SEG, BLK_CFG_WRITE_ZEROES_MAY_UNMAP, MAX_DISCARD_SECTORS, BLK_CFG_NUM_QUEUES, BLK_CFG_SEG_MAX, BLK_CFG_SIZE_MAX, BLK_CFG_WCE, BLK_CONFIG_SIZE,
  SECTOR, SIZE_MAX_BYTES,
} from './blk-features.js';
import { noPayload, refuse, type Message } from './messages.js';
import { CONFIG_HEADER, dataView, MAX_CONFIG_SIZE, VHOST_SET_CONFIG_TYPE_FRONTEND, VHOST_SET_CONFIG_TYPE_MIGRATION } from './protocol.js';

export interface BlkConfigShape {
  /** Export length in bytes. */
  length: number;
  numQueues: number;
  segMax: number;
  readOnly: boolean;
  writeCache: boolean;
  /** Logical block size in bytes. */
  blockSize: number;
}

export function blkConfigSpace(o: BlkConfigShape): Uint8Array {
  const config = new Uint8Array(BLK_CONFIG_SIZE);
  const c = dataView(config);
  c.setBigUint64(BLK_CFG_CAPACITY, BigInt(Math.floor(o.length / SECTOR)), true);
  c.setUint32(BLK_CFG_SIZE_MAX, SIZE_MAX_BYTES, true);
  c.setUint32(BLK_CFG_SEG_MAX, o.segMax, true);
  c.setUint32(BLK_CFG_BLK_SIZE, o.blockSize, true);
  config[BLK_CFG_WCE] = o.writeCache ? 1 : 0;
  c.setUint16(BLK_CFG_NUM_QUEUES, o.numQueues, true);
  if (!o.readOnly) {
    c.setUint32(BLK_CFG_MAX_DISCARD_SECTORS, MAX_DISCARD_SECTORS, true);
    c.setUint32(BLK_CFG_MAX_DISCARD_SEG, 1, true);
    c.setUint32(BLK_CFG_DISCARD_ALIGNMENT, o.blockSize / SECTOR, true);
    c.setUint32(BLK_CFG_MAX_WRITE_ZEROES_SECTORS, MAX_DISCARD_SECTORS, true);
    c.setUint32(BLK_CFG_MAX_WRITE_ZEROES_SEG, 1, true);
    config[BLK_CFG_WRITE_ZEROES_MAY_UNMAP] = 1;
  }
  return config;
}

function configRange(m: Message): { offset: number; size: number; flags: number } | null {
  if (m.payload.length < CONFIG_HEADER) return null;
  const dv = dataView(m.payload);
  const offset = dv.getUint32(0, true);
  const size = dv.getUint32(4, true);
  const flags = dv.getUint32(8, true);
  if (size > MAX_CONFIG_SIZE || m.payload.length < CONFIG_HEADER + size) return null;
  if (offset > BLK_CONFIG_SIZE || size > BLK_CONFIG_SIZE - offset) return null;
  return { offset, size, flags };
}

/** GET_CONFIG's reply; `configFeature`: VHOST_USER_PROTOCOL_F_CONFIG was negotiated. */
export function getConfig(config: Uint8Array, m: Message, configFeature: boolean, errors: string[]): Uint8Array {
  noPayload(m);
  const r = configRange(m);
  // "vhost-user back-end uses zero length of payload to indicate an error"
  if (!r || !configFeature) {
    errors.push(`GET_CONFIG: refused ${r ? 'without the CONFIG protocol feature' : 'range'}`);
    return new Uint8Array(0);
  }
  const out = new Uint8Array(CONFIG_HEADER + r.size);
  out.set(m.payload.subarray(0, CONFIG_HEADER));
  out.set(config.subarray(r.offset, r.offset + r.size), CONFIG_HEADER);
  return out;
}

/**
 * SET_CONFIG into `config`; true if writeback changed. `configFeature`: the CONFIG protocol
 * feature was negotiated; `wceFeature`: VIRTIO_BLK_F_CONFIG_WCE was.
 */
export function setConfig(config: Uint8Array, m: Message, configFeature: boolean, wceFeature: boolean): boolean {
  noPayload(m);
  if (!configFeature) refuse('CONFIG protocol feature not negotiated');
  const r = configRange(m);
  if (!r) refuse('bad config range');
  if (r.flags !== VHOST_SET_CONFIG_TYPE_FRONTEND && r.flags !== VHOST_SET_CONFIG_TYPE_MIGRATION) refuse(`flags ${r.flags}`);
  const data = m.payload.subarray(CONFIG_HEADER, CONFIG_HEADER + r.size);
  const touchesWce = r.offset <= BLK_CFG_WCE && r.offset + r.size > BLK_CFG_WCE;
  if (r.flags === VHOST_SET_CONFIG_TYPE_FRONTEND) {
    // Only `writeback` is writable, and only with CONFIG_WCE (virtio 1.x 5.2.4).
    if (r.offset !== BLK_CFG_WCE || r.size !== 1) refuse(`offset ${r.offset} size ${r.size} is read-only`);
    if (!wceFeature) refuse('writeback is read-only without VIRTIO_BLK_F_CONFIG_WCE');
  }
  // For migration the front-end restores the whole space; the export itself owns every
  // field but writeback, so only that one is taken.
  if (!touchesWce) return false;
  const v = data[BLK_CFG_WCE - r.offset]!;
  if (v > 1) refuse(`writeback ${v} is not 0 or 1`);
  const changed = config[BLK_CFG_WCE] !== v;
  config[BLK_CFG_WCE] = v;
  return changed;
}
