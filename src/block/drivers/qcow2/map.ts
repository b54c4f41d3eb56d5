/**
 * Guest-to-host mapping: L1 -> L2 -> cluster, with the entry's kind.
 */
import { BlockError } from '../../error.js';
import * as io from '../../io.js';
import { compressedLocation, entryCompressed, entryCopied, entryOffset, entryZeroFlag, l2ReservedBits, subclusterBitmaps } from './entries.js';
import { unmappingAll } from './mapping-watch.js';
import type { Qcow2State } from './state.js';
import { reportCorruption } from '../../corruption.js';
import type { BlockNode } from '../../node.js';

export const KIND_UNALLOCATED = 0;
export const KIND_ZERO = 1;
export const KIND_NORMAL = 2;
export const KIND_COMPRESSED = 3;

export interface Mapping {
  kind: number;
  /** Host offset of the cluster (Normal, or a Zero cluster that keeps its allocation). */
  host: number;
  copied: boolean;
  /** Compressed data length to read from `host`. */
  compressedBytes: number;
  /** Extended L2 only: allocation and zero bitmaps (bit i = subcluster i). */
  alloc: number;
  zero: number;
  /** Where the entry lives (0 if no L2 table yet). */
  l2Offset: number;
  l2Index: number;
  l1Index: number;
}

/** How errors name the image: its file name when known, else the file node's name. */
function imageName(s: Qcow2State): string {
  const f = s.file.node.options['filename'];
  return typeof f === 'string' ? f : s.file.node.name;
}

/** Marks the image corrupt (no further writes) and returns the error to report. */
export function corruptError(s: Qcow2State, msg: string): BlockError {
  const full = `qcow2 image '${imageName(s)}' is corrupt: ${msg}`;
  markCorrupt(s, full);
  return new BlockError('EIO', full, { op: 'qcow2' });
}

/** The first corruption found is reported (the monitor's BLOCK_IMAGE_CORRUPTED); later ones are not. */
function markCorrupt(s: Qcow2State, msg: string): void {
  if (s.corrupt) return;
  unmappingAll(s); // nothing is writable in place any more
  s.corrupt = true;
  reportCorruption(s.file.parent as BlockNode, msg);
}

/**
 * Corruption the refcount layer finds (it has no pointer to the state) marks the image
 * corrupt too, and it must not hand out clusters of the L1 table or of L2 tables. Bound
 * here, at the first lookup of each Refcounts instance, as every write starts with a lookup.
 */
export function bindRefcounts(s: Qcow2State): void {
  const r = s.refcounts;
  if (r.onCorrupt) return;
  r.onCorrupt = (msg) => markCorrupt(s, msg);
  r.metadataAt = (off, bytes) => l1OrL2At(s, off, bytes);
}

/** What of the active L1 table and its L2 tables lies in [off, off+bytes) ('' if nothing). */
function l1OrL2At(s: Qcow2State, off: number, bytes: number): string {
  const cs = s.geo.clusterSize;
  if (off < s.header.l1TableOffset + s.l1.length && s.header.l1TableOffset < off + bytes) return 'the L1 table';
  // The L2 tables of small L1 tables (up to 1024 entries: 512 GiB of disk with 64 KiB
  // clusters) are checked, which costs little next to the allocation's own I/O.
  if (s.l1.length <= 8192) {
    for (let p = 0; p < s.l1.length; p += 8) {
      const t = entryOffset(s.l1, p);
      if (t && t < off + bytes && off < t + cs) return `the L2 table at ${t}`;
    }
  }
  return '';
}

