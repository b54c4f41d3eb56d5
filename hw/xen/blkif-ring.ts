/**
 * The blkif shared ring (xen-ring.h, xen-blkif.h): a header { u32 req_prod, req_event,
 * rsp_prod, rsp_event; 48 bytes of padding } then entries (the union of a request and a
 * response: 112 bytes in the x86_64 ABI, 108 in x86_32, where u64 is 4-aligned), as many as
 * the largest power of two that fits in the ring's pages. A multi-page ring is one byte range over its
 * pages in order (entries may straddle pages), each page mapped through its own grant.
 *
 * Layouts, x86_64-abi (x86_32-abi: id @4, sector @12, seg @20, nr_sectors @20, indirect
 * handle @20 and grefs @24; the response is the same but 12 bytes), little-endian:
 *   request    op u8 @0, nr_segments u8 @1, handle u16 @2, id u64 @8, sector u64 @16,
 *              seg[11] @24 + 8i: { gref u32 @0, first_sect u8 @4, last_sect u8 @5 }
 *   discard    op @0, flag u8 @1, handle @2, id @8, sector @16, nr_sectors u64 @24
 *   indirect   op @0, indirect_op u8 @1, nr_segments u16 @2, id @8, sector @16,
 *              handle u16 @24, indirect_grefs[8] u32 @28
 *   response   id u64 @0, op u8 @8, status s16 @10 (16 bytes, in the 112-byte slot)
 */
import type { GrantTable } from './grant-table.js';
import type { XenStore } from './xenstore.js';

export const BLKIF_OP_READ = 0;
export const BLKIF_OP_WRITE = 1;
export const BLKIF_OP_WRITE_BARRIER = 2;
export const BLKIF_OP_FLUSH_DISKCACHE = 3;
export const BLKIF_OP_DISCARD = 5;
export const BLKIF_OP_INDIRECT = 6;
export const BLKIF_MAX_SEGMENTS_PER_REQUEST = 11;
export const BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST = 8;
export const BLKIF_DISCARD_SECURE = 1;
export const BLKIF_RSP_OKAY = 0;
export const BLKIF_RSP_ERROR = -1;
export const BLKIF_RSP_EOPNOTSUPP = -2;

export const RING_PAGE_SIZE = 4096;
export const SRING_HEADER = 64;
export const BLKIF_ENTRY_SIZE = 112;
export const BLKIF_RESPONSE_SIZE = 16;
export const BLKIF_SEGMENT_SIZE = 8;
/** Segments per indirect page. */
export const SEGS_PER_INDIRECT_FRAME = RING_PAGE_SIZE / BLKIF_SEGMENT_SIZE;
export const XEN_IO_PROTO_ABI_X86_64 = 'x86_64-abi';
export const XEN_IO_PROTO_ABI_X86_32 = 'x86_32-abi';

/** Where an ABI puts the request fields that move (offsets in the slot). */
export interface BlkifAbi {
  name: string;
  entry: number;
  id: number;
  sector: number;
  seg: number;
  nrSectors: number;
  indHandle: number;
  indGrefs: number;
  rspSize: number;
}
export const ABI_X86_64: BlkifAbi = { name: XEN_IO_PROTO_ABI_X86_64, entry: 112, id: 8, sector: 16, seg: 24, nrSectors: 24, indHandle: 24, indGrefs: 28, rspSize: 16 };
export const ABI_X86_32: BlkifAbi = { name: XEN_IO_PROTO_ABI_X86_32, entry: 108, id: 4, sector: 12, seg: 20, nrSectors: 20, indHandle: 20, indGrefs: 24, rspSize: 12 };
export const BLKIF_ABIS: readonly BlkifAbi[] = [ABI_X86_64, ABI_X86_32];

/** Ring entries for a ring of `pages` pages (__CONST_RING_SIZE). */
export function blkifRingSize(pages: number, abi: BlkifAbi = ABI_X86_64): number {
  const n = Math.floor((pages * RING_PAGE_SIZE - SRING_HEADER) / abi.entry);
  return n <= 0 ? 0 : 2 ** Math.floor(Math.log2(n));
}

export interface BlkifSegment {
  gref: number;
  firstSect: number;
  lastSect: number;
}

/** A request as read from the ring (a private copy: the guest may change the slot meanwhile). */
export interface BlkifRequest {
  operation: number;
  /** nr_segments (u8 for direct requests, u16 for indirect). */
  nrSegments: number;
  handle: number;
  id: bigint;
  sector: bigint;
  /** Direct segments (at most 11, as many as nrSegments says, capped). */
  seg: BlkifSegment[];
  /** DISCARD: flag and nr_sectors. */
  discardFlag: number;
  nrSectors: bigint;
  /** INDIRECT: the inner operation and the indirect page grants. */
  indirectOp: number;
  indirectGrefs: number[];
}

