/** What a VhostUserBlkBackend is given: its options and the hooks its users install. */
import type { VhostUserBlkBackend } from './backend.js';
import type { Vring } from './vring.js';

export interface VhostUserBlkHooks {
  /** A ring was started (SET_VRING_KICK) or enabled; check backend.ringReady(). */
  ringChanged?(backend: VhostUserBlkBackend, ring: Vring): void;
  /** SET_VRING_CALL gave the ring a new call fd (or none). */
  callChanged?(backend: VhostUserBlkBackend, ring: Vring): void;
  /** The front-end kicked a started ring (one call per wake-up, however many kicks). */
  ringKicked?(backend: VhostUserBlkBackend, ring: Vring): void;
  /**
   * GET_VRING_BASE is about to reply ring.lastAvailIdx: stop processing the ring and update that
   * first. A promise defers the reply (and every later message) until it settles, so requests in
   * flight can complete into the used ring before the front-end takes the ring back.
   */
  ringStopping?(backend: VhostUserBlkBackend, ring: Vring): Promise<void> | void;
  /** A new memory table replaced the old one (views of the old one are detached). */
  memoryChanged?(backend: VhostUserBlkBackend): void;
  /** The front-end changed the write cache (SET_CONFIG of wce). */
  writeCacheChanged?(backend: VhostUserBlkBackend, enabled: boolean): void;
  /** The session ended; `reason` is null for an orderly EOF. Everything is unmapped and closed. */
  closed?(backend: VhostUserBlkBackend, reason: Error | null): void;
}

export interface VhostUserBlkOptions {
  /** Export length in bytes (capacity is length / 512). */
  length: number;
  /** Virtqueues offered (GET_QUEUE_NUM, config num_queues); default 1, at most 256. */
  numQueues?: number;
  readOnly?: boolean;
  /** Initial write-cache state (config wce); default true. */
  writeCache?: boolean;
  /** seg_max in the config; default 126 (a 128-entry queue less header and status). */
  segMax?: number;
  /** Logical block size (config blk_size; QEMU's logical-block-size): power of 2, 512 to 2 MiB; default 512. */
  blockSize?: number;
  hooks?: VhostUserBlkHooks;
}

/** The options' numbers, defaulted and checked (RangeError names the one that is wrong). */
export function checkedOptions(o: VhostUserBlkOptions): { numQueues: number; segMax: number; blockSize: number } {
  if (!Number.isSafeInteger(o.length) || o.length < 0) throw new RangeError(`length must be a non-negative safe integer, got ${o.length}`);
  const numQueues = o.numQueues ?? 1;
  if (!Number.isInteger(numQueues) || numQueues < 1 || numQueues > 256) throw new RangeError(`numQueues must be 1..256, got ${numQueues}`);
  const segMax = o.segMax ?? 126;
  if (!Number.isInteger(segMax) || segMax < 1 || segMax > 0xffffffff) throw new RangeError(`segMax must be a positive u32, got ${segMax}`);
  const blockSize = o.blockSize ?? 512;
  if (!Number.isInteger(blockSize) || blockSize < 512 || blockSize > 2 ** 21 || (blockSize & (blockSize - 1)) !== 0) {
    throw new RangeError(`blockSize must be a power of 2 from 512 to 2 MiB, got ${blockSize}`);
  }
  return { numQueues, segMax, blockSize };
}
