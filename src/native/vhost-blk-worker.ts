/**
 * The native fast path of the vhost-user-blk export (native/src/vhostblk/): one native
 * iothread serves split virtqueues end to end — pop the chain, read the header,
 * preadv/pwritev between the image file and guest memory, status byte, used element, one
 * used-index store and at most one call-fd write per batch — without entering JavaScript.
 * Requests behave as hw/block/virtio-blk.ts serves them (same bounds checks and status codes);
 * structural chain errors (loops, nested or bad indirect tables, `next` beyond the table)
 * break the queue, as do the ring errors hw/virtio/virtqueue.ts reports.
 *
 * A raw queue (no `map`) serves a raw file: guest offset == file offset. A mapped queue
 * (`map`, a VhostBlkMap, plus `forward`) serves a format such as qcow2: reads (writes) whose
 * clusters are all mapped (writable) go guest -> host through the map natively; every other
 * read/write, and every flush, discard and write-zeroes, is forwarded: its head appears in
 * the forward ring (FWD_* below) and notifyFd is written once per batch; JavaScript executes
 * the request (data and status byte in guest memory), adds (head, used length) to the
 * completion part of the ring, and writes completeFd; the worker pushes the used element and
 * calls. The worker stays the only writer of the used ring while the queue is attached, and
 * pushes completions even while paused.
 *
 * Life cycle: setMemory (no queue attached) → addQueue per ring (serving starts at once) →
 * removeQueue (the position to hand back: GET_VRING_BASE) → destroy. Every fd passed in is
 * dup'd by the worker, so the caller may close its own at once. The layout ArrayBuffer is kept
 * alive by the worker, but it must not be unmapped (unmapFd) while queues are attached.
 *
 * I/O ($SPINDLE_VHOST_IO, read when the worker is constructed; `ioMode`): `auto` (default) reads
 * and writes with RWF_NOWAIT inline — a page-cache hit costs one syscall — and hands what would
 * block (a cache miss; on ext4 every buffered write) to the worker's io_uring, so one slow request
 * does not stall the other rings of the thread; flushes are io_uring fdatasyncs. `async` sends all
 * of them to the io_uring; `sync` does blocking syscalls on the worker thread. Where io_uring is
 * refused (old kernels, seccomp), or with $SPINDLE_VHOST_RING=threads, a pool of threads takes
 * its place (`ioEngine` says which). Discard and write-zeroes are synchronous.
 *
 * Not served here (the TypeScript dataplane must serve the device instead): dirty logging
 * (VHOST_F_LOG_ALL), packed rings.
 */
import {
  native, type NativeVhostBlkMap, type NativeVhostBlkQueue, type NativeVhostBlkStats, type NativeVhostBlkWorker,
  type VhostBlkIoMode,
} from './addon.js';
import { VhostBlkMap } from './vhost-blk-map.js';

export { VhostBlkMap } from './vhost-blk-map.js';
export type { NativeVhostBlkForward as VhostBlkForward, VhostBlkIoMode } from './addon.js';

/** addQueue options; `map` may be the VhostBlkMap wrapper or its native handle. */
export type VhostBlkQueueOptions = Omit<NativeVhostBlkQueue, 'map'> & { map?: VhostBlkMap | NativeVhostBlkMap };

/** Forward ring slots (Int32Array indices; see NativeVhostBlkForward). */
export const FWD_PROD = 0, FWD_CONS = 1, CPL_PROD = 2, CPL_CONS = 3, FWD_ENTRIES = 16;
/** Int32s a forward ring of a queue of `num` entries needs. */
export const forwardRingLength = (num: number): number => FWD_ENTRIES + 3 * num;
/** The Int32 index of forwarded entry i (a free-running counter value). */
export const fwdSlot = (num: number, i: number): number => FWD_ENTRIES + ((i >>> 0) % num);
/** The Int32 index of completion entry i's head (its used length is the next slot). */
export const cplSlot = (num: number, i: number): number => FWD_ENTRIES + num + 2 * ((i >>> 0) % num);
export type VhostBlkQueueStats = NativeVhostBlkStats;
/** The position and counters returned by removeQueue. */
export type VhostBlkQueuePosition = NativeVhostBlkStats;

/** Sorts spans and merges overlapping or adjacent ones. */
export function mergeSpans(spans: readonly (readonly [number, number])[]): [number, number][] {
  const s = spans.map(([a, b]) => [a, b] as [number, number]).sort((x, y) => x[0] - y[0]);
  const out: [number, number][] = [];
  for (const [a, b] of s) {
    const last = out[out.length - 1];
    if (last && a <= last[1]) last[1] = Math.max(last[1], b);
    else out.push([a, b]);
  }
  return out;
}