/** Decodes a request slot. */
export function decodeRequest(b: Uint8Array, abi: BlkifAbi = ABI_X86_64): BlkifRequest {
  const dv = new DataView(b.buffer, b.byteOffset, abi.entry);
  const operation = dv.getUint8(0);
  const r: BlkifRequest = {
    operation, nrSegments: dv.getUint8(1), handle: dv.getUint16(2, true), id: dv.getBigUint64(abi.id, true),
    sector: dv.getBigUint64(abi.sector, true), seg: [], discardFlag: 0, nrSectors: 0n, indirectOp: 0, indirectGrefs: [],
  };
  if (operation === BLKIF_OP_DISCARD) {
    r.discardFlag = dv.getUint8(1);
    r.nrSegments = 0;
    r.nrSectors = dv.getBigUint64(abi.nrSectors, true);
  } else if (operation === BLKIF_OP_INDIRECT) {
    r.indirectOp = dv.getUint8(1);
    r.nrSegments = dv.getUint16(2, true);
    r.handle = dv.getUint16(abi.indHandle, true);
    for (let i = 0; i < BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST; i++) r.indirectGrefs.push(dv.getUint32(abi.indGrefs + 4 * i, true));
  } else {
    for (let i = 0; i < Math.min(r.nrSegments, BLKIF_MAX_SEGMENTS_PER_REQUEST); i++) r.seg.push(decodeSegment(dv, abi.seg + BLKIF_SEGMENT_SIZE * i));
  }
  return r;
}

export function decodeSegment(dv: DataView, at: number): BlkifSegment {
  return { gref: dv.getUint32(at, true), firstSect: dv.getUint8(at + 4), lastSect: dv.getUint8(at + 5) };
}

/** Encodes a request slot (guest side). */
export function encodeRequest(r: Partial<BlkifRequest> & { operation: number; id: bigint }, abi: BlkifAbi = ABI_X86_64): Uint8Array {
  const b = new Uint8Array(abi.entry);
  const dv = new DataView(b.buffer);
  dv.setUint8(0, r.operation);
  dv.setBigUint64(abi.id, r.id, true);
  dv.setBigUint64(abi.sector, r.sector ?? 0n, true);
  if (r.operation === BLKIF_OP_DISCARD) {
    dv.setUint8(1, r.discardFlag ?? 0);
    dv.setUint16(2, r.handle ?? 0, true);
    dv.setBigUint64(abi.nrSectors, r.nrSectors ?? 0n, true);
  } else if (r.operation === BLKIF_OP_INDIRECT) {
    dv.setUint8(1, r.indirectOp ?? 0);
    dv.setUint16(2, r.nrSegments ?? 0, true);
    dv.setUint16(abi.indHandle, r.handle ?? 0, true);
    (r.indirectGrefs ?? []).slice(0, BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST).forEach((g, i) => dv.setUint32(abi.indGrefs + 4 * i, g, true));
  } else {
    const seg = r.seg ?? [];
    dv.setUint8(1, r.nrSegments ?? seg.length);
    dv.setUint16(2, r.handle ?? 0, true);
    seg.slice(0, BLKIF_MAX_SEGMENTS_PER_REQUEST).forEach((s, i) => encodeSegment(dv, abi.seg + BLKIF_SEGMENT_SIZE * i, s));
  }
  return b;
}

export function encodeSegment(dv: DataView, at: number, s: BlkifSegment): void {
  dv.setUint32(at, s.gref, true);
  dv.setUint8(at + 4, s.firstSect);
  dv.setUint8(at + 5, s.lastSect);
}

export interface BlkifResponse {
  id: bigint;
  operation: number;
  status: number;
}

export function decodeResponse(b: Uint8Array): BlkifResponse {
  const dv = new DataView(b.buffer, b.byteOffset, 12);
  return { id: dv.getBigUint64(0, true), operation: dv.getUint8(8), status: dv.getInt16(10, true) };
}

/** A shared ring seen as one byte range over its (mapped) pages. */
export class SharedRing {
  readonly size: number;

  constructor(private readonly pages: readonly Uint8Array[], readonly abi: BlkifAbi = ABI_X86_64) {
    this.size = blkifRingSize(pages.length, abi);
  }

  private u32(at: number): number {
    const p = this.pages[0]!;
    return (p[at]! | (p[at + 1]! << 8) | (p[at + 2]! << 16) | (p[at + 3]! << 24)) >>> 0;
  }

  private setU32(at: number, v: number): void {
    const p = this.pages[0]!;
    for (let i = 0; i < 4; i++) p[at + i] = (v >>> (8 * i)) & 0xff;
  }

  get reqProd(): number { return this.u32(0); }
  get reqEvent(): number { return this.u32(4); }
  set reqEvent(v: number) { this.setU32(4, v >>> 0); }
  get rspProd(): number { return this.u32(8); }
  set rspProd(v: number) { this.setU32(8, v >>> 0); }
  get rspEvent(): number { return this.u32(12); }