/** Decodes the L2 entry at `index` of `table`. */
export function decode(s: Qcow2State, table: Buffer, index: number, m: Mapping): Mapping {
  const pos = index * s.geo.l2EntrySize;
  m.alloc = 0;
  m.zero = 0;
  m.compressedBytes = 0;
  if (entryCompressed(table, pos)) {
    const loc = compressedLocation(table, pos, s.geo.clusterBits);
    m.kind = KIND_COMPRESSED;
    m.host = loc.offset;
    m.compressedBytes = loc.bytes;
    m.copied = false;
    return m;
  }
  if (l2ReservedBits(table, pos)) throw corruptError(s, `L2 entry ${index} of the table at ${m.l2Offset} has reserved bits set`);
  m.host = entryOffset(table, pos);
  m.copied = entryCopied(table, pos);
  if (m.host % s.geo.clusterSize) throw corruptError(s, `cluster offset ${m.host} in the L2 table at ${m.l2Offset} is not aligned`);
  // Nothing valid lies past the end of the file (qemu-img check calls it an error: a write
  // would grow the file to wherever the entry points), nor on the tables (a write in place
  // would overwrite them).
  if (m.host) {
    const cs = s.geo.clusterSize;
    const h = s.header;
    let what = '';
    if (m.host >= io.getLength(s.file)) what = 'lies past the end of the file';
    else if (m.host === m.l2Offset) what = 'is the L2 table itself';
    else if (m.host < h.l1TableOffset + s.l1.length && h.l1TableOffset < m.host + cs) what = 'overlaps the L1 table';
    else if (m.host < s.refcounts.tableOffset + s.refcounts.table.length && s.refcounts.tableOffset < m.host + cs) what = 'overlaps the refcount table';
    if (what) throw corruptError(s, `cluster offset ${m.host} in the L2 table at ${m.l2Offset} ${what}`);
  }
  if (s.geo.l2EntrySize === 16) {
    const bm = subclusterBitmaps(table, pos);
    m.alloc = bm.alloc;
    m.zero = bm.zero;
    if (bm.alloc & bm.zero) throw corruptError(s, `subcluster both allocated and zero in the L2 table at ${m.l2Offset}`);
    m.kind = m.host ? KIND_NORMAL : m.zero ? KIND_ZERO : KIND_UNALLOCATED;
    return m;
  }
  if (entryZeroFlag(table, pos)) m.kind = KIND_ZERO;
  else m.kind = m.host ? KIND_NORMAL : KIND_UNALLOCATED;
  return m;
}

export function newMapping(): Mapping {
  return { kind: 0, host: 0, copied: false, compressedBytes: 0, alloc: 0, zero: 0, l2Offset: 0, l2Index: 0, l1Index: 0 };
}

/** Looks up the mapping of the cluster holding guest offset `guest`. */
export async function lookup(s: Qcow2State, guest: number, m: Mapping = newMapping()): Promise<Mapping> {
  const g = s.geo;
  const cluster = Math.floor(guest / g.clusterSize);
  m.l1Index = Math.floor(cluster / g.l2Size);
  m.l2Index = cluster % g.l2Size;
  m.l2Offset = 0;
  if (m.l1Index >= s.l1.length / 8) throw corruptError(s, `guest offset ${guest} is beyond the L1 table`);
  const l2Offset = entryOffset(s.l1, m.l1Index * 8);
  if (!l2Offset) {
    m.kind = KIND_UNALLOCATED;
    m.host = 0;
    m.copied = false;
    m.alloc = m.zero = 0;
    return m;
  }
  if (l2Offset % g.clusterSize) throw corruptError(s, `L2 table offset ${l2Offset} is not cluster aligned`);
  m.l2Offset = l2Offset;
  bindRefcounts(s);
  const cached = s.l2.peek(l2Offset);
  if (cached) return decode(s, cached, m.l2Index, m);
  checkL2Offset(s, l2Offset, m.l1Index);
  return decode(s, await s.l2.get(l2Offset), m.l2Index, m);
}

/**
 * An L2 table about to be loaded must lie inside the file and clear of the header, the active
 * L1 table and the refcount table: its entries are written back in place.
 */
function checkL2Offset(s: Qcow2State, off: number, l1Index: number): void {
  const cs = s.geo.clusterSize;
  const overlaps = (start: number, len: number): boolean => len > 0 && off < start + len && start < off + cs;
  let what = '';
  if (off >= io.getLength(s.file)) what = 'lies past the end of the file';
  else if (overlaps(0, cs)) what = 'overlaps the image header';
  else if (overlaps(s.header.l1TableOffset, s.l1.length)) what = 'overlaps the L1 table';
  else if (overlaps(s.refcounts.tableOffset, s.refcounts.table.length)) what = 'overlaps the refcount table';
  if (what) throw corruptError(s, `L2 table offset ${off} (L1 entry ${l1Index}) ${what}`);
}

/** The mapping from cache only, or null if the L2 table is not cached (fast path). */
export function lookupCached(s: Qcow2State, guest: number, m: Mapping): Mapping | null {
  const g = s.geo;
  const cluster = Math.floor(guest / g.clusterSize);
  const l1Index = Math.floor(cluster / g.l2Size);
  if (l1Index >= s.l1.length / 8) return null;
  const l2Offset = entryOffset(s.l1, l1Index * 8);
  if (!l2Offset) return null;
  const table = s.l2.peek(l2Offset);
  if (!table) return null;
  m.l1Index = l1Index;
  m.l2Index = cluster % g.l2Size;
  m.l2Offset = l2Offset;
  try {
    return decode(s, table, m.l2Index, m);
  } catch {
    return null;
  }
}
