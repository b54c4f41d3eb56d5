// A TypeScript vhost-user front-end for the vhost-user-blk tests: QEMU's side of the control
// plane (framed messages, REPLY_ACK, memfd guest RAM, QEMU's start-up sequence) and a minimal
// virtio-blk driver over that guest RAM (split virtqueue, indirect tables, EVENT_IDX) that
// kicks the ring's kick eventfd and waits on its call eventfd. Shared by vhost-user.test.ts
// (control plane) and vhost-user-dataplane.test.ts (data plane).
import { readdirSync } from 'node:fs';
import { expect } from 'vitest';
import {
  closeFd, eventfd, eventfdRead, eventfdWrite, memfdCreate, mmapFd, unmapFd, UnixConnection,
} from '../../src/native/unix-fd.js';
import type { VhostUserBlkBackend } from '../../src/export/vhost-user/backend.js';
import * as P from '../../src/export/vhost-user/protocol.js';
import { VIRTIO_BLK_F_FLUSH } from '../../hw/virtio/virtio-blk-abi.js';
import { VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE } from '../../hw/virtio/virtqueue.js';

export const fdCount = (): number => readdirSync('/proc/self/fd').length;
export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
export async function until(what: string, pred: () => boolean, ms = 3000): Promise<void> {
  const end = Date.now() + ms;
  while (!pred()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(2);
  }
}
/** `n` turns of the event loop (each runs I/O polling once): lets ready callbacks run. */
export async function turns(n = 5): Promise<void> {
  for (let i = 0; i < n; i++) await new Promise<void>((r) => setImmediate(r));
}

export interface Reply {
  request: number;
  flags: number;
  payload: Uint8Array;
}

/** QEMU's side: sends requests, collects replies, notices EOF. */
export class FrontEnd {
  private readonly buf = Buffer.alloc(65536);
  private data = Buffer.alloc(0);
  replies: Reply[] = [];
  eof = false;
  constructor(readonly conn: UnixConnection) {
    conn.onReadable((err) => {
      if (err) {
        this.eof = true;
        return;
      }
      for (;;) {
        const r = conn.recv(this.buf);
        if (r === null) return;
        for (const fd of r.fds) closeFd(fd);
        if (r.bytes === 0) {
          this.eof = true;
          return;
        }
        this.data = Buffer.concat([this.data, this.buf.subarray(0, r.bytes)]);
        while (this.data.length >= P.HEADER_SIZE) {
          const h = P.decodeHeader(this.data);
          if (this.data.length < P.HEADER_SIZE + h.size) break;
          this.replies.push({ request: h.request, flags: h.flags, payload: new Uint8Array(this.data.subarray(P.HEADER_SIZE, P.HEADER_SIZE + h.size)) });
          this.data = this.data.subarray(P.HEADER_SIZE + h.size);
        }
      }
    });
  }
  static connect(path: string): FrontEnd {
    return new FrontEnd(UnixConnection.connect(path));
  }
  send(request: number, payload: Uint8Array = new Uint8Array(0), fds: number[] = [], needReply = false): void {
    const m = P.encodeMessage(request, P.VHOST_USER_VERSION | (needReply ? P.VHOST_USER_NEED_REPLY_MASK : 0), payload);
    expect(this.conn.send(m, fds)).toBe(m.length);
  }
  sendRaw(bytes: Uint8Array, fds: number[] = []): void {
    expect(this.conn.send(bytes, fds)).toBe(bytes.length);
  }
  async reply(request: number): Promise<Uint8Array> {
    await until(`reply to ${P.requestName(request)}`, () => this.replies.length > 0 || this.eof);
    const r = this.replies.shift();
    if (!r) throw new Error(`connection closed instead of a reply to ${P.requestName(request)}`);
    expect(r.request).toBe(request);
    expect(r.flags).toBe(P.VHOST_USER_VERSION | P.VHOST_USER_REPLY_MASK);
    return r.payload;
  }
  async call(request: number, payload?: Uint8Array, fds?: number[], needReply = false): Promise<Uint8Array> {
    this.send(request, payload, fds, needReply);
    return this.reply(request);
  }
  async u64(request: number, payload?: Uint8Array): Promise<bigint> {
    const p = await this.call(request, payload);
    expect(p.length).toBe(8);
    return P.dataView(p).getBigUint64(0, true);
  }
  async ack(request: number, payload?: Uint8Array, fds?: number[]): Promise<bigint> {
    this.send(request, payload, fds, true);
    const p = await this.reply(request);
    expect(p.length).toBe(8);
    return P.dataView(p).getBigUint64(0, true);
  }
  /** No reply arrives within a few loop turns (and the connection is still up). */
  async silent(): Promise<void> {
    await sleep(30);
    expect(this.replies).toEqual([]);
    expect(this.eof).toBe(false);
  }
  close(): void {
    this.conn.close();
  }
}

