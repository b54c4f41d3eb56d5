/**
 * qcow2 reads: the synchronous fast path for clusters whose mapping is cached, and the
 * general path (backing files, zero and compressed clusters, subclusters, cache misses).
 */
import { inflateRawSync } from 'node:zlib';
import { completeSoon, zeroIov } from '../../complete.js';
import { BlockError } from '../../error.js';
import * as io from '../../io.js';
import type { BlockNode } from '../../node.js';
import type { IoCallback, IoVec } from '../../types.js';
import { corruptError, KIND_COMPRESSED, KIND_NORMAL, KIND_UNALLOCATED, KIND_ZERO, lookup, lookupCached, newMapping, type Mapping } from './map.js';
import { entryOffset } from './entries.js';
import { qstate, type Qcow2State } from './state.js';

const scratch = newMapping();

function toBlockError(e: unknown, node: BlockNode): BlockError {
  return e instanceof BlockError ? e : new BlockError('EIO', `qcow2 '${node.name}': ${String(e)}`, { node: node.name }, e);
}

/** Whether subclusters [first, last] of an extended-L2 mapping are all allocated. */
export function subAllAlloc(m: Mapping, first: number, last: number): boolean {
  const mask = last === 31 ? (0xffffffff << first) >>> 0 : (((1 << (last + 1)) - 1) & ~((1 << first) - 1)) >>> 0;
  return ((m.alloc >>> 0) & mask) === mask;
}

/** Driver readv: one cached, allocated cluster goes straight to the file; the rest takes the general path. */
export function qcow2Readv(node: BlockNode, offset: number, bytes: number, iov: IoVec, flags: number, cb: IoCallback): void {
  const s = qstate(node);
  const cs = s.geo.clusterSize;
  const inC = offset % cs;
  if (inC + bytes <= cs) {
    const ext = s.geo.l2EntrySize === 16;
    const m = lookupCached(s, offset, scratch);
    if (m) {
      if (m.kind === KIND_NORMAL) {
        if (!ext || subAllAlloc(m, inC >> s.geo.subclusterBits, (inC + bytes - 1) >> s.geo.subclusterBits)) {
          io.readv(s.file, m.host + inC, bytes, iov, flags, cb);
          return;
        }
      } else if (!ext && (m.kind === KIND_ZERO || (m.kind === KIND_UNALLOCATED && noBackingAt(node, offset)))) {
        return zeroFill(iov, bytes, cb);
      }
    } else if (!ext && noL2Table(s, offset) && noBackingAt(node, offset)) {
      // No L2 table for this part of the image and nothing below it: zeroes.
      return zeroFill(iov, bytes, cb);
    }
  }
  readGeneral(node, offset, bytes, iov).then(() => cb(null), (e: unknown) => cb(toBlockError(e, node)));
}

/** Whether the guest offset lies where no backing file supplies data. */
function noBackingAt(node: BlockNode, guest: number): boolean {
  const b = node.backing;
  return !b || guest >= b.node.length;
}

/** Whether the L1 entry covering `guest` links no L2 table (a valid L1 index only). */
function noL2Table(s: Qcow2State, guest: number): boolean {
  const l1Index = Math.floor(Math.floor(guest / s.geo.clusterSize) / s.geo.l2Size);
  return l1Index < s.l1.length / 8 && entryOffset(s.l1, l1Index * 8) === 0;
}

/** Fills the request with zeroes and completes it. */
function zeroFill(iov: IoVec, bytes: number, cb: IoCallback): void {
  zeroIov(iov, bytes);
  completeSoon(cb);
}

function scatter(src: Buffer, iov: IoVec): void {
  let o = 0;
  for (const seg of iov) {
    if (o >= src.length) break;
    const n = Math.min(seg.length, src.length - o);
    seg.set(src.subarray(o, o + n));
    o += n;
  }
}

/** Reads guest bytes from the backing node; past its end reads zeroes. */
export async function readBacking(node: BlockNode, guest: number, out: Buffer): Promise<void> {
  const b = node.backing;
  if (!b) return void out.fill(0);
  const blen = b.node.length;
  const n = Math.max(0, Math.min(out.length, blen - guest));
  if (n > 0) await io.read(b, guest, out.subarray(0, n));
  out.fill(0, n);
}

/** Decompresses the compressed cluster `m` into a full cluster buffer. */
export async function readCompressed(s: Qcow2State, m: Mapping): Promise<Buffer> {
  const cs = s.geo.clusterSize;
  const flen = io.getLength(s.file);
  const n = Math.min(m.compressedBytes, flen - m.host);
  if (n <= 0) throw corruptError(s, `compressed cluster at ${m.host} lies past the end of the file`);
  const raw = Buffer.alloc(n);
  await io.read(s.file, m.host, raw);
  let out: Buffer;
  try {
    out = inflateRawSync(raw, { finishFlush: 2 /* Z_SYNC_FLUSH: trailing sector padding is fine */ });
  } catch (e) {
    throw corruptError(s, `compressed cluster at ${m.host} does not inflate (${(e as Error).message})`);
  }
  if (out.length < cs) throw corruptError(s, `compressed cluster at ${m.host} inflates to ${out.length} bytes, not ${cs}`);
  return out.subarray(0, cs);
}

