/**
 * vhost-user wire format (specs/vhost-user.rst, "Message Specification"): request codes,
 * the 12-byte header, flags, protocol feature bits and the fixed payload layouts the back-end
 * reads and writes. All numbers are in the machine's byte order; Spindle runs on little-endian
 * hosts only (x86-64, arm64), so every accessor here is little-endian.
 */
import { endianness } from 'node:os';

if (endianness() !== 'LE') throw new Error('vhost-user: only little-endian hosts are supported');

// "Front-end message types" (:id: of each)
export const VHOST_USER_GET_FEATURES = 1;
export const VHOST_USER_SET_FEATURES = 2;
export const VHOST_USER_SET_OWNER = 3;
export const VHOST_USER_RESET_OWNER = 4;
export const VHOST_USER_SET_MEM_TABLE = 5;
export const VHOST_USER_SET_LOG_BASE = 6;
export const VHOST_USER_SET_LOG_FD = 7;
export const VHOST_USER_SET_VRING_NUM = 8;
export const VHOST_USER_SET_VRING_ADDR = 9;
export const VHOST_USER_SET_VRING_BASE = 10;
export const VHOST_USER_GET_VRING_BASE = 11;
export const VHOST_USER_SET_VRING_KICK = 12;
export const VHOST_USER_SET_VRING_CALL = 13;
export const VHOST_USER_SET_VRING_ERR = 14;
export const VHOST_USER_GET_PROTOCOL_FEATURES = 15;
export const VHOST_USER_SET_PROTOCOL_FEATURES = 16;
export const VHOST_USER_GET_QUEUE_NUM = 17;
export const VHOST_USER_SET_VRING_ENABLE = 18;
export const VHOST_USER_GET_CONFIG = 24;
export const VHOST_USER_SET_CONFIG = 25;
export const VHOST_USER_GET_INFLIGHT_FD = 31;
export const VHOST_USER_SET_INFLIGHT_FD = 32;
export const VHOST_USER_RESET_DEVICE = 34;
export const VHOST_USER_GET_MAX_MEM_SLOTS = 36;

/** Names for logs and errors. */
export const REQUEST_NAMES: Readonly<Record<number, string>> = {
  1: 'GET_FEATURES', 2: 'SET_FEATURES', 3: 'SET_OWNER', 4: 'RESET_OWNER', 5: 'SET_MEM_TABLE',
  6: 'SET_LOG_BASE', 7: 'SET_LOG_FD', 8: 'SET_VRING_NUM', 9: 'SET_VRING_ADDR', 10: 'SET_VRING_BASE',
  11: 'GET_VRING_BASE', 12: 'SET_VRING_KICK', 13: 'SET_VRING_CALL', 14: 'SET_VRING_ERR',
  15: 'GET_PROTOCOL_FEATURES', 16: 'SET_PROTOCOL_FEATURES', 17: 'GET_QUEUE_NUM', 18: 'SET_VRING_ENABLE',
  19: 'SEND_RARP', 20: 'NET_SET_MTU', 21: 'SET_SLAVE_REQ_FD', 22: 'IOTLB_MSG', 23: 'SET_VRING_ENDIAN',
  24: 'GET_CONFIG', 25: 'SET_CONFIG', 26: 'CREATE_CRYPTO_SESSION', 27: 'CLOSE_CRYPTO_SESSION',
  28: 'POSTCOPY_ADVISE', 29: 'POSTCOPY_LISTEN', 30: 'POSTCOPY_END', 31: 'GET_INFLIGHT_FD',
  32: 'SET_INFLIGHT_FD', 33: 'GPU_SET_SOCKET', 34: 'RESET_DEVICE', 35: 'VRING_KICK',
  36: 'GET_MAX_MEM_SLOTS', 37: 'ADD_MEM_REG', 38: 'REM_MEM_REG', 39: 'SET_STATUS', 40: 'GET_STATUS',
};

export function requestName(request: number): string {
  return REQUEST_NAMES[request] ?? `request ${request}`;
}

// "Header"
export const HEADER_SIZE = 12;
/** Lower 2 bits of flags: the version, currently 1. */
export const VHOST_USER_VERSION_MASK = 0x3;
export const VHOST_USER_VERSION = 0x1;
/** Bit 2: set on every reply from the back-end. */
export const VHOST_USER_REPLY_MASK = 1 << 2;
/** Bit 3: need_reply (REPLY_ACK). */
export const VHOST_USER_NEED_REPLY_MASK = 1 << 3;

/**
 * Largest payload the back-end accepts. The biggest message it understands is SET_CONFIG with
 * 256 bytes of config space (268 bytes); anything over this limit is a broken or hostile peer.
 */
