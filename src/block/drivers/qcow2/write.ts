/**
 * qcow2 writes: in place where the cluster is ours (COPIED), else a new cluster.
 *
 * An allocation raises the new cluster's refcount in memory, writes the cluster's data (with
 * the old contents copied around a partial write), then sets the L2 entry in memory; both
 * reach the disk on the next write-back (writeback.ts: refcounts before L2 tables). A new
 * L2 table is written before the L1 entry that links it, and an old cluster's refcount
 * drops only once the L2 entry that named it is on disk. A crash leaves at most leaked
 * clusters.
 */
import { BlockError } from '../../error.js';
import * as io from '../../io.js';
import type { BlockNode } from '../../node.js';
import { ReqFlags, type IoCallback, type IoVec } from '../../types.js';
import { writeCompressed } from './compress.js';
import { entryCopied, entryOffset, writeEntry, writeSubclusterBitmaps } from './entries.js';
import { KIND_COMPRESSED, KIND_NORMAL, KIND_UNALLOCATED, KIND_ZERO, lookup, lookupCached, newMapping, type Mapping } from './map.js';
import { unmapping, unmappingEntries } from './mapping-watch.js';
import { readGeneral, subAllAlloc } from './read.js';
import { qstate, type Qcow2State } from './state.js';
import { qcow2Flush, writeBackIfFull, writeBackMeta } from './writeback.js';

const scratch = newMapping();

function toBlockError(e: unknown, node: BlockNode): BlockError {
  return e instanceof BlockError ? e : new BlockError('EIO', `qcow2 '${node.name}': ${String(e)}`, { node: node.name }, e);
}

/** Whether the whole guest cluster at `start` reads as zeroes under mapping `m`. */
function readsZero(node: BlockNode, s: Qcow2State, m: Mapping, start: number): boolean {
  if (s.geo.l2EntrySize === 16) return !m.host && (m.zero === 0xffffffff || noBacking(node, start));
  if (m.kind === KIND_ZERO) return true;
  return m.kind === KIND_UNALLOCATED && noBacking(node, start);
}
function noBacking(node: BlockNode, start: number): boolean {
  const b = node.backing;
  return !b || start >= b.node.length;
}

/** Whether guest bytes [inC, inC+n) of mapping `m` may be overwritten where they are. */
function inPlace(s: Qcow2State, m: Mapping, inC: number, n: number): boolean {
  if (m.kind !== KIND_NORMAL || !m.copied || !entryCopied(s.l1, m.l1Index * 8)) return false;
  if (s.geo.l2EntrySize === 8) return true;
  return subAllAlloc(m, inC >> s.geo.subclusterBits, (inC + n - 1) >> s.geo.subclusterBits);
}

/** Driver writev: in-place writes to cached, owned clusters go straight to the file. */
export function qcow2Writev(node: BlockNode, offset: number, bytes: number, iov: IoVec, flags: number, cb: IoCallback): void {
  const s = qstate(node);
  if (s.corrupt) return void process.nextTick(cb, new BlockError('EIO', `qcow2 '${node.name}' is marked corrupt; no further writes`, { node: node.name }));
  const cs = s.geo.clusterSize;
  const inC = offset % cs;
  if (flags & ReqFlags.COMPRESSED) {
    const data = gather(iov, bytes);
    writeCompressed(node, offset, data)
      .then((done) => (done ? undefined : writeGeneral(node, offset, bytes, iov)))
      .then(() => cb(null), (e: unknown) => cb(toBlockError(e, node)));
    return;
  }
  if (inC + bytes <= cs) {
    const m = lookupCached(s, offset, scratch);
    if (m && inPlace(s, m, inC, bytes)) {
      io.writev(s.file, m.host + inC, bytes, iov, flags, cb);
      return;
    }
  }
  const done = flags & ReqFlags.FUA ? writeGeneral(node, offset, bytes, iov).then(() => stable(node)) : writeGeneral(node, offset, bytes, iov);
  done.then(() => cb(null), (e: unknown) => cb(toBlockError(e, node)));
}

