/**
 * vhost-user inflight I/O tracking for split rings (specs/vhost-user.rst, "Inflight I/O
 * tracking"): a shared buffer in which the back-end records which chains it has taken and not
 * yet completed. The back-end allocates it (GET_INFLIGHT_FD), the front-end keeps it and hands
 * it to the next back-end (SET_INFLIGHT_FD) after a crash, which then resubmits what was in
 * flight instead of re-reading avail entries the guest may have reused. Without it, a back-end
 * that completes out of order (forwarded requests, io_uring) loses one request and runs
 * another twice when it dies.
 *
 * One region per queue, 64-byte aligned (QEMU never looks inside; only this file's layout
 * must agree across Spindle versions):
 *   u64 features (0)  u16 version (1)  u16 desc_num  u16 last_batch_head  u16 used_idx
 *   per head, 16 bytes: u8 inflight, 5 padding, u16 next, u64 counter
 * The steps are ordered so that a process killed between any two stores leaves a record the
 * recovery below reads correctly: `taken` stamps the counter before setting inflight; `pushed`
 * links the head into the last batch before the used index is stored; `published` clears the
 * batch's flags and only then records the used index. If the used index in guest memory is
 * ahead of used_idx, the batch list says which heads it covered.
 *
 * The native worker (native/src/vhostblk/ring.cc) writes the same layout for queues it serves.
 *
 * Context: main loop (the worker writes a queue's region only while it has that queue).
 */
import { fstatSync } from 'node:fs';
import { closeFd, memfdCreate, mmapFd, unmapFd } from '../../native/unix-fd.js';
import type { VirtQueueLog } from '../../../hw/virtio/virtqueue.js';
import { MAX_QUEUE_SIZE } from './blk-features.js';
import { DeferredClose } from './deferred-close.js';
import { refuse, VhostUserRefused, type Message } from './messages.js';
import { dataView } from './protocol.js';

const HEADER = 16;
const DESC = 16;
const ALIGN = 64;
const VERSION = 1;
// Header fields.
const H_VERSION = 8;
const H_DESC_NUM = 10;
const H_LAST_BATCH = 12;
const H_USED_IDX = 14;
// Per-head fields, from the head's entry.
const D_INFLIGHT = 0;
const D_NEXT = 6;
const D_COUNTER = 8;

/** The inflight description payload: u64 mmap size, u64 mmap offset, u16 num queues, u16 queue size (+ padding). */
export const INFLIGHT_PAYLOAD = 24;

/** Bytes of one queue's region for queues of `queueSize` entries. */
export function inflightRegionSize(queueSize: number): number {
  return Math.ceil((HEADER + DESC * queueSize) / ALIGN) * ALIGN;
}

/** What a restarted queue must do first: the heads to resubmit (oldest first) and where popping resumes. */
export interface InflightRecovery {
  resubmit: number[];
  lastAvail: number;
  /** Entries the record could not account for (cleared), for the session's error list. */
  problems: string[];
}

/** One queue's region: the VirtQueueLog of the TypeScript path, and the recovery at a ring's start. */
export class InflightQueue implements VirtQueueLog {
  readonly bytes: Uint8Array;
  private readonly dv: DataView;
  private readonly u16: Uint16Array;
  /** The next counter value (orders the chains in flight). */
  private counter = 0;
  /** Heads pushed since the last publication (the batch being linked). */
  private readonly batch: number[] = [];

  /** `memory`: the buffer's owner (held while a queue writes the region), or null for a bare region. */
  constructor(buffer: ArrayBuffer, offset: number, readonly capacity: number, readonly memory: InflightMemory | null = null) {
    this.bytes = new Uint8Array(buffer, offset, inflightRegionSize(capacity));
    this.dv = new DataView(buffer, offset, this.bytes.length);
    this.u16 = new Uint16Array(buffer, offset, this.bytes.length >>> 1);
  }

  taken(head: number): void {
    const at = HEADER + DESC * head;
    const c = this.counter++;
    this.dv.setUint32(at + D_COUNTER, c >>> 0, true);
    this.dv.setUint32(at + D_COUNTER + 4, Math.floor(c / 2 ** 32), true);
    Atomics.store(this.bytes, at + D_INFLIGHT, 1);
  }