export const MAX_PAYLOAD = 4096;
/** At most this many fds come with one message (the memory table's 8 regions). */
export const MAX_FDS = 8;
/** VHOST_MEMORY_BASELINE_NREGIONS: regions in one SET_MEM_TABLE. */
export const MAX_MEM_REGIONS = 8;
/** VHOST_USER_MAX_CONFIG_SIZE. */
export const MAX_CONFIG_SIZE = 256;

// Feature bits
/** The reused UNUSED virtio bit 30 that announces protocol-feature negotiation. */
export const VHOST_USER_F_PROTOCOL_FEATURES = 30;
/** VHOST_F_LOG_ALL: dirty logging for migration (not offered). */
export const VHOST_F_LOG_ALL = 26;

// "Protocol features"
export const VHOST_USER_PROTOCOL_F_MQ = 0;
export const VHOST_USER_PROTOCOL_F_LOG_SHMFD = 1;
export const VHOST_USER_PROTOCOL_F_RARP = 2;
export const VHOST_USER_PROTOCOL_F_REPLY_ACK = 3;
export const VHOST_USER_PROTOCOL_F_MTU = 4;
export const VHOST_USER_PROTOCOL_F_SLAVE_REQ = 5;
export const VHOST_USER_PROTOCOL_F_CROSS_ENDIAN = 6;
export const VHOST_USER_PROTOCOL_F_CRYPTO_SESSION = 7;
export const VHOST_USER_PROTOCOL_F_PAGEFAULT = 8;
export const VHOST_USER_PROTOCOL_F_CONFIG = 9;
export const VHOST_USER_PROTOCOL_F_SLAVE_SEND_FD = 10;
export const VHOST_USER_PROTOCOL_F_HOST_NOTIFIER = 11;
export const VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD = 12;
export const VHOST_USER_PROTOCOL_F_RESET_DEVICE = 13;
export const VHOST_USER_PROTOCOL_F_INBAND_NOTIFICATIONS = 14;
export const VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS = 15;
export const VHOST_USER_PROTOCOL_F_STATUS = 16;

// SET_VRING_KICK / CALL / ERR u64 payload: bits 0-7 the index, bit 8 "no fd".
export const VHOST_USER_VRING_IDX_MASK = 0xff;
export const VHOST_USER_VRING_NOFD_MASK = 1 << 8;

// SET_VRING_ADDR flags
export const VHOST_VRING_F_LOG = 1 << 0;

// "Virtio device config space" flags
export const VHOST_SET_CONFIG_TYPE_FRONTEND = 0;
export const VHOST_SET_CONFIG_TYPE_MIGRATION = 1;

// Payload sizes
export const U64_PAYLOAD = 8;
export const VRING_STATE_PAYLOAD = 8;
export const VRING_ADDR_PAYLOAD = 40;
export const MEM_TABLE_HEADER = 8;
export const MEM_REGION_SIZE = 32;
export const CONFIG_HEADER = 12;

export function bit(n: number): bigint {
  return 1n << BigInt(n);
}

/** A decoded 12-byte header. */
export interface Header {
  request: number;
  flags: number;
  size: number;
}

export function decodeHeader(b: Uint8Array): Header {
  if (b.length < HEADER_SIZE) throw new RangeError(`vhost-user header needs ${HEADER_SIZE} bytes, got ${b.length}`);
  const dv = new DataView(b.buffer, b.byteOffset, HEADER_SIZE);
  return { request: dv.getUint32(0, true), flags: dv.getUint32(4, true), size: dv.getUint32(8, true) };
}

/** A whole message: header followed by payload. */
export function encodeMessage(request: number, flags: number, payload: Uint8Array = new Uint8Array(0)): Uint8Array {
  const out = new Uint8Array(HEADER_SIZE + payload.length);
  const dv = new DataView(out.buffer);
  dv.setUint32(0, request >>> 0, true);
  dv.setUint32(4, flags >>> 0, true);
  dv.setUint32(8, payload.length, true);
  out.set(payload, HEADER_SIZE);
  return out;
}

/** A back-end reply: version 1 with the reply bit. */
export function encodeReply(request: number, payload: Uint8Array): Uint8Array {
  return encodeMessage(request, VHOST_USER_VERSION | VHOST_USER_REPLY_MASK, payload);
}

export function u64Payload(v: bigint | number): Uint8Array {
  const out = new Uint8Array(8);
  new DataView(out.buffer).setBigUint64(0, BigInt(v), true);
  return out;
}

export function vringStatePayload(index: number, num: number): Uint8Array {
  const out = new Uint8Array(8);
  const dv = new DataView(out.buffer);
  dv.setUint32(0, index >>> 0, true);
  dv.setUint32(4, num >>> 0, true);
  return out;
}

export function dataView(b: Uint8Array): DataView {
  return new DataView(b.buffer, b.byteOffset, b.byteLength);
}

/** A u64 from the wire as a JavaScript number, or null when it is not a safe integer. */
export function safeU64(dv: DataView, off: number): number | null {
  const v = dv.getBigUint64(off, true);
  return v <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(v) : null;
}
