/**
 * The split virtqueue (virtio 1.0 section 2.4), device side. Every guest address is checked
 * against guest RAM before it is touched; a popped chain's buffers are guest addresses and
 * lengths (no copies, no views: the device makes those it needs). A malformed chain is reported on its element (`fault`) so the device can fail
 * that request; a malformed ring (bad head, head reused while in flight, avail index jumping
 * by more than the queue size, rings outside RAM) makes `pop` return -1 with `error` set, and
 * the device marks itself broken. Used entries are written at once; the used index is stored
 * (and the interrupt decided) once per batch, in `flush`.
 */
import type { GuestRam } from '../core/memory.js';

export const VRING_DESC_F_NEXT = 1;
export const VRING_DESC_F_WRITE = 2;
export const VRING_DESC_F_INDIRECT = 4;
export const VRING_AVAIL_F_NO_INTERRUPT = 1;
export const VRING_USED_F_NO_NOTIFY = 1;
/** The largest queue a device may offer (and the longest indirect table accepted). */
export const VIRTQUEUE_MAX_SIZE = 1024;
export const VIRTIO_NO_VECTOR = 0xffff;

/**
 * A record of the chains in flight that outlives the device's process (vhost-user's inflight
 * I/O tracking): the queue reports each step in an order a restarted back-end can rely on.
 */
export interface VirtQueueLog {
  /** Chain `head` was taken: in flight until a published used index covers it. */
  taken(head: number): void;
  /** `head`'s used element was written (not yet published). */
  pushed(head: number): void;
  /** The used index was stored as `usedIdx`: everything pushed before it is done. */
  published(usedIdx: number): void;
}

/**
 * One popped descriptor chain: device-readable (`out`) then device-writable (`in`) buffers,
 * as guest-physical address and length pairs already checked to lie inside guest RAM (the
 * device makes views of them only where it needs one). Reused: the arrays keep their storage
 * and only entries [0, outNum) / [0, inNum) are valid; `clear` resets the counts.
 */
export class VirtQueueElement {
  head = 0;
  readonly outAddr: number[] = [];
  readonly outLen: number[] = [];
  outNum = 0;
  readonly inAddr: number[] = [];
  readonly inLen: number[] = [];
  inNum = 0;
  outBytes = 0;
  inBytes = 0;
  /** Why the chain is malformed ('' if it is not); buffers walked before (and around) it are kept. */
  fault = '';
  /** The queue's generation when popped: a completion from an older generation is dropped. */
  gen = 0;

  clear(): void {
    this.outNum = 0;
    this.inNum = 0;
    this.outBytes = 0;
    this.inBytes = 0;
    this.fault = '';
  }
}

export class VirtQueue {
  /** Current size (0: the queue does not exist or is not set up). */
  num: number;
  desc = 0;
  avail = 0;
  used = 0;
  /** Modern queue_enable (legacy: set when the PFN is written). */
  enabled = false;
  /** MSI-X vector (VIRTIO_NO_VECTOR: none). */
  vector = VIRTIO_NO_VECTOR;
  /** Whether VIRTIO_RING_F_EVENT_IDX was negotiated (set by the device). */
  eventIdx = false;
  /** Whether VIRTIO_F_NOTIFY_ON_EMPTY was negotiated. */
  notifyOnEmpty = false;
  /** Bumped on reset and on ring changes; elements popped before are orphaned. */
  gen = 0;
  /** What went wrong with the ring, when pop returns -1. */
  error = '';
  /** Where chains in flight are recorded (vhost-user inflight tracking), or null. */
  log: VirtQueueLog | null = null;
  /** Heads a previous back-end left in flight, popped before the avail ring (resume). */
  private resubmit: readonly number[] = [];
  private resubmitAt = 0;
  private lastAvail = 0;
  private usedIdx = 0;
  private publishedUsed = 0;
  private pending = 0;
  private inflightCount = 0;
  private valid = false;
  private readonly inflight = new Uint8Array(VIRTQUEUE_MAX_SIZE);
  private readonly dv: DataView;
  /**
   * The used ring as 16-bit words, for stores that must be fenced (Atomics.store is
   * sequentially consistent: xchg on x86); null while the rings are not valid.
   */
  private usedWords: Uint16Array | null = null;

  constructor(private readonly ram: GuestRam, readonly index: number, readonly maxNum: number) {
    this.num = maxNum;
    this.dv = ram.dv;
  }

  /**
   * A 16-bit store into the used ring (its index or avail_event) followed by a full fence: when
   * the driver runs on another CPU (a vhost-user front-end's guest), the load that follows must
   * not pass the store, or a kick or an interrupt can be lost (virtio 1.x 2.7.7 / 2.7.10).
   */
  private storeFenced(addr: number, v: number): void {
    const w = this.usedWords;
    if (w) Atomics.store(w, (addr - this.used) >>> 1, v);
    else this.dv.setUint16(addr, v, true);
  }

