/**
 * Pure rules of the refcount structure's layout: where a refcount block may be, what a
 * free-looking cluster may not hold, and how big a grown refcount table must be.
 */
import type { Geometry } from './format.js';

/** Describes the other metadata in [offset, offset+bytes), or '' if none is known there. */
export type MetadataAt = ((offset: number, bytes: number) => string) | null;

/** What is wrong with a refcount block at `off` (table entry `ti`), or '' if nothing. */
export function badRefcountBlock(cs: number, off: number, ti: number, fileLength: number, tableOffset: number, tableBytes: number, metadataAt: MetadataAt): string {
  const at = `refcount block ${off} (refcount table entry ${ti})`;
  if (off % cs) return `${at} is not cluster aligned`;
  if (off >= fileLength) return `${at} lies past the end of the file`;
  if (off < tableOffset + tableBytes && tableOffset < off + cs) return `${at} overlaps the refcount table`;
  const other = metadataAt?.(off, cs);
  return other ? `${at} overlaps ${other}` : '';
}

/**
 * What clusters [c, c+n), free by their refcounts, hold that they must not (a corrupt
 * refcount of 0 would make the next write overwrite it), or ''.
 */
export function metadataInFree(cs: number, c: number, n: number, tableOffset: number, tableBytes: number, metadataAt: MetadataAt, blocks: () => Set<number>): string {
  const start = c * cs;
  const end = (c + n) * cs;
  if (c === 0) return 'the image header';
  if (tableBytes > 0 && start < tableOffset + tableBytes && tableOffset < end) return 'the refcount table';
  const what = metadataAt?.(start, end - start) ?? '';
  if (what) return what;
  const known = blocks();
  for (let k = c; k < c + n; k++) if (known.has(k)) return 'a refcount block';
  return '';
}

/**
 * Sizes for a refcount table grown to cover entry `need`, placed at cluster `base` and
 * followed by its new blocks: the new blocks must describe the new table, themselves and
 * `need`. Returns the table's clusters and the number of new blocks.
 */
export function planTableGrowth(geo: Geometry, oldEntries: number, base: number, need: number): { tClusters: number; nBlocks: number } {
  const rbE = geo.rbEntries;
  const cs = geo.clusterSize;
  let entries = Math.max(need + 1, Math.ceil(oldEntries * 1.5));
  let tClusters = 0;
  let nBlocks = 0;
  for (;;) {
    tClusters = Math.ceil((entries * 8) / cs);
    const end = base + tClusters + nBlocks;
    const lastTi = Math.max(need, Math.floor((end - 1) / rbE));
    const wantBlocks = lastTi + 1 - oldEntries;
    if (lastTi + 1 > entries) {
      entries = lastTi + 1;
      continue;
    }
    if (wantBlocks === nBlocks) return { tClusters, nBlocks };
    nBlocks = wantBlocks;
  }
}