/** FUA on an allocating write: its metadata, and then the file, made stable. */
async function stable(node: BlockNode): Promise<void> {
  await qcow2Flush(node);
  await io.flush(qstate(node).file);
}

function gather(iov: IoVec, bytes: number): Buffer {
  if (iov.length === 1 && iov[0]!.length >= bytes) return Buffer.from(iov[0]!.buffer, iov[0]!.byteOffset, bytes);
  const b = Buffer.alloc(bytes);
  let o = 0;
  for (const seg of iov) {
    const n = Math.min(seg.length, bytes - o);
    b.set(seg.subarray(0, n), o);
    o += n;
    if (o >= bytes) break;
  }
  return b;
}

async function writeGeneral(node: BlockNode, offset: number, bytes: number, iov: IoVec): Promise<void> {
  const s = qstate(node);
  const cs = s.geo.clusterSize;
  const data = gather(iov, bytes);
  const m = newMapping();
  for (let pos = 0; pos < bytes; ) {
    const guest = offset + pos;
    const inC = guest % cs;
    const n = Math.min(bytes - pos, cs - inC);
    const chunk = data.subarray(pos, pos + n);
    await lookup(s, guest, m);
    if (inPlace(s, m, inC, n)) await io.write(s.file, m.host + inC, chunk);
    else {
      const run = inC === 0 && bytes - pos >= 2 * cs ? await allocRun(node, s, guest, data.subarray(pos)) : 0;
      if (run) {
        pos += run;
        continue;
      }
      await allocWrite(node, s, guest, chunk);
    }
    pos += n;
  }
}

/** Claims guest clusters for allocation; later writes to them wait. */
function claimClusters(s: Qcow2State, first: number, max: number): { count: number; release: (from: number) => void } {
  let wake!: () => void;
  const claim = new Promise<void>((r) => (wake = r));
  let count = 0;
  while (count < max && !s.allocating.has(first + count)) s.allocating.set(first + count++, claim);
  let released = count;
  let woken = false;
  return {
    count,
    release(from) {
      for (let i = from; i < released; i++) if (s.allocating.get(first + i) === claim) s.allocating.delete(first + i);
      released = Math.min(released, from);
      if (released === 0 && !woken) {
        woken = true;
        wake();
      }
    },
  };
}

/**
 * Allocates a run of whole clusters of one L2 table at once: one refcount update, one
 * contiguous data write, one L2 write. Returns the bytes written (0: not applicable, the
 * caller goes cluster by cluster).
 */
async function allocRun(node: BlockNode, s: Qcow2State, guest: number, data: Buffer): Promise<number> {
  const g = s.geo;
  const cs = g.clusterSize;
  if (g.l2EntrySize === 16) return 0;
  const first = guest / cs;
  const max = Math.min(Math.floor(data.length / cs), g.l2Size - (first % g.l2Size));
  if (max < 2) return 0;
  const c = claimClusters(s, first, max);
  try {
    const old: Mapping[] = [];
    for (let k = 0; k < c.count; k++) {
      const m = await lookup(s, (first + k) * cs);
      if (inPlace(s, m, 0, cs)) break;
      old.push({ ...m });
    }
    const n = old.length;
    c.release(n);
    if (n < 2) return 0;
    const host = await s.lock.run(() => s.refcounts.allocDirty(n));
    await io.write(s.file, host, data.subarray(0, n * cs));
    await s.lock.run(async () => {
      const now = await lookup(s, guest);
      const l2Offset = await ownL2Table(s, now);
      const table = await s.l2.get(l2Offset);
      const pos = now.l2Index * 8;
      // Clusters shared with a snapshot are replaced (COW): their old host goes.
      unmappingEntries(s, table, now.l1Index, now.l2Index, n);
      for (let i = 0; i < n; i++) writeEntry(table, pos + i * 8, host + i * cs, true);
      s.l2.markDirty(l2Offset, pos, pos + n * 8);
      // The mapping is live: later writes to these clusters go in place.
      c.release(0);
      await dropOld(s, old);
    });
    return n * cs;
  } finally {
    c.release(0);
  }
}