  reset(): void {
    this.num = this.maxNum;
    this.desc = this.avail = this.used = 0;
    this.enabled = false;
    this.vector = VIRTIO_NO_VECTOR;
    this.eventIdx = false;
    this.notifyOnEmpty = false;
    this.ringsChanged();
  }

  /** The rings moved (or the queue was reset): start over, orphaning what is in flight. */
  ringsChanged(): void {
    this.gen++;
    this.lastAvail = this.usedIdx = this.publishedUsed = 0;
    this.pending = 0;
    this.inflight.fill(0);
    this.inflightCount = 0;
    this.error = '';
    this.resubmit = [];
    this.resubmitAt = 0;
    const n = this.num;
    this.valid = n > 0 && (n & (n - 1)) === 0 && this.desc % 16 === 0 && this.avail % 2 === 0 && this.used % 4 === 0 &&
      this.ram.contains(this.desc, 16 * n) && this.ram.contains(this.avail, 6 + 2 * n) && this.ram.contains(this.used, 6 + 8 * n);
    const at = this.ram.byteOffset + this.used;
    this.usedWords = this.valid && at % 2 === 0 ? new Uint16Array(this.ram.buffer, at, 3 + 4 * n) : null;
  }

  /** Legacy layout from a page frame number: desc, avail after it, used on the next 4 KiB. */
  setLegacyPfn(pfn: number): void {
    if (pfn === 0) {
      this.desc = this.avail = this.used = 0;
      this.enabled = false;
    } else {
      this.desc = pfn * 4096;
      this.avail = this.desc + 16 * this.num;
      this.used = Math.ceil((this.avail + 6 + 2 * this.num) / 4096) * 4096;
      this.enabled = true;
    }
    this.ringsChanged();
  }

  /** Set up, enabled, and its rings inside RAM. */
  get ready(): boolean {
    return this.enabled && this.desc !== 0;
  }

  get inFlight(): number {
    return this.inflightCount;
  }

  /** The next avail index to pop (what a vhost-user back-end reports as the ring's base). */
  get lastAvailIdx(): number {
    return this.lastAvail;
  }

  /**
   * Continue a ring another owner ran (vhost-user's SET_VRING_BASE): pop from `lastAvail`, push
   * after `usedIdx` (read from the used ring). Call after ringsChanged(). `resubmit`: heads
   * in flight when a previous owner died (in their original order), popped first.
   */
  resume(lastAvail: number, usedIdx: number, resubmit: readonly number[] = []): void {
    this.lastAvail = lastAvail & 0xffff;
    this.usedIdx = this.publishedUsed = usedIdx & 0xffff;
    this.resubmit = resubmit;
    this.resubmitAt = 0;
  }

  /** The used index currently in guest memory (0 if the ring is not valid). */
  usedIdxInRam(): number {
    return this.valid ? this.dv.getUint16(this.used + 2, true) : 0;
  }

  /**
   * Pops the next available chain into `e`: 1 when popped (check e.fault), 0 when empty,
   * -1 when the ring itself is broken (`error` says why).
   */
  pop(e: VirtQueueElement): number {
    if (!this.valid) return this.fail(`queue ${this.index}: rings are not inside guest RAM or are misaligned`);
    if (this.resubmitAt < this.resubmit.length) {
      const r = this.take(e, this.resubmit[this.resubmitAt]!);
      if (r > 0) this.resubmitAt++;
      return r;
    }
    const dv = this.dv;
    const n = this.num;
    const availIdx = dv.getUint16(this.avail + 2, true);
    const count = (availIdx - this.lastAvail) & 0xffff;
    if (count === 0) return 0;
    if (count > n) return this.fail(`queue ${this.index}: avail index moved by ${count}, more than the queue size ${n}`);
    const head = dv.getUint16(this.avail + 4 + 2 * (this.lastAvail % n), true);
    const r = this.take(e, head);
    if (r > 0) this.lastAvail = (this.lastAvail + 1) & 0xffff;
    return r;
  }

  /**
   * Takes chain `head` into `e` as in flight (pop's second half; a subclass whose heads come
   * from elsewhere calls it directly): 1, or -1 when the head is out of range or in flight.
   */
  protected take(e: VirtQueueElement, head: number): number {
    if (!this.valid) return this.fail(`queue ${this.index}: rings are not inside guest RAM or are misaligned`);
    if (head >= this.num) return this.fail(`queue ${this.index}: head ${head} is beyond the queue size ${this.num}`);
    if (this.inflight[head]) return this.fail(`queue ${this.index}: head ${head} made available again while in flight`);
    this.inflight[head] = 1;
    this.inflightCount++;
    this.log?.taken(head);
    e.clear();
    e.head = head;
    e.gen = this.gen;
    e.fault = this.walk(e, head);
    return 1;
  }

