// A TypeScript vhost-user front-end for the vhost-user-blk tests: QEMU's side of the control
// plane (framed messages, REPLY_ACK, memfd guest RAM, QEMU's start-up sequence); the guest's
// virtio-blk driver over that RAM is in vhost-user-blk-driver.ts. Shared by vhost-user.test.ts
// (control plane), the vhost-user-dataplane-*.test.ts (data plane) and vhost-user-fastpath.test.ts.
import { readdirSync } from 'node:fs';
import { expect } from 'vitest';
import { closeFd, eventfd, memfdCreate, mmapFd, unmapFd, UnixConnection } from '../../src/native/unix-fd.js';
import type { VhostUserBlkBackend } from '../../src/export/vhost-user/backend.js';
import * as P from '../../src/export/vhost-user/protocol.js';
import { VIRTIO_BLK_F_FLUSH } from '../../hw/virtio/virtio-blk-abi.js';

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
  /** fds that came with it (GET_INFLIGHT_FD); reply() closes them, replyFds() hands them over. */
  fds: number[];
}

/** QEMU's side: sends requests, collects replies, notices EOF. */
export class FrontEnd {
  private readonly buf = Buffer.alloc(65536);
  private data = Buffer.alloc(0);
  private fds: number[] = [];
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
        // fds arrive with a message's first bytes: they belong to the next reply completed.
        this.fds.push(...r.fds);
        if (r.bytes === 0) {
          this.eof = true;
          return;
        }
        this.data = Buffer.concat([this.data, this.buf.subarray(0, r.bytes)]);
        while (this.data.length >= P.HEADER_SIZE) {
          const h = P.decodeHeader(this.data);
          if (this.data.length < P.HEADER_SIZE + h.size) break;
          this.replies.push({ request: h.request, flags: h.flags, payload: new Uint8Array(this.data.subarray(P.HEADER_SIZE, P.HEADER_SIZE + h.size)), fds: this.fds });
          this.fds = [];
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
    const r = await this.replyFds(request);
    for (const fd of r.fds) closeFd(fd);
    return r.payload;
  }
  /** The next reply with its fds (the caller owns them). */
  async replyFds(request: number): Promise<Reply> {
    await until(`reply to ${P.requestName(request)}`, () => this.replies.length > 0 || this.eof);
    const r = this.replies.shift();
    if (!r) throw new Error(`connection closed instead of a reply to ${P.requestName(request)}`);
    expect(r.request).toBe(request);
    expect(r.flags).toBe(P.VHOST_USER_VERSION | P.VHOST_USER_REPLY_MASK);
    return r;
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
// offset, like QEMU's split of RAM around the PCI hole; the second sits above 6 GiB, as a large
// guest's does (beyond what one typed array can span: rings there are reached through DataViews
// and views made per buffer).
export const RAM = 4 * MiB;
export const LOW = { gpa: 0, size: 2 * MiB, uva: 0x7f0000000000, off: 0 };
export const HIGH = { gpa: 0x180000000, size: 2 * MiB, uva: 0x7f0000400000, off: 2 * MiB };
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
  /**
   * Inflight tracking, as QEMU does it: 'new' (default) asks for a buffer (GET_INFLIGHT_FD) and
   * hands it back (SET_INFLIGHT_FD); an Inflight from an earlier session is handed back as a
   * restarted QEMU keeps it; 'off' leaves the protocol feature unacked.
   */
  inflight?: 'new' | 'off' | Inflight;
  /** Also give each ring an err eventfd (QEMU does, at device init); returned in `errs`. */
  err?: boolean;
  /** The config's blk_size expected (the export's logical block size); default 512. */
  blockSize?: number;
}

/** The inflight buffer as the front-end keeps it: its fd (closed after the test) and a mapping. */
export interface Inflight {
  fd: number;
  size: number;
  numQueues: number;
  queueSize: number;
  buffer: ArrayBuffer;
}

function inflightPayload(size: number, numQueues: number, queueSize: number): Uint8Array {
  const p = new Uint8Array(24);
  const dv = P.dataView(p);
  dv.setBigUint64(0, BigInt(size), true);
  dv.setUint16(16, numQueues, true);
  dv.setUint16(18, queueSize, true);
  return p;
}

/** GET_INFLIGHT_FD for `numQueues` queues of QSIZE: the buffer the back-end made, mapped here too. */
export async function getInflight(fe: FrontEnd, numQueues: number, queueSize = QSIZE): Promise<Inflight> {
  fe.send(P.VHOST_USER_GET_INFLIGHT_FD, inflightPayload(0, numQueues, queueSize));
  const r = await fe.replyFds(P.VHOST_USER_GET_INFLIGHT_FD);
  expect(r.payload.length).toBe(24);
  expect(r.fds.length).toBe(1);
  const dv = P.dataView(r.payload);
  const size = Number(dv.getBigUint64(0, true));
  expect(dv.getBigUint64(8, true)).toBe(0n);
  expect([dv.getUint16(16, true), dv.getUint16(18, true)]).toEqual([numQueues, queueSize]);
  const fd = r.fds[0]!;
  toClose.push(fd);
  const buffer = mmapFd(fd, size);
  toUnmap.push(buffer);
  return { fd, size, numQueues, queueSize, buffer };
}

/** SET_INFLIGHT_FD with a buffer the front-end kept. */
export async function setInflight(fe: FrontEnd, inf: Inflight): Promise<void> {
  expect(await fe.ack(P.VHOST_USER_SET_INFLIGHT_FD, inflightPayload(inf.size, inf.numQueues, inf.queueSize), [inf.fd])).toBe(0n);
}

/** The vhost-user-blk start-up sequence as QEMU performs it. Returns the eventfds it sent. */
export async function qemuStartup(
  fe: FrontEnd, ramFd: number, numQueues: number, o: StartupOptions = {},
): Promise<{ kicks: number[]; calls: number[]; errs: number[]; inflight: Inflight | null }> {
  const length = o.length ?? EXPORT_LEN;
  const features = await fe.u64(P.VHOST_USER_GET_FEATURES);
  expect(features & P.bit(P.VHOST_USER_F_PROTOCOL_FEATURES)).not.toBe(0n);
  const offered = await fe.u64(P.VHOST_USER_GET_PROTOCOL_FEATURES);
  const inflightBit = P.bit(P.VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD);
  expect(offered).toBe(P.bit(P.VHOST_USER_PROTOCOL_F_MQ) | P.bit(P.VHOST_USER_PROTOCOL_F_REPLY_ACK) | P.bit(P.VHOST_USER_PROTOCOL_F_CONFIG) |
    P.bit(P.VHOST_USER_PROTOCOL_F_SLAVE_REQ) | inflightBit);
  const mode = o.inflight ?? 'new';
  const proto = mode === 'off' ? offered & ~inflightBit : offered;
  fe.send(P.VHOST_USER_SET_PROTOCOL_FEATURES, P.u64Payload(proto));
  expect(await fe.u64(P.VHOST_USER_GET_QUEUE_NUM)).toBe(BigInt(numQueues));
  // From here QEMU asks for acks (REPLY_ACK negotiated).
  expect(await fe.ack(P.VHOST_USER_SET_OWNER)).toBe(0n);
  const cfg = await fe.call(P.VHOST_USER_GET_CONFIG, configReq(0, 60));
  expect(cfg.length).toBe(P.CONFIG_HEADER + 60);
  const cdv = P.dataView(cfg.subarray(P.CONFIG_HEADER));
  expect(cdv.getBigUint64(0, true)).toBe(BigInt(Math.floor(length / 512)));
  expect(cdv.getUint32(20, true)).toBe(o.blockSize ?? 512); // blk_size
  expect(cdv.getUint16(34, true)).toBe(numQueues); // num_queues
  // vhost_user_blk_start: the inflight buffer before the device starts.
  const inflight = mode === 'off' ? null : mode === 'new' ? await getInflight(fe, numQueues) : mode;
  if (inflight) await setInflight(fe, inflight);
  const acked = o.acked ? o.acked(features) : features & ~P.bit(VIRTIO_BLK_F_FLUSH);
  expect(await fe.ack(P.VHOST_USER_SET_FEATURES, P.u64Payload(acked))).toBe(0n);
  expect(await fe.ack(P.VHOST_USER_SET_MEM_TABLE, memTable([LOW, HIGH]), [ramFd, ramFd])).toBe(0n);
  const kicks: number[] = [];
  const calls: number[] = [];
  const errs: number[] = [];
  for (let i = 0; i < numQueues; i++) {
    const l = ringLayout(i);
    if (o.err) {
      const err = eventfd();
      errs.push(err);
      toClose.push(err);
      expect(await fe.ack(P.VHOST_USER_SET_VRING_ERR, P.u64Payload(i), [err])).toBe(0n);
    }
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
  return { kicks, calls, errs, inflight };
}

/**
 * QEMU killed: its socket, the ring eventfds and the inflight buffer it held go (the test
 * stops tracking them).
 */
export function killFrontEnd(fe: FrontEnd, fds: readonly number[], inflight: Inflight | null = null): void {
  fe.close();
  const i = frontEnds.indexOf(fe);
  if (i >= 0) frontEnds.splice(i, 1);
  for (const fd of inflight ? [...fds, inflight.fd] : fds) {
    forget(fd);
    closeFd(fd);
  }
  if (inflight) {
    toUnmap.splice(toUnmap.indexOf(inflight.buffer), 1);
    unmapFd(inflight.buffer);
  }
}

/**
 * QEMU's vhost_dev_start for ring `index` after a GET_VRING_BASE: num, base, addr, a new kick
 * eventfd, enable; every step acked. Returns the new kick fd (closed after the test).
 */
export async function restartRing(fe: FrontEnd, index: number, base: number): Promise<number> {
  const l = ringLayout(index);
  expect(await fe.ack(P.VHOST_USER_SET_VRING_NUM, P.vringStatePayload(index, QSIZE))).toBe(0n);
  expect(await fe.ack(P.VHOST_USER_SET_VRING_BASE, P.vringStatePayload(index, base))).toBe(0n);
  expect(await fe.ack(P.VHOST_USER_SET_VRING_ADDR, vringAddr(index, l.desc, l.used, l.avail))).toBe(0n);
  const kick = eventfd();
  toClose.push(kick);
  expect(await fe.ack(P.VHOST_USER_SET_VRING_KICK, P.u64Payload(index), [kick])).toBe(0n);
  expect(await fe.ack(P.VHOST_USER_SET_VRING_ENABLE, P.vringStatePayload(index, 1))).toBe(0n);
  return kick;
}