/**
 * Writes `data` (within one cluster) where the mapping does not allow an in-place write.
 *
 * The guest cluster is claimed first, so later writes to it wait and then go in place;
 * only the refcount and L2 updates hold the metadata lock, so allocations of different
 * clusters copy and write their data in parallel.
 */
async function allocWrite(node: BlockNode, s: Qcow2State, guest: number, data: Buffer): Promise<void> {
  const cs = s.geo.clusterSize;
  const inC = guest % cs;
  const gc = Math.floor(guest / cs);
  for (let p = s.allocating.get(gc); p; p = s.allocating.get(gc)) await p;
  let wake!: () => void;
  const claim = new Promise<void>((r) => (wake = r));
  s.allocating.set(gc, claim);
  const release = (): void => {
    if (s.allocating.get(gc) === claim) s.allocating.delete(gc);
    wake();
  };
  try {
    const m = await lookup(s, guest);
    if (inPlace(s, m, inC, data.length)) return await io.write(s.file, m.host + inC, data);
    const ext = s.geo.l2EntrySize === 16;
    if (ext && m.kind === KIND_NORMAL && m.copied && entryCopied(s.l1, m.l1Index * 8)) {
      return await s.lock.run(() => writeSubclusters(node, s, m, guest, data));
    }
    const reuse = m.kind === KIND_ZERO && m.host !== 0 && m.copied && !ext;
    let host = m.host;
    // A cluster past the end of the file when allocated reads as zeroes until its owner
    // writes it (other clusters' writes past it leave a hole), whatever the length is by then.
    let pastEnd = false;
    if (!reuse) {
      host = await s.lock.run(async () => {
        const at = await s.refcounts.allocDirty(1);
        pastEnd = at >= io.getLength(s.file);
        return at;
      });
    }
    if (data.length < cs && readsZero(node, s, m, guest - inC)) {
      // Nothing to copy; a cluster that may hold old data is zeroed first.
      if (!pastEnd) await io.writeZeroes(s.file, host, cs, 0);
      await io.write(s.file, host + inC, data);
    } else {
      let buf = data;
      if (data.length < cs) {
        // Copy-on-write: the rest of the cluster keeps what reads returned before.
        buf = Buffer.alloc(cs);
        await readGeneral(node, guest - inC, cs, [buf]);
        data.copy(buf, inC);
      }
      await io.write(s.file, host, buf);
    }
    await s.lock.run(async () => {
      // The L2 table may have moved (copied from a snapshot) meanwhile: look again.
      const now = await lookup(s, guest);
      const l2Offset = await ownL2Table(s, now);
      const table = await s.l2.get(l2Offset);
      const pos = now.l2Index * s.geo.l2EntrySize;
      // A normal cluster not ours alone (COW) loses its old host here.
      unmappingEntries(s, table, now.l1Index, now.l2Index, 1);
      writeEntry(table, pos, host, true);
      if (ext) writeSubclusterBitmaps(table, pos, 0xffffffff, 0);
      s.l2.markDirty(l2Offset, pos, pos + s.geo.l2EntrySize);
      // The mapping is live: later writes to this cluster go in place.
      release();
      await dropOld(s, reuse ? [] : [m]);
    });
  } finally {
    release();
  }
}

