// A minimal virtio-blk driver for the vhost-user-blk tests, the guest's side of the rings: a
// split virtqueue in the front-end's guest RAM (vhost-user-frontend.ts), indirect tables and
// EVENT_IDX, kicking the ring's kick eventfd and waiting on its call eventfd.
import { eventfdRead, eventfdWrite } from '../../src/native/unix-fd.js';
import { VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE } from '../../hw/virtio/virtqueue.js';
import { pattern } from '../helpers/tmp.js';
import { type GuestRamFd, QSIZE, ramOffset, ringLayoutGpa } from './vhost-user-frontend.js';

/** `len` bytes of a seeded pattern, as guest data. */
export const fill = (len: number, seed: number): Uint8Array => new Uint8Array(pattern(len, seed));
/** A discard / write-zeroes segment (struct virtio_blk_discard_write_zeroes). */
export function dwz(sector: number, count: number, flags = 0): Uint8Array {
  const b = new Uint8Array(16);
  const v = new DataView(b.buffer);
  v.setBigUint64(0, BigInt(sector), true);
  v.setUint32(8, count, true);
  v.setUint32(12, flags, true);
  return b;
}

/** One buffer of a request: at `gpa` (allocated if absent), `len` bytes, device-readable data to put there. */
export interface Seg {
  len: number;
  gpa?: number;
  data?: Uint8Array;
  /** Device-writable? Default: by request type (IN and GET_ID data is writable, the rest readable). */
  write?: boolean;
}

export interface SubmitOptions {
  /** Put the chain in an indirect table (one descriptor in the ring). */
  indirect?: boolean;
  /** Where the status byte goes (default: allocated). */
  statusGpa?: number;
}

/** A request published to the avail ring. */
export interface Pending {
  head: number;
  /** Avail index the request was published at. */
  availIdx: number;
  segs: { gpa: number; len: number; write: boolean }[];
  statusGpa: number;
  /** Unique per driver (heads are reused). */
  seq: number;
}

export interface Completion {
  head: number;
  /** The used element's len (bytes the device says it wrote). */
  len: number;
  status: number;
  /** Copies of the device-writable data buffers (all but the status byte). */
  data: Uint8Array[];
  /** Used index (before increment) the entry was found at. */
  usedIdx: number;
}

const u16 = (n: number): number => n & 0xffff;
/** linux/virtio_ring.h vring_need_event. */
export const needEvent = (event: number, newIdx: number, old: number): boolean => u16(newIdx - event - 1) < u16(newIdx - old);

/**
 * A virtio-blk driver on one split virtqueue in the front-end's guest RAM (ring i of ringLayout),
 * with a scratch area in LOW for headers, status bytes, indirect tables and data.
 */
export class BlkDriver {
  readonly desc: number;
  readonly avail: number;
  readonly used: number;
  kickFd = -1;
  callFd = -1;
  /** Interrupts seen: the sum of call eventfd counters read. */
  calls = 0;
  /** Kicks sent. */
  kicks = 0;
  /** Whether EVENT_IDX was negotiated (the driver then keeps used_event and reads avail_event). */
  eventIdx = false;
  /** When true, the driver does not move used_event (tests set it by hand). */
  holdUsedEvent = false;
  /** Protocol violations the device made (used ids not in flight ...). */
  readonly errors: string[] = [];
  private availIdx: number;
  private lastUsed: number;
  private readonly free: number[];
  private readonly inFlight = new Map<number, { p: Pending; descs: number[] }>();
  private readonly done = new Map<number, Completion>();
  private readonly scratchStart: number;
  private scratch: number;
  private readonly dv: DataView;
  private seq = 0;
  /** More guest RAM (hot-plugged regions): guest-physical base and the front-end's mapping. */
  readonly extra: { gpa: number; view: Uint8Array }[] = [];

  constructor(readonly ram: GuestRamFd, readonly index: number, base = 7 + index, readonly qsize = QSIZE) {
    const l = ringLayoutGpa(index);
    this.desc = l.desc;
    this.avail = l.avail;
    this.used = l.used;
    this.dv = new DataView(ram.view.buffer, ram.view.byteOffset, ram.view.byteLength);
    // Clean rings; both indexes at the base (steady state: everything made available was used).
    ram.view.fill(0, ramOffset(this.desc), ramOffset(this.desc) + 16 * qsize);
    ram.view.fill(0, ramOffset(this.avail), ramOffset(this.avail) + 6 + 2 * qsize);
    ram.view.fill(0, ramOffset(this.used), ramOffset(this.used) + 6 + 8 * qsize);
    this.availIdx = u16(base);
    this.lastUsed = u16(base);
    this.w16(this.avail + 2, this.availIdx);
    this.w16(this.used + 2, this.lastUsed);
    this.w16(this.usedEventAddr, this.lastUsed);
    this.free = Array.from({ length: qsize }, (_, i) => i);
    this.scratchStart = this.scratch = 0x40000 + index * 0x40000;
  }

