/**
 * qcow2 discard, write-zeroes and block-status.
 *
 * Discard and zeroing rewrite whole L2 entries; the old clusters' refcounts drop only once
 * those entries are written back (writeback.ts); partial clusters are left to the generic layer (ENOTSUP: it writes
 * zeroes instead, or, for discard, ignores them).
 */
import { BlockError } from '../../error.js';
import * as io from '../../io.js';
import type { BlockNode } from '../../node.js';
import { ReqFlags, type BlockStatus } from '../../types.js';
import { entryCopied, writeEntry, writeSubclusterBitmaps } from './entries.js';
import { KIND_COMPRESSED, KIND_NORMAL, KIND_UNALLOCATED, KIND_ZERO, lookup, lookupCached, newMapping, type Mapping } from './map.js';
import { unmappingEntries } from './mapping-watch.js';
import { qstate } from './state.js';
import { dropOld, ownL2Table } from './write.js';

/** Rewrites the entries of whole clusters in [offset, offset+bytes) to read as zero or as unallocated. */
async function rewriteClusters(node: BlockNode, offset: number, bytes: number, mode: 'discard' | 'zero', keepAlloc: boolean): Promise<void> {
  const s = qstate(node);
  const cs = s.geo.clusterSize;
  const v3 = s.header.version === 3;
  const start = Math.ceil(offset / cs) * cs;
  const end = Math.floor((offset + bytes) / cs) * cs;
  if (mode === 'zero' && (!v3 || start !== offset || end !== offset + bytes)) {
    throw new BlockError('ENOTSUP', 'qcow2: write-zeroes needs whole clusters of a version 3 image', { node: node.name });
  }
  await s.lock.run(async () => {
    const m = newMapping();
    // After a discard, a v3 image with a backing file reads zeroes rather than the backing data.
    const zero = mode === 'zero' || (v3 && node.backing !== undefined);
    const freed: Mapping[] = [];
    for (let g = start; g < end; g += cs) {
      await lookup(s, g, m);
      const keep = keepAlloc && m.kind === KIND_NORMAL && m.copied && entryCopied(s.l1, m.l1Index * 8);
      const bare = m.kind === KIND_UNALLOCATED && !m.alloc && !m.zero && !m.host;
      if (bare && !zero) continue;
      if (m.kind === KIND_ZERO && zero && !m.host && !m.alloc) continue;
      const l2Offset = await ownL2Table(s, m);
      const table = await s.l2.get(l2Offset);
      const pos = m.l2Index * s.geo.l2EntrySize;
      // A mapped cluster stops being mapped (zeroed keeping its allocation, or freed).
      unmappingEntries(s, table, m.l1Index, m.l2Index, 1);
      if (s.geo.l2EntrySize === 16) {
        writeEntry(table, pos, keep ? m.host : 0, keep);
        writeSubclusterBitmaps(table, pos, 0, zero ? 0xffffffff : 0);
      } else {
        writeEntry(table, pos, keep ? m.host : 0, keep, zero);
      }
      s.l2.markDirty(l2Offset, pos, pos + s.geo.l2EntrySize);
      if (!keep && (m.host || m.kind === KIND_COMPRESSED)) freed.push(m.kind === KIND_COMPRESSED ? { ...m } : { ...m, kind: KIND_NORMAL });
    }
    await dropOld(s, freed);
  });
}

export async function qcow2Discard(node: BlockNode, offset: number, bytes: number): Promise<void> {
  await rewriteClusters(node, offset, bytes, 'discard', false);
}

export async function qcow2WriteZeroes(node: BlockNode, offset: number, bytes: number, flags: number): Promise<void> {
  await rewriteClusters(node, offset, bytes, 'zero', !(flags & ReqFlags.MAY_UNMAP));
}

/**
 * Status of the run of clusters starting at `offset` that share one answer. Clusters are
 * classified from the cached L2 table without waiting; only a table that is not cached
 * is loaded.
 */
export async function qcow2BlockStatus(node: BlockNode, offset: number, bytes: number): Promise<BlockStatus> {
  const s = qstate(node);
  const cs = s.geo.clusterSize;
  const ext = s.geo.l2EntrySize === 16;
  const sb = s.geo.subclusterBits;
  const unit = ext ? 1 << sb : cs;
  const m = newMapping();
  let kind = -1;
  let host = 0;
  let n = 0;
  for (let g = offset; n < bytes; g = offset + n) {
    const mm = lookupCached(s, g, m) ?? (await lookup(s, g, m));
    let k = mm.kind;
    if (ext && k !== KIND_COMPRESSED) {
      const sc = (g % cs) >> sb;
      k = mm.alloc & (1 << sc) ? KIND_NORMAL : mm.zero & (1 << sc) ? KIND_ZERO : KIND_UNALLOCATED;
    }
    const h = k === KIND_NORMAL ? mm.host + (g % cs) : 0;
    if (kind < 0) {
      kind = k;
      host = h;
    } else if (k !== kind || (kind === KIND_NORMAL && h !== host + n)) {
      break;
    }
    n = Math.min(bytes, n + unit - (g % unit));
  }
  if (kind === KIND_UNALLOCATED) {
    const b = node.backing;
    if (!b) return { bytes: n, data: false, zero: true, allocated: false, node };
    const blen = b.node.length;
    if (offset >= blen) return { bytes: n, data: false, zero: true, allocated: false, node };
    const st = await io.blockStatus(b, offset, Math.min(n, blen - offset));
    return { ...st, allocated: false };
  }
  if (kind === KIND_ZERO) return { bytes: n, data: false, zero: true, allocated: true, node };
  if (kind === KIND_COMPRESSED) return { bytes: n, data: true, zero: false, allocated: true, node };
  return { bytes: n, data: true, zero: false, allocated: true, offset: host, node };
}
