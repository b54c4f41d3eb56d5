/**
 * Which exports may bypass the block layer: a backend whose node is a plain host file (raw
 * over a file, no window, filters or throttling), or a format whose clusters map into one.
 * The vhost-user-blk fast path serves such a disk on native threads; NBD sends reads of it
 * from the page cache (sendfile).
 *
 * Context: main loop.
 */
import type { BlockBackend } from '../backend/backend.js';
import { stateOf, type BlockNode } from '../block/node.js';
import { Perm } from '../block/types.js';

/** A node served straight from its host file: the file descriptor and the disk's shape. */
export interface HostFileTarget {
  fd: number;
  length: number;
  readOnly: boolean;
  /** Every node on the way lets discards free blocks (discard=unmap). */
  unmap: boolean;
  /** A format node whose clusters map into the file (the rest needs the block layer). */
  mapped?: { node: BlockNode; clusterBits: number };
}

/**
 * The file a backend's node reads and writes directly, or null when a request needs the block
 * layer (windows, filters, throttling, O_DIRECT alignment, zero detection, a block device).
 * A format whose driver reports host mappings (qcow2 on such a file) counts with `formats`:
 * `mapped` names it, and its clusters are found through it.
 */
export function hostFileTarget(backend: BlockBackend, formats: boolean): HostFileTarget | null {
  if (backend.throttle) return null;
  const top = backend.node;
  if (!top || top.detectZeroes !== 'off') return null;
  const readOnly = top.readOnly || !(backend.root && backend.root.perm & Perm.WRITE);
  let node: BlockNode | null = top;
  let unmap = top.discardUnmap;
  let mapped: HostFileTarget['mapped'];
  if (top.driver.format === 'raw') {
    const s = stateOf<{ offset: number; size: number }>(top);
    if (s.offset !== 0 || s.size >= 0) return null;
    node = top.file?.node ?? null;
  } else if (formats && top.driver.hostExtents && top.driver.watchMappings) {
    const bits = stateOf<{ header?: { clusterBits?: number } }>(top).header?.clusterBits;
    if (typeof bits !== 'number') return null;
    mapped = { node: top, clusterBits: bits };
    node = top.file?.node ?? null;
  }
  if (!node || node.driver.format !== 'file' || node.detectZeroes !== 'off') return null;
  const f = stateOf<{ fd: number; direct: boolean; blockDev: boolean; noFlush: boolean }>(node);
  if (f.direct || f.blockDev || f.noFlush || !(f.fd >= 0)) return null;
  unmap &&= node.discardUnmap;
  return { fd: f.fd, length: top.length, readOnly, unmap, mapped };
}