  pushed(head: number): void {
    const at = HEADER + DESC * head;
    this.dv.setUint16(at + D_NEXT, this.dv.getUint16(H_LAST_BATCH, true), true);
    Atomics.store(this.u16, H_LAST_BATCH >>> 1, head);
    this.batch.push(head);
  }

  published(usedIdx: number): void {
    for (const h of this.batch) Atomics.store(this.bytes, HEADER + DESC * h + D_INFLIGHT, 0);
    this.batch.length = 0;
    Atomics.store(this.u16, H_USED_IDX >>> 1, usedIdx & 0xffff);
  }

  /**
   * A ring of `num` entries starts at `base` (SET_VRING_BASE, or where this process left it)
   * with `usedIdx` in its used ring: repair the last batch, and list what a previous back-end
   * left in flight; popping resumes after the avail entries those took. A fresh region is
   * initialised.
   */
  recover(num: number, base: number, usedIdx: number): InflightRecovery {
    const dv = this.dv;
    const problems: string[] = [];
    this.batch.length = 0;
    this.counter = 0;
    if (dv.getUint16(H_VERSION, true) !== VERSION) {
      this.bytes.fill(0);
      dv.setUint16(H_DESC_NUM, this.capacity, true);
      dv.setUint16(H_USED_IDX, usedIdx, true);
      dv.setUint16(H_VERSION, VERSION, true);
      return { resubmit: [], lastAvail: base, problems };
    }
    const descNum = Math.min(dv.getUint16(H_DESC_NUM, true), this.capacity);
    const flag = (h: number): number => HEADER + DESC * h + D_INFLIGHT;
    // The used index moved past the record: the batch it published is done, whatever the flags say.
    let left = (usedIdx - dv.getUint16(H_USED_IDX, true)) & 0xffff;
    if (left > descNum) {
      problems.push(`used index ${usedIdx} is ${left} past the recorded ${dv.getUint16(H_USED_IDX, true)}, more than the queue size`);
      left = descNum;
    }
    for (let h = dv.getUint16(H_LAST_BATCH, true); left > 0 && h < descNum; left--) {
      this.bytes[flag(h)] = 0;
      h = dv.getUint16(HEADER + DESC * h + D_NEXT, true);
    }
    dv.setUint16(H_USED_IDX, usedIdx, true);
    const heads: { head: number; counter: number }[] = [];
    for (let h = 0; h < descNum; h++) {
      if (this.bytes[flag(h)] === 0) continue;
      if (h >= num) {
        problems.push(`head ${h} is recorded in flight but the ring has ${num} entries`);
        this.bytes[flag(h)] = 0;
        continue;
      }
      const at = HEADER + DESC * h + D_COUNTER;
      heads.push({ head: h, counter: dv.getUint32(at + 4, true) * 2 ** 32 + dv.getUint32(at, true) });
    }
    heads.sort((a, b) => a.counter - b.counter);
    this.counter = heads.length > 0 ? heads[heads.length - 1]!.counter + 1 : 0;
    // Each chain in flight took one avail entry beyond the used ones (a front-end that lost
    // the back-end sets the base to the used index).
    const lastAvail = heads.length > 0 ? (usedIdx + heads.length) & 0xffff : base;
    return { resubmit: heads.map((x) => x.head), lastAvail, problems };
  }

  /** Heads flagged in flight right now (tests and diagnostics). */
  inFlightHeads(): number[] {
    const out: number[] = [];
    for (let h = 0; h < this.capacity; h++) if (this.bytes[HEADER + DESC * h + D_INFLIGHT]) out.push(h);
    return out;
  }

  /** The counter the next taken chain gets (the native worker continues from it). */
  get nextCounter(): number {
    return this.counter;
  }
}

/** A session's inflight buffer, mapped; unmapped on close once no queue holds it. */
export class InflightMemory {
  readonly queues: InflightQueue[];
  private readonly life: DeferredClose;

