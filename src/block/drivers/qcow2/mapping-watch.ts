/**
 * Telling watchMappings listeners (types.ts) that a mapping hostExtents may have answered is
 * about to change. Every in-memory change to an L2 entry, to the L1 table, to COPIED flags or
 * to what makes a cluster writable (corrupt, read-only) calls one of these first, in the same
 * synchronous stretch as the change: no await may separate the report from the change, or a
 * native fast path could look again in between, see the old mapping and keep it.
 */
import { warn } from '../../warn.js';
import { entryCompressed, entryOffset, entryZeroFlag, subclusterBitmaps } from './entries.js';
import type { Qcow2State } from './state.js';

/** An extended L2 allocation bitmap with every subcluster allocated. */
export const ALL_SUBCLUSTERS = 0xffffffff;

/** Reports guest range [offset, offset+bytes) to every listener, then invalidates lookups in flight. */
export function unmapping(s: Qcow2State, offset: number, bytes: number): void {
  for (const fn of s.mapWatchers) {
    try {
      fn(offset, bytes);
    } catch (e) {
      // The metadata update goes on either way: stopping halfway would leave it inconsistent.
      warn(`qcow2 mapping listener failed: ${e instanceof Error ? e.message : String(e)}`);
    }
  }
  // After the listeners: a lookup they start synchronously sees the old mapping and is
  // answered at once; one that awaits resumes after the change and starts over.
  s.mapGen++;
}

/** The whole image, for rare table-wide changes; `size` covers a size the change sets. */
export function unmappingAll(s: Qcow2State, size = 0): void {
  unmapping(s, 0, Math.max(size, s.header.size));
}

/**
 * Whether the raw L2 entry at byte `pos` of `table` is one hostExtents answers with a host
 * offset (host-extents.ts isMapped() on the decoded entry); no validation, never throws.
 */
function entryMapped(s: Qcow2State, table: Buffer, pos: number): boolean {
  if (entryCompressed(table, pos) || !entryOffset(table, pos)) return false;
  if (s.geo.l2EntrySize === 8) return !entryZeroFlag(table, pos);
  const bm = subclusterBitmaps(table, pos);
  return bm.alloc === ALL_SUBCLUSTERS && bm.zero === 0;
}

/**
 * Before entries [index, index+count) of the L2 table (of L1 entry `l1Index`) change: reports
 * the runs of them that map (entries that read as unallocated or zero were never answered
 * with a host offset, so allocating over them reports nothing).
 */
export function unmappingEntries(s: Qcow2State, table: Buffer, l1Index: number, index: number, count: number): void {
  const { clusterSize: cs, l2Size, l2EntrySize: es } = s.geo;
  const base = l1Index * l2Size;
  let run = -1;
  for (let i = index; i <= index + count; i++) {
    const mapped = i < index + count && entryMapped(s, table, i * es);
    if (mapped && run < 0) run = i;
    else if (!mapped && run >= 0) {
      unmapping(s, (base + run) * cs, (i - run) * cs);
      run = -1;
    }
  }
}
