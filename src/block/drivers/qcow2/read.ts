/**
 * qcow2 reads: the synchronous fast path for clusters whose mapping is cached, and the
 * general path (backing files, zero and compressed clusters, subclusters, cache misses).
 */
import { inflateRawSync } from 'node:zlib';
import { BlockError } from '../../error.js';
import * as io from '../../io.js';
import type { BlockNode } from '../../node.js';
import type { IoCallback, IoVec } from '../../types.js';
import { corruptError, KIND_COMPRESSED, KIND_NORMAL, KIND_UNALLOCATED, KIND_ZERO, lookup, lookupCached, newMapping, type Mapping } from './map.js';
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
    const m = lookupCached(s, offset, scratch);
    if (m && m.kind === KIND_NORMAL) {
      const ext = s.geo.l2EntrySize === 16;
      if (!ext || subAllAlloc(m, inC >> s.geo.subclusterBits, (inC + bytes - 1) >> s.geo.subclusterBits)) {
        io.readv(s.file, m.host + inC, bytes, iov, flags, cb);
        return;
      }
    }
  }
  readGeneral(node, offset, bytes, iov).then(() => cb(null), (e: unknown) => cb(toBlockError(e, node)));
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

/** The general read path: cluster by cluster, merging host-contiguous allocated runs. */
export async function readGeneral(node: BlockNode, offset: number, bytes: number, iov: IoVec): Promise<void> {
  const s = qstate(node);
  const cs = s.geo.clusterSize;
  const direct = iov.length === 1 && iov[0]!.length >= bytes;
  const out = direct ? Buffer.from(iov[0]!.buffer, iov[0]!.byteOffset, bytes) : Buffer.alloc(bytes);
  const m = newMapping();
  const next = newMapping();
  let pos = 0;
  while (pos < bytes) {
    const guest = offset + pos;
    let n = Math.min(bytes - pos, cs - (guest % cs));
    await lookup(s, guest, m);
    if (m.kind === KIND_NORMAL && s.geo.l2EntrySize === 8) {
      // Extend over clusters that follow in the file too: one read instead of many.
      const start = m.host + (guest % cs);
      while (pos + n < bytes) {
        await lookup(s, guest + n, next);
        if (next.kind !== KIND_NORMAL || next.host !== start + n) break;
        n += Math.min(cs, bytes - pos - n);
      }
      await io.read(s.file, m.host + (guest % cs), out.subarray(pos, pos + n));
    } else {
      await readInCluster(node, s, m, guest, out.subarray(pos, pos + n));
    }
    pos += n;
  }
  if (!direct) scatter(out, iov);
}