  private constructor(buffer: ArrayBuffer, readonly numQueues: number, readonly queueSize: number) {
    const size = inflightRegionSize(queueSize);
    this.queues = Array.from({ length: numQueues }, (_, i) => new InflightQueue(buffer, i * size, queueSize, this));
    this.life = new DeferredClose(() => unmapFd(buffer));
  }

  /** Region of ring `index`, or null if the buffer has none for it. */
  queue(index: number): InflightQueue | null {
    return this.life.closed ? null : this.queues[index] ?? null;
  }

  /** Keep the mapping while a queue writes it; returns the release (idempotent). */
  hold(): () => void {
    return this.life.hold();
  }

  close(): void {
    this.life.close();
  }

  /**
   * GET_INFLIGHT_FD: a new zeroed buffer for the queues described; returns it, its fd (the
   * caller sends then closes it) and the reply payload.
   */
  static allocate(m: Message, maxQueues: number): { memory: InflightMemory; fd: number; reply: Uint8Array } {
    const { numQueues, queueSize } = description(m, maxQueues);
    if (m.fds.length > 0) refuse(`${m.fds.length} unexpected fds`);
    const size = numQueues * inflightRegionSize(queueSize);
    const fd = memfdCreate('spindle-vhost-inflight', size);
    let buffer: ArrayBuffer;
    try {
      buffer = mmapFd(fd, size);
    } catch (e) {
      closeFd(fd);
      throw e;
    }
    const reply = new Uint8Array(INFLIGHT_PAYLOAD);
    const dv = dataView(reply);
    dv.setBigUint64(0, BigInt(size), true);
    dv.setBigUint64(8, 0n, true);
    dv.setUint16(16, numQueues, true);
    dv.setUint16(18, queueSize, true);
    return { memory: new InflightMemory(buffer, numQueues, queueSize), fd, reply };
  }

  /** SET_INFLIGHT_FD: map the buffer the front-end kept (its fd is consumed from `m`). */
  static adopt(m: Message, maxQueues: number): InflightMemory {
    const { numQueues, queueSize, mmapSize, mmapOffset } = description(m, maxQueues);
    if (m.fds.length !== 1) refuse(`${m.fds.length} fds, expected 1`);
    const need = numQueues * inflightRegionSize(queueSize);
    if (mmapSize < need) refuse(`mmap size ${mmapSize} is less than the ${need} bytes ${numQueues} queues of ${queueSize} need`);
    const fd = m.fds.pop()!;
    try {
      // Past the end of a file mmap succeeds but a store raises SIGBUS: the fd must cover it.
      const st = fstatSync(fd);
      if (st.isFile() && st.size < mmapOffset + need) refuse(`the fd holds ${st.size} bytes, less than [${mmapOffset}, +${need})`);
      return new InflightMemory(mmapFd(fd, need, mmapOffset), numQueues, queueSize);
    } catch (e) {
      if (e instanceof VhostUserRefused) throw e;
      refuse(`cannot map the inflight buffer: ${e instanceof Error ? e.message : String(e)}`);
    } finally {
      closeFd(fd);
    }
  }
}

function description(m: Message, maxQueues: number): { mmapSize: number; mmapOffset: number; numQueues: number; queueSize: number } {
  if (m.payload.length < 20) refuse(`payload of ${m.payload.length} bytes, expected an inflight description (${INFLIGHT_PAYLOAD})`);
  const dv = dataView(m.payload);
  const mmapSize = Number(dv.getBigUint64(0, true));
  const mmapOffset = Number(dv.getBigUint64(8, true));
  const numQueues = dv.getUint16(16, true);
  const queueSize = dv.getUint16(18, true);
  if (numQueues < 1 || numQueues > maxQueues) refuse(`${numQueues} queues, the export has 1..${maxQueues}`);
  if (queueSize < 1 || queueSize > MAX_QUEUE_SIZE || (queueSize & (queueSize - 1)) !== 0) {
    refuse(`queue size ${queueSize} is not a power of 2 up to ${MAX_QUEUE_SIZE}`);
  }
  if (!Number.isSafeInteger(mmapOffset)) refuse(`mmap offset ${mmapOffset} is out of range`);
  return { mmapSize, mmapOffset, numQueues, queueSize };
}
