/**
 * hostExtents and watchMappings (types.ts) for qcow2: which guest ranges a native fast path
 * may serve straight from the image file, and the listeners told before that stops being
 * true (the reports themselves are made where the tables change, see mapping-watch.ts).
 */
import { BlockError } from '../../error.js';
import type { BlockNode } from '../../node.js';
import type { HostExtent, UnmapListener } from '../../types.js';
import { entryCopied } from './entries.js';
import { EXT_CRYPTO, EXT_DATA_FILE, INCOMPAT } from './format.js';
import { KIND_NORMAL, KIND_UNALLOCATED, lookup, lookupCached, newMapping, type Mapping } from './map.js';
import { ALL_SUBCLUSTERS } from './mapping-watch.js';
import { qstate, type Qcow2State } from './state.js';

/** Lookups restarted by concurrent changes before giving the always-safe answer (host -1). */
const MAX_TRIES = 8;

/**
 * Whether hostExtents answers a host offset for mapping `m`: a plain, normal cluster, and with
 * extended L2 only when every subcluster is allocated (none zero, none read through).
 */
export function isMapped(s: Qcow2State, m: Mapping): boolean {
  if (m.kind !== KIND_NORMAL || !m.host) return false;
  return s.geo.l2EntrySize === 8 || (m.alloc === ALL_SUBCLUSTERS && m.zero === 0);
}

/** Encrypted clusters and external data files never map plainly into `file`. */
function plainImage(s: Qcow2State): boolean {
  const h = s.header;
  if (h.cryptMethod !== 0 || h.incompatible & INCOMPAT.DATA_FILE) return false;
  return !h.extensions.some((e) => e.type === EXT_CRYPTO || e.type === EXT_DATA_FILE);
}

/** Appends a run, merged into the last one when hosts continue (or are both -1) and flags agree. */
function push(out: HostExtent[], offset: number, bytes: number, host: number, writable: boolean): void {
  const last = out[out.length - 1];
  if (last && last.writable === writable && (host < 0 ? last.host < 0 : last.host >= 0 && last.host + last.bytes === host)) {
    last.bytes += bytes;
    return;
  }
  out.push({ offset, bytes, host, writable });
}

async function collect(node: BlockNode, s: Qcow2State, offset: number, end: number): Promise<HostExtent[]> {
  const { clusterSize: cs, l2Size } = s.geo;
  const out: HostExtent[] = [];
  const m = newMapping();
  for (let g = offset; g < end; ) {
    let n = Math.min(end, (Math.floor(g / cs) + 1) * cs) - g;
    let mm: Mapping;
    try {
      mm = lookupCached(s, g, m) ?? (await lookup(s, g, m));
    } catch {
      // Bad metadata (or a failed table read): the driver's own path reports it.
      push(out, g, end - g, -1, false);
      break;
    }
    if (isMapped(s, mm)) {
      const writable = mm.copied && entryCopied(s.l1, mm.l1Index * 8) && !s.corrupt && !s.readOnly;
      push(out, g, n, mm.host + (g % cs), writable);
    } else {
      // No L2 table: the rest of its range is unallocated too.
      if (mm.kind === KIND_UNALLOCATED && !mm.l2Offset) n = Math.min(end, (mm.l1Index + 1) * l2Size * cs) - g;
      push(out, g, n, -1, false);
    }
    g += n;
  }
  return out;
}

export async function qcow2HostExtents(node: BlockNode, offset: number, bytes: number): Promise<HostExtent[]> {
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(bytes) || offset < 0 || bytes < 0) {
    throw new BlockError('EINVAL', `qcow2 '${node.name}': invalid range for host extents (offset ${offset}, ${bytes} bytes)`, { node: node.name });
  }
  const s = qstate(node);
  for (let tries = 0; ; tries++) {
    const end = Math.min(offset + bytes, s.header.size);
    if (offset >= end) return [];
    if (node.deleted || !plainImage(s) || tries === MAX_TRIES) return [{ offset, bytes: end - offset, host: -1, writable: false }];
    const gen = s.mapGen;
    const out = await collect(node, s, offset, end);
    // A change reported while a table loaded may have made the answer a mix of before and after.
    if (s.mapGen === gen) return out;
  }
}

export function qcow2WatchMappings(node: BlockNode, onUnmap: UnmapListener): () => void {
  const s = qstate(node);
  // A wrapper per registration: the same function registered twice is two listeners.
  const fn: UnmapListener = (o, b) => onUnmap(o, b);
  s.mapWatchers.add(fn);
  return () => void s.mapWatchers.delete(fn);
}
