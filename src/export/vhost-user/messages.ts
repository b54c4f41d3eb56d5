/**
 * vhost-user messages as the back-end sees them: reading one framed message and its fds off the
 * connection, sending a reply, refusing a request, and the payload readers shared by the
 * handlers in backend.ts.
 */
import { closeFd, type UnixConnection } from '../../native/unix-fd.js';
import type { MemoryRegionDesc } from './memory.js';
import {
  dataView, decodeHeader, encodeReply, HEADER_SIZE, MAX_FDS, MAX_MEM_REGIONS, MAX_PAYLOAD, MEM_REGION_SIZE,
  MEM_TABLE_HEADER, requestName, safeU64, VHOST_USER_VERSION, VHOST_USER_VERSION_MASK, VHOST_USER_VRING_IDX_MASK,
  VHOST_USER_VRING_NOFD_MASK, VRING_ADDR_PAYLOAD, VRING_STATE_PAYLOAD,
} from './protocol.js';

/** A refused request: REPLY_ACK failure when asked for, else the connection is closed. */
export class VhostUserRefused extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'VhostUserRefused';
  }
}

export interface Message {
  request: number;
  flags: number;
  payload: Uint8Array;
  fds: number[];
}

export function refuse(message: string): never {
  throw new VhostUserRefused(message);
}

/** Reassembles messages from the connection, one recv at a time. */
export class MessageReader {
  private readonly hdr = new Uint8Array(HEADER_SIZE);
  private hdrHave = 0;
  private payload: Uint8Array | null = null;
  private payloadHave = 0;
  private pendingFds: number[] = [];

  /** Whether part of a message has arrived (an EOF now is not orderly). */
  get midMessage(): boolean {
    return this.hdrHave > 0;
  }

  /**
   * One recv: a complete message, 'more' (call again), 'eof', or null (nothing to read now).
   * Throws on a malformed header or too many fds.
   */
  read(conn: UnixConnection): Message | 'more' | 'eof' | null {
    // Read exactly what the current message still needs, so fds never cross messages.
    let target: Uint8Array;
    if (this.hdrHave < HEADER_SIZE) target = this.hdr.subarray(this.hdrHave);
    else target = this.payload!.subarray(this.payloadHave);
    const r = conn.recv(target, MAX_FDS);
    if (r === null) return null;
    this.pendingFds.push(...r.fds);
    if (r.bytes === 0) return r.fds.length > 0 ? 'more' : 'eof';
    if (this.pendingFds.length > MAX_FDS) throw new Error(`vhost-user: more than ${MAX_FDS} fds with one message`);
    if (this.hdrHave < HEADER_SIZE) {
      this.hdrHave += r.bytes;
      if (this.hdrHave < HEADER_SIZE) return 'more';
      const h = decodeHeader(this.hdr);
      if ((h.flags & VHOST_USER_VERSION_MASK) !== VHOST_USER_VERSION) {
        throw new Error(`vhost-user: bad version in flags 0x${h.flags.toString(16)} (${requestName(h.request)})`);
      }
      if (h.size > MAX_PAYLOAD) throw new Error(`vhost-user: ${requestName(h.request)} payload of ${h.size} bytes exceeds ${MAX_PAYLOAD}`);
      this.payload = new Uint8Array(h.size);
      this.payloadHave = 0;
    } else {
      this.payloadHave += r.bytes;
    }
    if (this.payloadHave < this.payload!.length) return 'more';
    const h = decodeHeader(this.hdr);
    const msg: Message = { request: h.request, flags: h.flags, payload: this.payload!, fds: this.pendingFds };
    this.hdrHave = 0;
    this.payload = null;
    this.pendingFds = [];
    return msg;
  }

  /** Drops the partial message; returns the fds received with it (the caller closes them). */
  discard(): number[] {
    const fds = this.pendingFds;
    this.pendingFds = [];
    this.payload = null;
    return fds;
  }
}

export function sendReply(conn: UnixConnection, request: number, payload: Uint8Array, fds: readonly number[] = []): void {
  const m = encodeReply(request, payload);
  const n = conn.send(m, fds);
  // Replies are small and the front-end waits for each one; a short write means it is not reading.
  if (n !== m.length) throw new Error(`vhost-user: short write of ${requestName(request)} reply (${n} of ${m.length})`);
}

// --- payload readers ---

export function noPayload(m: Message): void {
  if (m.fds.length > 0) refuse(`${m.fds.length} unexpected fds`);
}