/** Fills `out` (guest bytes [guest, guest+out.length) inside one cluster) for mapping `m`. */
async function readInCluster(node: BlockNode, s: Qcow2State, m: Mapping, guest: number, out: Buffer): Promise<void> {
  const cs = s.geo.clusterSize;
  const inC = guest % cs;
  switch (m.kind) {
    case KIND_UNALLOCATED:
      if (s.geo.l2EntrySize === 16) return readSubclusters(node, s, m, guest, out);
      return readBacking(node, guest, out);
    case KIND_ZERO:
      if (s.geo.l2EntrySize === 16) return readSubclusters(node, s, m, guest, out);
      return void out.fill(0);
    case KIND_NORMAL:
      if (s.geo.l2EntrySize === 16) return readSubclusters(node, s, m, guest, out);
      return io.read(s.file, m.host + inC, out);
    case KIND_COMPRESSED: {
      const data = await readCompressed(s, m);
      data.copy(out, 0, inC, inC + out.length);
      return;
    }
  }
}

/** Extended L2: each run of subclusters is allocated (host), zero, or read through. */
async function readSubclusters(node: BlockNode, s: Qcow2State, m: Mapping, guest: number, out: Buffer): Promise<void> {
  const sb = s.geo.subclusterBits;
  const scs = 1 << sb;
  const inC = guest % s.geo.clusterSize;
  let pos = 0;
  while (pos < out.length) {
    const sc = (inC + pos) >> sb;
    const state = m.alloc & (1 << sc) ? 1 : m.zero & (1 << sc) ? 2 : 0;
    if (state === 1 && !m.host) throw corruptError(s, `allocated subcluster without a host cluster (L2 table at ${m.l2Offset})`);
    let end = Math.min(out.length, ((sc + 1) << sb) - inC);
    for (let k = sc + 1; end < out.length; k++) {
      const st = m.alloc & (1 << k) ? 1 : m.zero & (1 << k) ? 2 : 0;
      if (st !== state) break;
      end = Math.min(out.length, end + scs);
    }
    const part = out.subarray(pos, end);
    if (state === 1) await io.read(s.file, m.host + inC + pos, part);
    else if (state === 2) part.fill(0);
    else await readBacking(node, guest + pos, part);
    pos = end;
  }
}

/** Waits for every read of a request (they fill the caller's buffer), then fails with the first error. */
function settle(reads: Promise<void>[]): Promise<void> {
  if (reads.length === 1) return reads[0]!;
  return settleAll(reads);
}
async function settleAll(reads: Promise<void>[]): Promise<void> {
  let failed = false;
  let first: unknown;
  await Promise.all(reads.map((p) => p.catch((e: unknown) => {
    if (!failed) first = e;
    failed = true;
  })));
  if (failed) throw first;
}

// What a run of clusters of a request reads from.
const RUN_NONE = 0;
/** Host-contiguous allocated clusters: one read of the file. */
const RUN_HOST = 1;
/** Unallocated clusters: one read of the backing node. */
const RUN_BACKING = 2;
/** Zero clusters: a fill. */
const RUN_ZERO = 3;

/**
 * The general read path. The clusters of the request are looked up in order, from the
 * cached L2 table without waiting where it is cached; neighbours that read alike (from
 * consecutive host clusters, from the backing file, or as zeroes) are merged into one run,
 * and the runs' reads are all issued before any is waited for.
 */
export async function readGeneral(node: BlockNode, offset: number, bytes: number, iov: IoVec): Promise<void> {
  const s = qstate(node);
  const cs = s.geo.clusterSize;
  const ext = s.geo.l2EntrySize === 16;
  const sb = s.geo.subclusterBits;
  const direct = iov.length === 1 && iov[0]!.length >= bytes;
  const out = direct ? Buffer.from(iov[0]!.buffer, iov[0]!.byteOffset, bytes) : Buffer.alloc(bytes);
  const m = newMapping();
  const reads: Promise<void>[] = [];
  // Reads run while later lookups are awaited: a failure must not go unhandled meanwhile
  // (settle() below still reports the first one).
  const issue = (p: Promise<void>): void => {
    p.catch(() => undefined);
    reads.push(p);
  };
  let run = RUN_NONE;
  let runPos = 0;
  let runLen = 0;
  let runHost = 0;
  const endRun = (): void => {
    const part = out.subarray(runPos, runPos + runLen);
    if (run === RUN_HOST) issue(io.read(s.file, runHost, part));
    else if (run === RUN_BACKING && node.backing) issue(readBacking(node, offset + runPos, part));
    else part.fill(0); // zero clusters, or unallocated ones with no backing file
    run = RUN_NONE;
  };
  try {
    for (let pos = 0; pos < bytes; ) {
      const guest = offset + pos;
      const inC = guest % cs;
      const n = Math.min(bytes - pos, cs - inC);
      const mm = lookupCached(s, guest, m) ?? (await lookup(s, guest, m));
      let kind = RUN_NONE;
      if (mm.kind === KIND_NORMAL) {
        if (!ext || subAllAlloc(mm, inC >> sb, (inC + n - 1) >> sb)) kind = RUN_HOST;
      } else if (!ext) {
        if (mm.kind === KIND_UNALLOCATED) kind = RUN_BACKING;
        else if (mm.kind === KIND_ZERO) kind = RUN_ZERO;
      }
      if (run !== RUN_NONE && (kind !== run || (kind === RUN_HOST && runHost + runLen !== mm.host + inC))) endRun();
      if (kind === RUN_NONE) {
        // Compressed clusters and partly allocated subclusters: on their own, with their own mapping.
        issue(readInCluster(node, s, { ...mm }, guest, out.subarray(pos, pos + n)));
      } else if (run === RUN_NONE) {
        run = kind;
        runPos = pos;
        runLen = n;
        runHost = mm.host + inC;
      } else {
        runLen += n;
      }
      pos += n;
    }
    if (run !== RUN_NONE) endRun();
  } catch (e) {
    // A lookup failed: the reads already issued land in the buffer before the error is returned.
    await Promise.allSettled(reads);
    throw e;
  }
  if (reads.length) await settle(reads);
  if (!direct) scatter(out, iov);
}