  attach(kickFd: number, callFd: number, eventIdx: boolean): void {
    this.kickFd = kickFd;
    this.callFd = callFd;
    this.eventIdx = eventIdx;
  }

  // guest memory accessors (guest-physical addresses)
  r16(gpa: number): number {
    return this.dv.getUint16(ramOffset(gpa, 2), true);
  }
  w16(gpa: number, v: number): void {
    this.dv.setUint16(ramOffset(gpa, 2), v, true);
  }
  r32(gpa: number): number {
    return this.dv.getUint32(ramOffset(gpa, 4), true);
  }
  /** Guest memory at `gpa` as the front-end maps it (LOW, HIGH, or a region added to `extra`). */
  bytes(gpa: number, len: number): Uint8Array {
    for (const r of this.extra) if (gpa >= r.gpa && gpa + len <= r.gpa + r.view.length) return r.view.subarray(gpa - r.gpa, gpa - r.gpa + len);
    const o = ramOffset(gpa, len);
    return this.ram.view.subarray(o, o + len);
  }
  /** Like bytes(), or null for a range outside guest RAM (a buffer the test put in a hole). */
  tryBytes(gpa: number, len: number): Uint8Array | null {
    try {
      return this.bytes(gpa, len);
    } catch {
      return null;
    }
  }
  get usedIdx(): number {
    return this.r16(this.used + 2);
  }
  get availIndex(): number {
    return this.availIdx;
  }
  /** avail_event: used->ring[num] (written by the device with EVENT_IDX). */
  get availEvent(): number {
    return this.r16(this.used + 4 + 8 * this.qsize);
  }
  get usedEventAddr(): number {
    return this.avail + 4 + 2 * this.qsize;
  }
  /** The used element at used index `i`. */
  usedElem(i: number): { id: number; len: number } {
    const slot = this.used + 4 + 8 * (i % this.qsize);
    return { id: this.r32(slot), len: this.r32(slot + 4) };
  }
  get outstanding(): number {
    return this.inFlight.size;
  }

  /** Scratch memory in LOW (bump allocator over 256 KiB, wrapping), `align`-aligned. */
  alloc(len: number, align = 16): number {
    let a = Math.ceil(this.scratch / align) * align;
    if (a + len > this.scratchStart + 0x40000) a = this.scratchStart;
    if (len > 0x40000) throw new RangeError('scratch allocation too large');
    this.scratch = a + len;
    return a;
  }

  /** Builds the chain header / data / status (optionally indirect) and makes it available. No kick. */
  post(type: number, sector: number, segs: Seg[] = [], o: SubmitOptions = {}): Pending {
    const hdr = this.alloc(16);
    const h = this.bytes(hdr, 16);
    const hv = new DataView(h.buffer, h.byteOffset, 16);
    hv.setUint32(0, type, true);
    hv.setUint32(4, 0, true);
    hv.setBigUint64(8, BigInt(sector), true);
    const writable = type === 0 /* IN */ || type === 8 /* GET_ID */;
    const placed = segs.map((s) => {
      const gpa = s.gpa ?? this.alloc(s.len, 512);
      const write = s.write ?? writable;
      if (s.data) this.bytes(gpa, s.data.length).set(s.data);
      return { gpa, len: s.len, write };
    });
    const statusGpa = o.statusGpa ?? this.alloc(1, 1);
    this.bytes(statusGpa, 1)[0] = 0xff;
    const chain = [{ gpa: hdr, len: 16, write: false }, ...placed, { gpa: statusGpa, len: 1, write: true }];
    const descs: number[] = [];
    const take = (): number => {
      const d = this.free.shift();
      if (d === undefined) throw new Error('driver: no free descriptors');
      descs.push(d);
      return d;
    };
    const writeDesc = (table: number, i: number, gpa: number, len: number, flags: number, next: number): void => {
      const b = this.bytes(table + 16 * i, 16);
      const v = new DataView(b.buffer, b.byteOffset, 16);
      v.setBigUint64(0, BigInt(gpa), true);
      v.setUint32(8, len, true);
      v.setUint16(12, flags, true);
      v.setUint16(14, next, true);
    };
    let head: number;
    if (o.indirect) {
      const table = this.alloc(16 * chain.length, 16);
      chain.forEach((c, i) => writeDesc(table, i, c.gpa, c.len, (c.write ? VRING_DESC_F_WRITE : 0) | (i + 1 < chain.length ? VRING_DESC_F_NEXT : 0), i + 1 < chain.length ? i + 1 : 0));
      head = take();
      writeDesc(this.desc, head, table, 16 * chain.length, VRING_DESC_F_INDIRECT, 0);
    } else {
      const ids = chain.map(() => take());
      head = ids[0]!;
      chain.forEach((c, i) => writeDesc(this.desc, ids[i]!, c.gpa, c.len, (c.write ? VRING_DESC_F_WRITE : 0) | (i + 1 < chain.length ? VRING_DESC_F_NEXT : 0), ids[i + 1] ?? 0));
    }
    const p: Pending = { head, availIdx: this.availIdx, segs: placed, statusGpa, seq: this.seq++ };
    this.inFlight.set(head, { p, descs });
    this.publishHead(head);
    return p;
  }