  /** Copies [off, off+len) of the ring's byte range out. */
  read(off: number, len: number): Uint8Array {
    const out = new Uint8Array(len);
    for (let done = 0; done < len;) {
      const at = off + done;
      const page = this.pages[Math.floor(at / RING_PAGE_SIZE)]!;
      const inPage = at % RING_PAGE_SIZE;
      const n = Math.min(len - done, RING_PAGE_SIZE - inPage);
      out.set(page.subarray(inPage, inPage + n), done);
      done += n;
    }
    return out;
  }

  write(off: number, data: Uint8Array): void {
    for (let done = 0; done < data.length;) {
      const at = off + done;
      const page = this.pages[Math.floor(at / RING_PAGE_SIZE)]!;
      const inPage = at % RING_PAGE_SIZE;
      const n = Math.min(data.length - done, RING_PAGE_SIZE - inPage);
      page.set(data.subarray(done, done + n), inPage);
      done += n;
    }
  }

  /** Byte offset of ring slot for index `idx`. */
  slot(idx: number): number {
    return SRING_HEADER + ((idx >>> 0) & (this.size - 1)) * this.abi.entry;
  }

  readRequest(idx: number): BlkifRequest {
    return decodeRequest(this.read(this.slot(idx), this.abi.entry), this.abi);
  }

  writeResponse(idx: number, r: BlkifResponse): void {
    const b = new Uint8Array(this.abi.rspSize);
    const dv = new DataView(b.buffer);
    dv.setBigUint64(0, r.id, true);
    dv.setUint8(8, r.operation);
    dv.setInt16(10, r.status, true);
    this.write(this.slot(idx), b);
  }
}

/**
 * Maps the data pages of `segs` (deviceWrites: a READ, the device writes guest memory) and
 * returns the I/O vector and the sector count; null for a bad segment (first_sect after
 * last_sect, last_sect past the page) or a bad grant.
 */
export function mapSegments(grants: GrantTable, domid: number, segs: readonly BlkifSegment[], deviceWrites: boolean): { iov: Uint8Array[]; sectors: number } | null {
  const iov: Uint8Array[] = [];
  let sectors = 0;
  for (const s of segs) {
    if (s.firstSect > s.lastSect || s.lastSect >= RING_PAGE_SIZE / 512) return null;
    try {
      iov.push(grants.map(s.gref, domid, deviceWrites).subarray(s.firstSect * 512, (s.lastSect + 1) * 512));
    } catch {
      return null;
    }
    sectors += s.lastSect - s.firstSect + 1;
  }
  return { iov, sectors };
}

/** The segment list of an INDIRECT request, copied out of its granted pages; null if bad. */
export function readIndirectSegments(grants: GrantTable, domid: number, req: BlkifRequest, max: number): BlkifSegment[] | null {
  const n = req.nrSegments;
  const frames = Math.ceil(n / SEGS_PER_INDIRECT_FRAME);
  if (n === 0 || n > max || frames > BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST) return null;
  const segs: BlkifSegment[] = [];
  for (let f = 0; f < frames; f++) {
    let page: Uint8Array;
    try {
      // A private copy: the guest may rewrite the page while the request runs.
      page = new Uint8Array(grants.map(req.indirectGrefs[f]!, domid, false));
    } catch {
      return null;
    }
    const dv = new DataView(page.buffer);
    for (let i = 0; i < SEGS_PER_INDIRECT_FRAME && segs.length < n; i++) segs.push(decodeSegment(dv, i * BLKIF_SEGMENT_SIZE));
  }
  return segs;
}

/**
 * The frontend's transport keys: protocol (x86_64-abi, the default, or x86_32-abi), ring-page-order (or the older
 * num-ring-pages), ring-ref (one page) or ring-ref0..N-1, event-channel. An error message
 * if any is missing or out of range.
 */
export function readRingParams(xs: XenStore, fe: string, maxOrder: number): { refs: number[]; port: number; abi: BlkifAbi } | string {
  const proto = xs.read(`${fe}/protocol`) ?? XEN_IO_PROTO_ABI_X86_64;
  const abi = BLKIF_ABIS.find((a) => a.name === proto);
  if (!abi) return `unsupported protocol '${proto}'`;
  let order = xs.readInt(`${fe}/ring-page-order`);
  if (order === undefined) {
    const n = xs.readInt(`${fe}/num-ring-pages`) ?? 1;
    order = Math.log2(n);
    if (!Number.isInteger(order)) return `num-ring-pages ${n} is not a power of two`;
  }
  if (order > maxOrder) return `ring-page-order ${order} is above ${maxOrder}`;
  const refs: number[] = [];
  for (let i = 0; i < 1 << order; i++) {
    const ref = order === 0 ? (xs.readInt(`${fe}/ring-ref`) ?? xs.readInt(`${fe}/ring-ref0`)) : xs.readInt(`${fe}/ring-ref${i}`);
    if (ref === undefined) return `missing ring-ref${order === 0 ? '' : i}`;
    refs.push(ref);
  }
  const port = xs.readInt(`${fe}/event-channel`);
  if (port === undefined) return 'missing event-channel';
  return { refs, port, abi };
}