/** Extended L2, cluster already ours: write the subclusters, copying around partial ones. */
async function writeSubclusters(node: BlockNode, s: Qcow2State, m: Mapping, guest: number, data: Buffer): Promise<void> {
  const sb = s.geo.subclusterBits;
  const scs = 1 << sb;
  const inC = guest % s.geo.clusterSize;
  const first = inC >> sb;
  const last = (inC + data.length - 1) >> sb;
  const start = first << sb;
  const buf = Buffer.alloc((last + 1 - first) * scs);
  // Edge subclusters that are not allocated yet keep their old contents (zero or backing).
  const clusterStart = guest - inC;
  if (inC > start && !(m.alloc & (1 << first))) await readGeneral(node, clusterStart + start, scs, [buf.subarray(0, scs)]);
  const end = inC + data.length;
  if (end < (last + 1) << sb && !(m.alloc & (1 << last))) {
    await readGeneral(node, clusterStart + (last << sb), scs, [buf.subarray(buf.length - scs)]);
  }
  // Allocated edges we only touch where the guest wrote.
  const lo = m.alloc & (1 << first) ? inC - start : 0;
  const hi = m.alloc & (1 << last) ? end - start : buf.length;
  data.copy(buf, inC - start);
  await io.write(s.file, m.host + start + lo, buf.subarray(lo, hi));
  let touched = 0;
  for (let k = first; k <= last; k++) touched |= 1 << k;
  const table = await s.l2.get(m.l2Offset);
  const pos = m.l2Index * 16;
  // Only partly allocated clusters get here (never answered mapped): reports nothing, kept for uniformity.
  unmappingEntries(s, table, m.l1Index, m.l2Index, 1);
  writeSubclusterBitmaps(table, pos, (m.alloc | touched) >>> 0, (m.zero & ~touched) >>> 0);
  s.l2.markDirty(m.l2Offset, pos, pos + 16);
}

/**
 * The L2 table for `m`, owned by the active L1 (COPIED): allocated if missing, copied if
 * shared with a snapshot. Returns its host offset.
 */
export async function ownL2Table(s: Qcow2State, m: Mapping): Promise<number> {
  const l1pos = m.l1Index * 8;
  const old = entryOffset(s.l1, l1pos);
  if (old && entryCopied(s.l1, l1pos)) return old;
  const cs = s.geo.clusterSize;
  const host = await s.refcounts.alloc(1);
  const table = Buffer.alloc(cs);
  if (old) {
    (await s.l2.get(old)).copy(table);
    // Entries of a copied table are shared with the snapshot: none is ours alone.
    for (let i = 0; i < s.geo.l2Size; i++) {
      const p = i * s.geo.l2EntrySize;
      table[p] = table[p]! & 0x7f;
    }
  }
  await io.write(s.file, host, table);
  const e = Buffer.alloc(8);
  writeEntry(e, 0, host, true);
  await io.write(s.file, s.header.l1TableOffset + l1pos, e);
  // A shared table is replaced by a copy whose entries lose COPIED: report its whole range.
  if (old) unmapping(s, m.l1Index * s.geo.l2Size * cs, s.geo.l2Size * cs);
  e.copy(s.l1, l1pos);
  s.l2.insert(host, table);
  if (old) await s.refcounts.free(old, 1);
  m.l2Offset = host;
  return host;
}

/**
 * The L2 entries (in memory) no longer name the clusters of `old`: their refcounts drop, but
 * only once nothing on disk names them (a write-back first). Then a write-back if too much
 * is dirty. Context: under the metadata lock.
 */
export async function dropOld(s: Qcow2State, old: readonly Mapping[]): Promise<void> {
  const freed = old.filter(holdsClusters);
  if (freed.length) {
    await writeBackMeta(s);
    for (const m of freed) await releaseOld(s, m);
  }
  await writeBackIfFull(s);
}

/** Whether the mapping names host clusters that releaseOld() would free. */
function holdsClusters(m: Mapping): boolean {
  return m.kind === KIND_COMPRESSED || ((m.kind === KIND_NORMAL || m.kind === KIND_ZERO) && m.host !== 0);
}

/** Drops this image's reference to the clusters the old mapping used. */
async function releaseOld(s: Qcow2State, m: Mapping): Promise<void> {
  const cs = s.geo.clusterSize;
  if (m.kind === KIND_COMPRESSED) {
    const first = Math.floor(m.host / cs);
    const last = Math.floor((m.host + m.compressedBytes - 1) / cs);
    for (let c = first; c <= last; c++) await s.refcounts.free(c * cs, 1);
  } else if ((m.kind === KIND_NORMAL || m.kind === KIND_ZERO) && m.host) {
    await s.refcounts.free(m.host, 1);
  }
}