export class VhostBlkWorker {
  private h: NativeVhostBlkWorker | null;
  private readonly attached = new Set<number>();
  private readonly freeSlots: number[] = [];
  private nextSlot = 0;

  /** Starts the worker's thread (epoll over the kick eventfds and a control eventfd). */
  constructor() {
    this.h = new native.VhostBlkWorker();
  }

  private get handle(): NativeVhostBlkWorker {
    if (!this.h) throw new Error('VhostBlkWorker: destroyed');
    return this.h;
  }

  /**
   * Guest memory: `layout` indexed by guest-physical address (mmapLayout), and its mapped
   * [start, end) spans (adjacent spans are merged). Every ring and buffer must lie inside one
   * span. Only while no queue is attached.
   */
  setMemory(layout: ArrayBuffer, spans: readonly (readonly [number, number])[]): void {
    this.handle.setMemory(layout, mergeSpans(spans));
  }

  /** The worker thread's kernel thread id (0 before it runs). */
  get threadId(): number {
    return this.h?.threadId ?? 0;
  }

  /** The I/O policy in effect (see the file comment). */
  get ioMode(): VhostBlkIoMode {
    return this.handle.ioMode ?? 'sync';
  }

  /** What does the asynchronous I/O: io_uring, a thread pool where io_uring is refused, or nothing (sync). */
  get ioEngine(): 'io_uring' | 'threads' | 'sync' {
    return this.handle.ioEngine ?? 'sync';
  }

  /** A queue index no one else on this worker uses (queues of several sessions share a worker). */
  allocIndex(): number {
    const i = this.freeSlots.pop() ?? this.nextSlot++;
    if (i >= 1024) throw new Error('VhostBlkWorker: more than 1024 queues on one worker');
    return i;
  }

  freeIndex(i: number): void {
    this.freeSlots.push(i);
  }

  /** Attaches ring `index` and serves what is already available, as if kicked. */
  addQueue(index: number, q: VhostBlkQueueOptions): void {
    const map = q.map instanceof VhostBlkMap ? q.map.handle : q.map;
    this.handle.addQueue(index, { ...q, map });
    this.attached.add(index);
  }

  /**
   * Stops ring `index` after the request in progress (no request is ever half done: those with
   * I/O on the io_uring are waited for, blocking this thread meanwhile), pushes
   * the completions already in the forward ring, closes the worker's fds of it, and returns its
   * position (lastAvail: GET_VRING_BASE's value) and counters. Remove a mapped queue only once
   * `stats().inForward` is 0: requests still forwarded are forgotten (their used elements
   * would never be pushed).
   */
  removeQueue(index: number): VhostBlkQueuePosition {
    const r = this.handle.removeQueue(index);
    this.attached.delete(index);
    return r;
  }

  /** Replaces the call eventfd (-1: none; the worker dups it). */
  setCallFd(index: number, fd: number): void {
    this.handle.setCallFd(index, fd);
  }

  /** The guest toggled the write cache (false: each write is followed by fdatasync). */
  setWriteCache(index: number, on: boolean): void {
    this.handle.setWriteCache(index, on);
  }

  /** A resize: requests are checked against `sectors` from the next one on. */
  setCapacity(index: number, sectors: number): void {
    this.handle.setCapacity(index, sectors);
  }

  /**
   * Returns once the worker is between requests and no request has I/O in flight: every request
   * that looked up a map entry before the call has finished its I/O (use after
   * VhostBlkMap.invalidate/clear). Blocks this thread while in-flight I/O completes.
   */
  barrier(): void {
    this.handle.barrier();
  }

  /** Process ring `index` now, as if the driver kicked. */
  kick(index: number): void {
    this.handle.kick(index);
  }

  /**
   * Stops popping requests from all rings; returns once no request is being processed (I/O in
   * flight on the io_uring completed and pushed). Kicks are remembered; completions of forwarded
   * requests are still pushed.
   */
  pause(): void {
    this.handle.pause();
  }

  /** Serves again, starting with every ring kicked while paused. */
  resume(): void {
    this.handle.resume();
  }

  /** Counters and position (as of the last batch), and `broken` (why the ring stopped) or null. */
  stats(index: number): VhostBlkQueueStats {
    return this.handle.stats(index);
  }

  /** Indices of attached queues whose ring broke (for polling). */
  brokenQueues(): number[] {
    return [...this.attached].filter((i) => this.handle.stats(i).broken !== null);
  }

  /** Stops and joins the thread, closing every fd it holds. Idempotent. */
  destroy(): void {
    this.h?.destroy();
    this.h = null;
    this.attached.clear();
  }
}
