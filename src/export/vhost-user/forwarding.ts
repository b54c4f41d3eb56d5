/**
 * The TypeScript half of the hybrid fast path (fast-path.ts, mapped mode): a native worker
 * serves the reads and writes whose clusters it has in its mapping table and forwards every
 * other request (cluster allocation, backing files, flush, discard...) here, by head index,
 * through a shared ring; the virtio-blk request code (hw/block's VirtioBlk) runs it on the
 * block layer and the completion goes back to the worker, which stays the only writer of the
 * used ring while the queue is attached.
 *
 *   worker ──forward entry + notify eventfd──► ForwardQueue.pop ──► VirtioBlk ──► BackendIO
 *   worker ◄──completion entry + complete eventfd── ForwardQueue.push/flush ◄── finish
 *
 * When the worker lets go of the queue (GET_VRING_BASE, a drained section, a new memory table)
 * with requests still forwarded, the queue is *detached*: their completions go straight into
 * the used ring, at the position the worker handed back, as the TypeScript data plane does.
 * A queue goes back to the worker only once nothing forwarded is left (`busy`), so the two
 * never write the used ring at once.
 *
 * Ring layout (Int32 slots holding free-running u32 counters; the worker's side is in
 * native/src/vhostblk/): [0] forwarded produced (worker), [1] consumed (here), [2] completions
 * produced (here), [3] consumed (worker), [16 + i % num] a forwarded head,
 * [16 + num + 2 (i % num)] a completion's head and used length.
 *
 * Context: main loop.
 */
import type { BackendIO } from '../../backend/io.js';
import { VirtioBlk } from '../../../hw/block/virtio-blk.js';
import { VirtQueue, VirtQueueElement, type VirtQueueLog } from '../../../hw/virtio/virtqueue.js';
import type { GuestRam } from '../../../hw/core/memory.js';
import { closeFd, eventfd, eventfdWrite, EventFdWatcher } from '../../native/unix-fd.js';
import { MAX_QUEUE_SIZE } from './blk-features.js';
import type { GuestMemoryTable } from './memory.js';

const HDR = 16;
const T_IN = 0;
const T_OUT = 1;

/** What addQueue's `forward` option takes. */
export interface ForwardChannel {
  ring: Int32Array;
  notifyFd: number;
  completeFd: number;
}

/** A virtqueue whose chains are the heads a native worker forwarded. */
export class ForwardQueue extends VirtQueue {
  readonly ring: Int32Array;
  /** The worker writes it after a batch that forwarded something; watched here. */
  readonly notifyFd: number;
  /** Written here after completions; the worker watches it. */
  readonly completeFd: number;
  /** Completions go to the worker (true) or straight into the used ring (false). */
  attached = false;
  private consumed = 0;
  private produced = 0;
  private toWorker = 0;
  /** Per head: the guest range of a forwarded read or write (bytes < 0: none). */
  private readonly rangeOffset = new Float64Array(MAX_QUEUE_SIZE);
  private readonly rangeBytes = new Float64Array(MAX_QUEUE_SIZE).fill(-1);
  private readonly mem: DataView;

  constructor(ram: GuestRam, index: number, private readonly onDone: (offset: number, bytes: number) => void) {
    super(ram, index, MAX_QUEUE_SIZE);
    this.mem = ram.dv;
    this.ring = new Int32Array(HDR + 3 * MAX_QUEUE_SIZE);
    this.notifyFd = eventfd();
    this.completeFd = eventfd();
  }

  /** Point at ring `num`/`desc` (the chains are walked there) and hand the worker a fresh channel. */
  attach(num: number, desc: number, avail: number, used: number): ForwardChannel {
    if (this.busy) throw new Error(`queue ${this.index}: still has forwarded requests`);
    this.num = num;
    this.desc = desc;
    this.avail = avail;
    this.used = used;
    this.enabled = true;
    this.ringsChanged();
    this.ring.fill(0);
    this.consumed = this.produced = this.toWorker = 0;
    this.attached = true;
    this.log = null; // the worker records what it takes and completes
    return { ring: this.ring, notifyFd: this.notifyFd, completeFd: this.completeFd };
  }

  /**
   * The worker let go at (lastAvail, usedIdx): what is still forwarded completes into the used
   * ring, recorded in `log` (the ring's inflight record) as the worker would have.
   */
  detach(lastAvail: number, usedIdx: number, log: VirtQueueLog | null = null): void {
    if (!this.attached) return;
    this.attached = false;
    this.resume(lastAvail, usedIdx);
    this.log = log;
  }

  /** Forwarded requests not yet completed (in flight here, or not yet popped). */
  get busy(): boolean {
    return this.inFlight > 0 || this.hasAvail();
  }

  override pop(e: VirtQueueElement): number {
    const ring = this.ring;
    if (Atomics.load(ring, 0) === this.consumed) return 0;
    const head = ring[HDR + ((this.consumed >>> 0) % this.num)]!;
    this.consumed = (this.consumed + 1) | 0;
    Atomics.store(ring, 1, this.consumed);
    const r = this.take(e, head);
    if (r > 0) this.noteRange(e);
    return r;
  }