export function u64(m: Message): bigint {
  noPayload(m);
  if (m.payload.length < 8) refuse(`payload of ${m.payload.length} bytes, need a u64`);
  return dataView(m.payload).getBigUint64(0, true);
}

/** A u64 payload that may come with fds (SET_VRING_KICK/CALL/ERR). */
export function u64Fds(m: Message): bigint {
  if (m.payload.length < 8) refuse(`payload of ${m.payload.length} bytes, need a u64`);
  return dataView(m.payload).getBigUint64(0, true);
}

/** A vring state payload: [ring index, value]. */
export function vringState(m: Message): [number, number] {
  noPayload(m);
  if (m.payload.length < VRING_STATE_PAYLOAD) refuse(`payload of ${m.payload.length} bytes, need a vring state`);
  const dv = dataView(m.payload);
  return [dv.getUint32(0, true), dv.getUint32(4, true)];
}

/** SET_VRING_ADDR's payload, checked: ring index, flags and the three user addresses (aligned). */
export function vringAddr(m: Message): { index: number; flags: number; desc: number; used: number; avail: number; log: number } {
  noPayload(m);
  if (m.payload.length < VRING_ADDR_PAYLOAD) refuse(`payload of ${m.payload.length} bytes, need a vring address`);
  const dv = dataView(m.payload);
  const index = dv.getUint32(0, true);
  const desc = safeU64(dv, 8);
  const used = safeU64(dv, 16);
  const avail = safeU64(dv, 24);
  if (desc === null || used === null || avail === null) refuse(`ring ${index}: address beyond 2^53`);
  // virtio 1.x 2.7: descriptor table 16-byte, available ring 2-byte, used ring 4-byte aligned.
  if (desc % 16 !== 0 || avail % 2 !== 0 || used % 4 !== 0) refuse(`ring ${index}: misaligned ring address`);
  return { index, flags: dv.getUint32(4, true), desc, used, avail, log: safeU64(dv, 32) ?? 0 };
}

/** SET_VRING_KICK/CALL/ERR's payload, checked against the fds that came: the ring index, and whether it has no fd. */
export function vringFd(m: Message): { index: number; noFd: boolean } {
  const v = u64Fds(m);
  if (v > BigInt(VHOST_USER_VRING_IDX_MASK | VHOST_USER_VRING_NOFD_MASK)) refuse(`payload 0x${v.toString(16)} has reserved bits`);
  const n = Number(v);
  const noFd = (n & VHOST_USER_VRING_NOFD_MASK) !== 0;
  if (noFd && m.fds.length !== 0) refuse(`no-fd bit set but ${m.fds.length} fds came`);
  if (!noFd && m.fds.length !== 1) refuse(`${m.fds.length} fds, expected 1`);
  return { index: n & VHOST_USER_VRING_IDX_MASK, noFd };
}

/** SET_MEM_TABLE's regions, one fd each (m.fds in the same order). */
export function memTableRegions(m: Message): MemoryRegionDesc[] {
  const p = m.payload;
  if (p.length < MEM_TABLE_HEADER) refuse(`payload of ${p.length} bytes, need a memory table`);
  const dv = dataView(p);
  const n = dv.getUint32(0, true);
  if (n < 1 || n > MAX_MEM_REGIONS) refuse(`${n} regions (1..${MAX_MEM_REGIONS} supported)`);
  if (p.length < MEM_TABLE_HEADER + n * MEM_REGION_SIZE) refuse(`payload of ${p.length} bytes is short for ${n} regions`);
  if (m.fds.length !== n) refuse(`${n} regions but ${m.fds.length} fds`);
  const descs: MemoryRegionDesc[] = [];
  for (let i = 0; i < n; i++) {
    const o = MEM_TABLE_HEADER + i * MEM_REGION_SIZE;
    const guestPhysAddr = safeU64(dv, o);
    const size = safeU64(dv, o + 8);
    const userAddr = safeU64(dv, o + 16);
    const mmapOffset = safeU64(dv, o + 24);
    if (guestPhysAddr === null || size === null || userAddr === null || mmapOffset === null) refuse(`region ${i}: address beyond 2^53`);
    descs.push({ guestPhysAddr, size, userAddr, mmapOffset });
  }
  return descs;
}

export function closeFdQuietly(fd: number): void {
  try {
    closeFd(fd);
  } catch {
    // already closed; nothing else to do
  }
}