export function memTable(regions: { gpa: number; size: number; uva: number; off: number }[]): Uint8Array {
  const p = new Uint8Array(P.MEM_TABLE_HEADER + regions.length * P.MEM_REGION_SIZE);
  const dv = P.dataView(p);
  dv.setUint32(0, regions.length, true);
  regions.forEach((r, i) => {
    const o = P.MEM_TABLE_HEADER + i * P.MEM_REGION_SIZE;
    dv.setBigUint64(o, BigInt(r.gpa), true);
    dv.setBigUint64(o + 8, BigInt(r.size), true);
    dv.setBigUint64(o + 16, BigInt(r.uva), true);
    dv.setBigUint64(o + 24, BigInt(r.off), true);
  });
  return p;
}

export function vringAddr(index: number, desc: number, used: number, avail: number, flags = 0): Uint8Array {
  const p = new Uint8Array(P.VRING_ADDR_PAYLOAD);
  const dv = P.dataView(p);
  dv.setUint32(0, index, true);
  dv.setUint32(4, flags, true);
  dv.setBigUint64(8, BigInt(desc), true);
  dv.setBigUint64(16, BigInt(used), true);
  dv.setBigUint64(24, BigInt(avail), true);
  return p;
}

export function configReq(offset: number, size: number, flags = 0, data?: Uint8Array): Uint8Array {
  const p = new Uint8Array(P.CONFIG_HEADER + size);
  const dv = P.dataView(p);
  dv.setUint32(0, offset, true);
  dv.setUint32(4, size, true);
  dv.setUint32(8, flags, true);
  if (data) p.set(data, P.CONFIG_HEADER);
  return p;
}

export const MiB = 1 << 20;
export const EXPORT_LEN = 64 * MiB + 512 * 3;
// Guest RAM: one memfd of 4 MiB described as two regions, the second after a hole and at an mmap
// offset, like QEMU's split of RAM around the PCI hole (kept below 4 GiB: see memory.ts).
export const RAM = 4 * MiB;
export const LOW = { gpa: 0, size: 2 * MiB, uva: 0x7f0000000000, off: 0 };
export const HIGH = { gpa: 0x10000000, size: 2 * MiB, uva: 0x7f0000400000, off: 2 * MiB };
export const QSIZE = 128;

/** What the tests hold and afterEach releases (see releaseHeld). */
export const frontEnds: FrontEnd[] = [];
export const servers: { close(): void }[] = [];
export const toClose: number[] = [];
export const toUnmap: ArrayBuffer[] = [];

/** For afterEach: front-ends, then servers, then fds and mappings. */
export function releaseHeld(): void {
  for (const f of frontEnds.splice(0)) f.close();
  for (const s of servers.splice(0)) s.close();
  for (const fd of toClose.splice(0)) closeFd(fd);
  for (const b of toUnmap.splice(0)) unmapFd(b);
}

/** Hands `fd` over (closed by the test itself): afterEach must not close it again. */
export function forget(fd: number): void {
  const i = toClose.indexOf(fd);
  if (i >= 0) toClose.splice(i, 1);
}

/** Connects a front-end to a server (or export) and waits for its session. */
export async function connect(server: { readonly session: VhostUserBlkBackend | null }, path: string): Promise<{ fe: FrontEnd; be: VhostUserBlkBackend }> {
  const fe = FrontEnd.connect(path);
  frontEnds.push(fe);
  await until('session', () => server.session !== null);
  return { fe, be: server.session! };
}

export interface GuestRamFd {
  fd: number;
  /** The front-end's own mapping of the memfd (offsets, not guest addresses: see ramOffset). */
  view: Uint8Array;
}

/** Guest RAM as the front-end holds it: a memfd and its own mapping. */
export function guestRam(): GuestRamFd {
  const fd = memfdCreate('guest-ram', RAM);
  toClose.push(fd);
  const buf = mmapFd(fd, RAM, 0, true);
  toUnmap.push(buf);
  const view = new Uint8Array(buf);
  for (let i = 0; i < RAM; i += 4096) view[i] = (i / 4096) & 0xff; // page-number pattern
  view[RAM - 1] = 0xa5;
  return { fd, view };
}

/** Where guest-physical `gpa` (in LOW or HIGH) is in the memfd. */
export function ramOffset(gpa: number, len = 1): number {
  for (const r of [LOW, HIGH]) if (gpa >= r.gpa && gpa + len <= r.gpa + r.size) return gpa - r.gpa + r.off;
  throw new RangeError(`guest address 0x${gpa.toString(16)}+${len} is not in guest RAM`);
}