  /** Remembers a read's or write's guest range, to learn its mapping once it is done. */
  private noteRange(e: VirtQueueElement): void {
    const h = e.head;
    this.rangeBytes[h] = -1;
    if (e.fault || e.outNum === 0 || e.outLen[0]! < HDR) return;
    const m = this.mem;
    const a = e.outAddr[0]!;
    const type = m.getUint32(a, true);
    if (type !== T_IN && type !== T_OUT) return;
    const lo = m.getUint32(a + 8, true);
    const hi = m.getUint32(a + 12, true);
    this.rangeOffset[h] = (hi * 2 ** 32 + lo) * 512;
    this.rangeBytes[h] = type === T_IN ? e.inBytes - 1 : e.outBytes - HDR;
  }

  override push(e: VirtQueueElement, len: number): boolean {
    const h = e.head;
    const bytes = this.rangeBytes[h]!;
    if (!this.attached) {
      if (!super.push(e, len)) return false;
    } else {
      if (!this.release(e)) return false;
      const ring = this.ring;
      const at = HDR + this.num + 2 * ((this.produced >>> 0) % this.num);
      ring[at] = h;
      ring[at + 1] = len;
      this.produced = (this.produced + 1) | 0;
      Atomics.store(ring, 2, this.produced);
      this.toWorker++;
    }
    if (bytes > 0) this.onDone(this.rangeOffset[h]!, bytes);
    this.rangeBytes[h] = -1;
    return true;
  }

  override flush(): boolean {
    if (!this.attached) return super.flush();
    if (this.toWorker > 0) {
      this.toWorker = 0;
      eventfdWrite(this.completeFd);
    }
    return false; // the worker decides about interrupts
  }

  /** The avail ring is the worker's: nothing to ask the driver for. */
  override updateAvailEvent(): void {}

  override hasAvail(): boolean {
    return Atomics.load(this.ring, 0) !== this.consumed;
  }

  close(): void {
    closeFd(this.completeFd);
  }
}

/**
 * The forwarded requests of one session on one memory table: a VirtioBlk whose queues are
 * ForwardQueues, each with its notify watcher. Kept (retired) after a memory change until its
 * requests are done, holding that table's mapping.
 */
export class Forwarder {
  readonly dev: VirtioBlk;
  private readonly watchers: EventFdWatcher[] = [];
  private readonly release: () => void;
  private closed = false;
  private released = false;

  constructor(
    readonly memory: GuestMemoryTable,
    io: BackendIO,
    private readonly o: {
      numQueues: number;
      blockSize: number;
      serial: string;
      features: bigint;
      /** The used ring of `index` got entries (detached queues): signal the call fd. */
      call: (index: number) => void;
      /** Queue `index` has nothing forwarded left. */
      idle: (f: Forwarder, index: number) => void;
      /** A forwarded read or write of [offset, +bytes) completed. */
      done: (offset: number, bytes: number) => void;
    },
  ) {
    const ram = memory.ram!;
    this.release = memory.hold();
    const dev = new VirtioBlk(ram, io, { numQueues: o.numQueues, queueSize: MAX_QUEUE_SIZE, serial: o.serial, blockSize: o.blockSize });
    dev.activate(o.features);
    const ev = dev.queues[0]!.eventIdx;
    for (let i = 0; i < o.numQueues; i++) {
      const q = new ForwardQueue(ram, i, o.done);
      q.eventIdx = ev;
      dev.queues[i] = q;
      this.watchers.push(new EventFdWatcher(q.notifyFd, () => dev.kick(i)));
    }
    dev.transport = { notifyQueue: (vq) => o.call(vq.index), notifyConfig: () => {}, isrCleared: () => {} };
    dev.onFinish = (vq) => {
      if (this.closed) this.releaseWhenIdle();
      else if (!(vq as ForwardQueue).busy) {
        // Published now, not at the batch's end: whoever takes the ring next reads the used index.
        if (vq.flush()) o.call(vq.index);
        o.idle(this, vq.index);
      }
    };
    this.dev = dev;
  }

  queue(i: number): ForwardQueue {
    return this.dev.queues[i] as ForwardQueue;
  }

  busy(i: number): boolean {
    return this.queue(i).busy;
  }

  get anyBusy(): boolean {
    return this.dev.queues.some((q) => (q as ForwardQueue).busy);
  }

  drainedBegin(): void {
    this.dev.drainedBegin();
  }

  drainedEnd(): void {
    this.dev.drainedEnd();
  }

  /** Nothing more is popped; requests in flight finish (into the used ring); then the mapping goes. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.dev.drainedBegin();
    for (const w of this.watchers) w.close();
    this.releaseWhenIdle();
  }

  /** After close: release the memory and fds once no request is in flight. */
  private releaseWhenIdle(): void {
    if (this.released || this.dev.queues.some((q) => q.inFlight > 0)) return;
    this.released = true;
    for (const q of this.dev.queues) {
      if (q.flush()) this.o.call(q.index);
      (q as ForwardQueue).close();
    }
    this.release();
  }
}