  /** Puts `head` in the avail ring and bumps avail->idx (no kick). */
  publishHead(head: number): void {
    this.w16(this.avail + 4 + 2 * (this.availIdx % this.qsize), head);
    this.availIdx = u16(this.availIdx + 1);
    this.w16(this.avail + 2, this.availIdx);
  }

  /** Whether the device asks for a kick after avail->idx moved from `old` to the current index. */
  needsKick(old: number): boolean {
    if (this.eventIdx) return needEvent(this.availEvent, this.availIdx, old);
    return (this.r16(this.used) & 1 /* VRING_USED_F_NO_NOTIFY */) === 0;
  }

  kick(): void {
    this.kicks++;
    eventfdWrite(this.kickFd);
  }

  /** Reads the call eventfd; on an interrupt, collects the used ring. Returns the counter read. */
  poll(): number {
    const n = this.callFd >= 0 ? eventfdRead(this.callFd) : 0;
    this.calls += n;
    if (n > 0) this.collect();
    return n;
  }

  /** Takes every new used entry: status byte, data copies, descriptors back on the free list. */
  collect(): void {
    for (;;) {
      this.collectOnce();
      if (!this.eventIdx || this.holdUsedEvent) return;
      // Linux's virtqueue_enable_cb with EVENT_IDX: interrupt me at the next used entry; then
      // look again (after a full fence, as virtio_mb): an entry published before used_event was
      // stored gets no interrupt of its own.
      const o = ramOffset(this.usedEventAddr, 2);
      Atomics.store(new Uint16Array(this.ram.view.buffer, this.ram.view.byteOffset + o, 1), 0, this.lastUsed);
      if (this.usedIdx === this.lastUsed) return;
    }
  }

  private collectOnce(): void {
    const idx = this.usedIdx;
    while (this.lastUsed !== idx) {
      const e = this.usedElem(this.lastUsed);
      const f = this.inFlight.get(e.id);
      if (!f) {
        this.errors.push(`used id ${e.id} at used index ${this.lastUsed} is not in flight`);
      } else {
        this.inFlight.delete(e.id);
        this.free.push(...f.descs);
        const data = f.p.segs.filter((s) => s.write).map((s) => Uint8Array.from(this.tryBytes(s.gpa, s.len) ?? []));
        this.done.set(f.p.seq, { head: e.id, len: e.len, status: this.bytes(f.p.statusGpa, 1)[0]!, data, usedIdx: this.lastUsed });
      }
      this.lastUsed = u16(this.lastUsed + 1);
    }
  }

  /** Skips used entries the driver did not make (a test put raw chains on the ring). */
  resync(): void {
    this.lastUsed = this.usedIdx;
    this.errors.length = 0;
  }

  /** Guest-physical ranges the driver itself writes: its scratch area and its rings. */
  get ownRanges(): [number, number][] {
    return [[this.scratchStart, this.scratchStart + 0x40000], [this.desc, this.desc + 16 * this.qsize],
      [this.avail, this.avail + 6 + 2 * this.qsize], [this.used, this.used + 6 + 8 * this.qsize]];
  }

  /** The completion of `p`, if its used entry was collected. */
  completed(p: Pending): Completion | undefined {
    return this.done.get(p.seq);
  }

  /** Waits for `p` by watching the call eventfd (an interrupt must come), then takes its used entry. */
  async wait(p: Pending, what = `request at avail ${p.availIdx}`, ms = 3000): Promise<Completion> {
    const end = Date.now() + ms;
    for (;;) {
      this.poll();
      const c = this.completed(p);
      if (c) {
        this.done.delete(p.seq);
        return c;
      }
      if (Date.now() > end) throw new Error(`timed out waiting for the completion (and interrupt) of ${what} on queue ${this.index}`);
      await new Promise<void>((r) => setImmediate(r));
    }
  }

  /** post, kick (when the device asks for one), wait. */
  async submit(type: number, sector: number, segs: Seg[] = [], o: SubmitOptions = {}): Promise<Completion> {
    const old = this.availIdx;
    const p = this.post(type, sector, segs, o);
    if (this.needsKick(old)) this.kick();
    return this.wait(p);
  }
}