/** Ring i's layout in the HIGH region (user addresses). */
export function ringLayout(i: number): { desc: number; avail: number; used: number } {
  const base = HIGH.uva + 0x10000 * (i + 1);
  return { desc: base, avail: base + 16 * QSIZE, used: base + 0x1000 };
}
/** The same, as guest-physical addresses. */
export function ringLayoutGpa(i: number): { desc: number; avail: number; used: number } {
  const l = ringLayout(i);
  const g = (uva: number): number => uva - HIGH.uva + HIGH.gpa;
  return { desc: g(l.desc), avail: g(l.avail), used: g(l.used) };
}

export interface StartupOptions {
  /** Export length (GET_CONFIG capacity); default EXPORT_LEN. */
  length?: number;
  /** Features to ack from those offered; default all but FLUSH (a guest that does not want flush). */
  acked?: (offered: bigint) => bigint;
  /** SET_VRING_BASE of ring i; default 7 + i. */
  base?: (i: number) => number;
}

/** The vhost-user-blk start-up sequence as QEMU performs it. Returns the eventfds it sent. */
export async function qemuStartup(fe: FrontEnd, ramFd: number, numQueues: number, o: StartupOptions = {}): Promise<{ kicks: number[]; calls: number[] }> {
  const length = o.length ?? EXPORT_LEN;
  const features = await fe.u64(P.VHOST_USER_GET_FEATURES);
  expect(features & P.bit(P.VHOST_USER_F_PROTOCOL_FEATURES)).not.toBe(0n);
  const proto = await fe.u64(P.VHOST_USER_GET_PROTOCOL_FEATURES);
  expect(proto).toBe(P.bit(P.VHOST_USER_PROTOCOL_F_MQ) | P.bit(P.VHOST_USER_PROTOCOL_F_REPLY_ACK) | P.bit(P.VHOST_USER_PROTOCOL_F_CONFIG));
  fe.send(P.VHOST_USER_SET_PROTOCOL_FEATURES, P.u64Payload(proto));
  expect(await fe.u64(P.VHOST_USER_GET_QUEUE_NUM)).toBe(BigInt(numQueues));
  // From here QEMU asks for acks (REPLY_ACK negotiated).
  expect(await fe.ack(P.VHOST_USER_SET_OWNER)).toBe(0n);
  const cfg = await fe.call(P.VHOST_USER_GET_CONFIG, configReq(0, 60));
  expect(cfg.length).toBe(P.CONFIG_HEADER + 60);
  const cdv = P.dataView(cfg.subarray(P.CONFIG_HEADER));
  expect(cdv.getBigUint64(0, true)).toBe(BigInt(Math.floor(length / 512)));
  expect(cdv.getUint32(20, true)).toBe(512); // blk_size
  expect(cdv.getUint16(34, true)).toBe(numQueues); // num_queues
  const acked = o.acked ? o.acked(features) : features & ~P.bit(VIRTIO_BLK_F_FLUSH);
  expect(await fe.ack(P.VHOST_USER_SET_FEATURES, P.u64Payload(acked))).toBe(0n);
  expect(await fe.ack(P.VHOST_USER_SET_MEM_TABLE, memTable([LOW, HIGH]), [ramFd, ramFd])).toBe(0n);
  const kicks: number[] = [];
  const calls: number[] = [];
  for (let i = 0; i < numQueues; i++) {
    const l = ringLayout(i);
    expect(await fe.ack(P.VHOST_USER_SET_VRING_NUM, P.vringStatePayload(i, QSIZE))).toBe(0n);
    expect(await fe.ack(P.VHOST_USER_SET_VRING_BASE, P.vringStatePayload(i, o.base ? o.base(i) : 7 + i))).toBe(0n);
    expect(await fe.ack(P.VHOST_USER_SET_VRING_ADDR, vringAddr(i, l.desc, l.used, l.avail))).toBe(0n);
    const kick = eventfd();
    const call = eventfd();
    kicks.push(kick);
    calls.push(call);
    toClose.push(kick, call);
    expect(await fe.ack(P.VHOST_USER_SET_VRING_KICK, P.u64Payload(i), [kick])).toBe(0n);
    expect(await fe.ack(P.VHOST_USER_SET_VRING_CALL, P.u64Payload(i), [call])).toBe(0n);
    expect(await fe.ack(P.VHOST_USER_SET_VRING_ENABLE, P.vringStatePayload(i, 1))).toBe(0n);
  }
  return { kicks, calls };
}

// --- a minimal virtio-blk driver (the guest's side of the rings) ---

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
    // Linux's virtqueue_enable_cb with EVENT_IDX: interrupt me at the next used entry.
    if (this.eventIdx && !this.holdUsedEvent) this.w16(this.usedEventAddr, this.lastUsed);
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