  /** Ends `e`'s time in flight without a used entry (a subclass that returns chains elsewhere). */
  protected release(e: VirtQueueElement): boolean {
    if (e.gen !== this.gen || !this.inflight[e.head]) return false;
    this.inflight[e.head] = 0;
    this.inflightCount--;
    return true;
  }

  protected fail(why: string): number {
    this.error = why;
    return -1;
  }

  /** Reads a chain into `e`; returns the fault ('' if none). Bounded by the table sizes. */
  private walk(e: VirtQueueElement, head: number): string {
    const dv = this.dv;
    const ram = this.ram;
    let table = this.desc;
    let tableLen = this.num;
    let limit = this.num;
    let i = head;
    let count = 0;
    let indirect = false;
    let fault = '';
    for (;;) {
      if (++count > limit) return `descriptor chain of head ${head} is longer than its table (a loop?)`;
      const d = table + 16 * i;
      const lo = dv.getUint32(d, true);
      const hi = dv.getUint32(d + 4, true);
      const len = dv.getUint32(d + 8, true);
      const flags = dv.getUint16(d + 12, true);
      const next = dv.getUint16(d + 14, true);
      const addr = hi * 2 ** 32 + lo;
      if (flags & VRING_DESC_F_INDIRECT) {
        if (indirect) return 'nested indirect descriptor';
        if (count !== 1) return 'indirect descriptor not at the head of its chain';
        if (flags & VRING_DESC_F_NEXT) return 'indirect descriptor with NEXT set';
        if (len === 0 || len % 16 !== 0 || len / 16 > VIRTQUEUE_MAX_SIZE) return `indirect table length ${len} is invalid`;
        if (!ram.contains(addr, len)) return `indirect table at 0x${addr.toString(16)}+${len} is not inside guest RAM`;
        table = addr;
        tableLen = limit = len / 16;
        i = 0;
        count = 0;
        indirect = true;
        continue;
      }
      const write = (flags & VRING_DESC_F_WRITE) !== 0;
      if (!write && e.inNum) return 'device-readable descriptor after a device-writable one';
      if (len === 0) fault ||= 'zero-length descriptor';
      else if (!ram.contains(addr, len)) fault ||= `buffer at 0x${addr.toString(16)}+${len} is not inside guest RAM`;
      else if (write) {
        const k = e.inNum++;
        e.inAddr[k] = addr;
        e.inLen[k] = len;
        e.inBytes += len;
      } else {
        const k = e.outNum++;
        e.outAddr[k] = addr;
        e.outLen[k] = len;
        e.outBytes += len;
      }
      if (!(flags & VRING_DESC_F_NEXT)) return fault;
      if (next >= tableLen) return `next index ${next} is beyond the table of ${tableLen}`;
      i = next;
    }
  }

  /** Returns a popped chain; `len` bytes were written into it. False if the element is orphaned. */
  push(e: VirtQueueElement, len: number): boolean {
    if (e.gen !== this.gen || !this.valid) return false;
    const slot = this.used + 4 + 8 * (this.usedIdx % this.num);
    this.dv.setUint32(slot, e.head, true);
    this.dv.setUint32(slot + 4, len, true);
    this.usedIdx = (this.usedIdx + 1) & 0xffff;
    this.inflight[e.head] = 0;
    this.inflightCount--;
    this.pending++;
    this.log?.pushed(e.head);
    return true;
  }

  /** Publishes the pushed entries with one used->idx store; returns whether to interrupt. */
  flush(): boolean {
    if (this.pending === 0 || !this.valid) return false;
    this.pending = 0;
    const dv = this.dv;
    const old = this.publishedUsed;
    const now = this.usedIdx;
    this.storeFenced(this.used + 2, now);
    this.publishedUsed = now;
    this.log?.published(now);
    if (this.eventIdx) {
      const usedEvent = dv.getUint16(this.avail + 4 + 2 * this.num, true);
      return ((now - usedEvent - 1) & 0xffff) < ((now - old) & 0xffff);
    }
    if (this.notifyOnEmpty && this.inflightCount === 0 && dv.getUint16(this.avail + 2, true) === this.lastAvail) return true;
    return !(dv.getUint16(this.avail, true) & VRING_AVAIL_F_NO_INTERRUPT);
  }

  /** With EVENT_IDX: asks the driver to kick once it adds beyond what was consumed. */
  updateAvailEvent(): void {
    if (this.eventIdx && this.valid) this.storeFenced(this.used + 4 + 8 * this.num, this.lastAvail);
  }

  /** Whether the driver made more chains available than were popped. */
  hasAvail(): boolean {
    return this.valid && (this.resubmitAt < this.resubmit.length || this.dv.getUint16(this.avail + 2, true) !== this.lastAvail);
  }
}
