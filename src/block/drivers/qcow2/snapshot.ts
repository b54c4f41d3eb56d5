/**
 * qcow2 internal snapshots (qcow2.txt, "Snapshots"): creating, applying and deleting
 * snapshots on an open image (the table's format is in snapshot-table.ts). Callers drain the node first.
 *
 * Crash safety. A snapshot operation changes refcounts and COPIED flags of the active tree
 * together, and `qemu-img check` calls any mismatch between the two a corruption (a flag set
 * on a shared cluster, or missing on an unshared one), so no in-place order of writes is safe.
 * Instead every change goes to new clusters: a new active L1, copies of the active L2 tables
 * whose flags change, a new snapshot table, and copies of the refcount blocks whose counts
 * change under a new refcount table. One header write (bytes 24..72: size, L1, refcount
 * table, snapshot table) switches to all of it. The new clusters are allocated in the old
 * refcount structure first, so a crash before the switch leaks them; after the switch only
 * the old refcount blocks and table are left to free, and a crash there leaks them too.
 *
 * Refcounts count paths: a data cluster has one reference per (L1 table, L2 entry) that
 * reaches it, so sharing an L2 table between two L1 tables adds one to the table and one to
 * every cluster it maps (as qemu-img check counts them).
 */
import { bindRefcounts } from './map.js';
import { BlockError } from '../../error.js';
import * as io from '../../io.js';
import type { BlockNode } from '../../node.js';
import { compressedLocation, entryCompressed, entryCopied, entryOffset, rcGet, rcSet, writeEntry } from './entries.js';
import { l1EntriesFor, MAX_L1_BYTES } from './format.js';
import { Refcounts } from './refcount.js';
import { corrupt, MAX_SNAPSHOTS, MAX_TABLE_BYTES, readSnapshotTable, serializeSnapshotTable, type CreateOptions, type SnapshotInfo } from './snapshot-table.js';
import { unmappingAll } from './mapping-watch.js';
import { qstate, type Qcow2State } from './state.js';
import { writeBackMeta } from './writeback.js';

function writable(node: BlockNode, s: Qcow2State): void {
  if (s.readOnly) throw new BlockError('EROFS', `qcow2 '${node.name}' is read-only`, { node: node.name });
  if (s.corrupt) throw new BlockError('EIO', `qcow2 '${node.name}' is marked corrupt`, { node: node.name });
}

/** The table as on disk (the in-memory copy is refreshed on the way). */
async function loadTable(s: Qcow2State): Promise<{ list: SnapshotInfo[]; bytes: number }> {
  const t = await readSnapshotTable(s.file, s.header);
  s.snapshots = t.list;
  return t;
}

/** `match`: 'either' tries IDs first, then names (qemu-img -a); 'name' only names (qemu-img -d). */
function find(node: BlockNode, list: SnapshotInfo[], key: string, match: 'either' | 'id' | 'name'): number {
  let i = match === 'name' ? -1 : list.findIndex((sn) => sn.id === key);
  if (i < 0 && match !== 'id') i = list.findIndex((sn) => sn.name === key);
  if (i < 0) throw new BlockError('ENOENT', `qcow2 '${node.name}': snapshot '${key}' not found`, { node: node.name });
  return i;
}

export async function listSnapshots(node: BlockNode): Promise<SnapshotInfo[]> {
  const s = qstate(node);
  return s.lock.run(async () => (await loadTable(s)).list);
}

/** What an operation changes: the new active L1 (offsets only), size, table, refcounts. */
interface Plan {
  l1: Buffer;
  l1Size: number;
  size: number;
  /** The new snapshot table, or null to keep the one on disk. */
  snapshots: SnapshotInfo[] | null;
  /** Refcount change per host cluster. */
  delta: Int32Array;
}

function newDelta(s: Qcow2State): Int32Array {
  return new Int32Array(Math.ceil(io.getLength(s.file) / s.geo.clusterSize) + 1);
}

function bump(delta: Int32Array, offset: number, clusters: number, cs: number, by: number): void {
  for (let c = offset / cs; c < offset / cs + clusters; c++) {
    if (!Number.isInteger(c) || c >= delta.length) throw corrupt(`reference to host offset ${c * cs} outside the file`);
    delta[c]! += by;
  }
}

/** Adds `by` to every path of the tree under `l1` (its L2 tables and the clusters they map). */
async function countTree(s: Qcow2State, l1: Buffer, entries: number, by: number, delta: Int32Array): Promise<void> {
  const { clusterSize: cs, l2EntrySize: es, l2Size } = s.geo;
  for (let i = 0; i < entries; i++) {
    const t = entryOffset(l1, i * 8);
    if (!t) continue;
    bump(delta, t, 1, cs, by);
    const table = await s.l2.get(t);
    for (let j = 0; j < l2Size; j++) {
      const pos = j * es;
      if (entryCompressed(table, pos)) {
        const loc = compressedLocation(table, pos, s.geo.clusterBits);
        const first = Math.floor(loc.offset / cs);
        bump(delta, first * cs, Math.floor((loc.offset + loc.bytes - 1) / cs) - first + 1, cs, by);
      } else {
        const host = entryOffset(table, pos);
        if (host) bump(delta, host, 1, cs, by);
      }
    }
  }
}

async function readL1(s: Qcow2State, offset: number, entries: number, total: number): Promise<Buffer> {
  if (offset % s.geo.clusterSize || entries * 8 > MAX_L1_BYTES || offset + entries * 8 > io.getLength(s.file)) {
    throw corrupt(`snapshot L1 table at ${offset} (${entries} entries) is invalid`);
  }
  const b = Buffer.alloc(Math.max(entries, total) * 8);
  if (entries) await io.read(s.file, offset, b.subarray(0, entries * 8));
  return b;
}

const clustersFor = (bytes: number, cs: number): number => Math.ceil(bytes / cs);

/**
 * Carries out a plan: decides which active L2 tables must be copied (their COPIED flags would
 * change), checks every new refcount, writes everything to new clusters and switches the
 * header in one write. See the file comment for the crash argument.
 */
async function commit(node: BlockNode, s: Qcow2State, p: Plan): Promise<void> {
  const { clusterSize: cs, l2EntrySize: es, l2Size, rbEntries: rbE, refcountBits: bits } = s.geo;
  const [h, rc] = [s.header, s.refcounts];
  const after = async (c: number): Promise<number> => {
    if (!Number.isInteger(c) || c >= p.delta.length) throw corrupt(`reference to host offset ${c * cs} is unaligned or outside the file`);
    return (await rc.get(c)) + p.delta[c]!;
  };
  // The active tree's flags must match the refcounts after the switch; a table whose entries
  // would change is copied (the copy is the active's alone: COPIED in the L1).
  const copies: { index: number; table: Buffer }[] = [];
  for (let i = 0; i < p.l1Size; i++) {
    const t = entryOffset(p.l1, i * 8);
    if (!t) {
      p.l1.fill(0, i * 8, i * 8 + 8); // flags of empty entries go too
      continue;
    }
    const src = await s.l2.get(t);
    const fixed = Buffer.from(src);
    let same = true;
    for (let j = 0; j < l2Size; j++) {
      const pos = j * es;
      const host = entryCompressed(src, pos) ? 0 : entryOffset(src, pos);
      const want = host ? (await after(host / cs)) === 1 : entryCompressed(src, pos) ? false : entryCopied(src, pos);
      if (want !== entryCopied(src, pos)) {
        fixed[pos] = want ? fixed[pos]! | 0x80 : fixed[pos]! & 0x7f;
        same = false;
      }
    }
    if (same) writeEntry(p.l1, i * 8, t, (await after(t / cs)) === 1);
    else {
      p.delta[t / cs]!--;
      copies.push({ index: i, table: fixed });
    }
  }
  // Every new count must fit before anything is allocated (a failure then leaks nothing).
  const touched = new Set<number>();
  for (let c = 0; c < p.delta.length; c++) {
    if (!p.delta[c]) continue;
    const v = await after(c);
    // A referenced cluster counted free could be handed out below: refuse such an image.
    if (p.delta[c]! > 0 && v === p.delta[c]) throw corrupt(`cluster ${c} is in use but its refcount is 0`);
    if (v < 0) throw corrupt(`refcount of cluster ${c} would drop below 0`);
    if (v > rc.maxRefcount) throw new BlockError('EINVAL', `qcow2 '${node.name}': refcount of cluster ${c} would overflow ${bits} bits`, { node: node.name });
    touched.add(Math.floor(c / rbE));
  }
  const table = p.snapshots?.length ? serializeSnapshotTable(p.snapshots, p.size) : null;
  if (table && table.length > MAX_TABLE_BYTES) throw new BlockError('EFBIG', `qcow2 '${node.name}': the snapshot table would exceed ${MAX_TABLE_BYTES} bytes`);
  const l1Clusters = clustersFor(p.l1Size * 8, cs);
  const tClusters = table ? clustersFor(table.length, cs) : 0;
  const blocks = [...touched].sort((a, b) => a - b);
  // One run for the new metadata, in the old refcount structure (leaked until the switch).
  const total = l1Clusters + copies.length + tClusters + blocks.length;
  const base = total ? await rc.alloc(total) : 0;
  const l1Offset = l1Clusters ? base : 0;
  const tableOffset = table ? base + (l1Clusters + copies.length) * cs : 0;
  const blockAt = (k: number): number => base + (l1Clusters + copies.length + tClusters + k) * cs;
  // The new refcount table, as large as the old one is after these allocations.
  let rtOffset = 0;
  let rtClusters = 0;
  for (;;) {
    rtClusters = rc.table.length / cs;
    rtOffset = await rc.alloc(rtClusters);
    if (rc.table.length / cs === rtClusters) break;
    await rc.free(rtOffset, rtClusters); // the old table grew meanwhile: never linked, so safe
  }
  const oldBlocks: number[] = [];
  const newTable = Buffer.from(rc.table);
  for (let k = 0; k < blocks.length; k++) {
    const ti = blocks[k]!;
    const old = entryOffset(rc.table, ti * 8);
    if (!old) throw corrupt(`no refcount block for cluster ${ti * rbE}`);
    const blk = Buffer.alloc(cs);
    await io.read(s.file, old, blk);
    for (let c = ti * rbE; c < Math.min((ti + 1) * rbE, p.delta.length); c++) {
      if (p.delta[c]) rcSet(blk, c - ti * rbE, bits, rcGet(blk, c - ti * rbE, bits) + p.delta[c]!);
    }
    await io.write(s.file, blockAt(k), blk);
    writeEntry(newTable, ti * 8, blockAt(k), false);
    oldBlocks.push(old);
  }
  for (let k = 0; k < copies.length; k++) {
    const at = base + (l1Clusters + k) * cs;
    await io.write(s.file, at, copies[k]!.table);
    writeEntry(p.l1, copies[k]!.index * 8, at, true);
  }
  if (l1Clusters) {
    const l1 = Buffer.alloc(l1Clusters * cs);
    p.l1.copy(l1, 0, 0, p.l1Size * 8);
    await io.write(s.file, l1Offset, l1);
  }
  if (table) await io.write(s.file, tableOffset, Buffer.concat([table, Buffer.alloc(tClusters * cs - table.length)]));
  await io.write(s.file, rtOffset, newTable);
  await io.flush(s.file);
  // The switch: size, crypt method (unchanged), L1, refcount table, snapshot table.
  const nb = p.snapshots ? p.snapshots.length : h.nbSnapshots;
  const snapOffset = p.snapshots ? tableOffset : h.snapshotsOffset;
  const hb = Buffer.alloc(48);
  for (const [o, v] of [[0, p.size], [16, l1Offset], [24, rtOffset], [40, snapOffset]]) hb.writeBigUInt64BE(BigInt(v!), o);
  for (const [o, v] of [[8, h.cryptMethod], [12, p.l1Size], [32, rtClusters], [36, nb]]) hb.writeUInt32BE(v!, o);
  try {
    await io.write(s.file, 24, hb);
  } catch (e) {
    // The header may or may not have reached the disk: neither state in memory is safe now.
    unmappingAll(s, p.size);
    s.corrupt = true;
    throw e;
  }
  // A new L1 table, copied L2 tables, COPIED flags and maybe the size change: all of it goes.
  unmappingAll(s, p.size);
  Object.assign(h, {
    size: p.size, l1Size: p.l1Size, l1TableOffset: l1Offset, refcountTableOffset: rtOffset,
    refcountTableClusters: rtClusters, nbSnapshots: nb, snapshotsOffset: snapOffset,
  });
  s.l1 = Buffer.from(p.l1.subarray(0, p.l1Size * 8));
  // Tables freed by the switch may come back as other clusters: no cached copy may outlive it.
  s.l2.clear();
  for (const c of copies) s.l2.insert(entryOffset(s.l1, c.index * 8), c.table);
  if (p.snapshots) s.snapshots = p.snapshots;
  s.refcounts = new Refcounts(s.file, s.geo, newTable, rtOffset, {
    async setRefcountTable(offset, clusters) {
      const b = Buffer.alloc(12);
      b.writeBigUInt64BE(BigInt(offset), 0);
      b.writeUInt32BE(clusters, 8);
      await io.write(s.file, 48, b);
      h.refcountTableOffset = offset;
      h.refcountTableClusters = clusters;
    },
  }, node.name);
  bindRefcounts(s);
  await io.flush(s.file);
  // Nothing on disk names the old refcount structure any more.
  for (const off of oldBlocks) await s.refcounts.free(off, 1);
  await s.refcounts.free(rc.tableOffset, rc.table.length / cs);
}

/** A new snapshot of the active state; returns its entry. */
export async function createSnapshot(node: BlockNode, name: string, opts: CreateOptions = {}): Promise<SnapshotInfo> {
  const s = qstate(node);
  return s.lock.run(async () => {
    writable(node, s);
    // The tables are read and copied from the disk: it must match memory first.
    await writeBackMeta(s);
    const h = s.header;
    const { list, bytes } = await loadTable(s);
    if (list.length >= MAX_SNAPSHOTS) throw new BlockError('EFBIG', `qcow2 '${node.name}': too many snapshots`, { node: node.name });
    const id = opts.id ?? String(list.reduce((m, sn) => Math.max(m, Number.parseInt(sn.id, 10) || 0), 0) + 1);
    if (list.some((sn) => sn.id === id)) throw new BlockError('EEXIST', `qcow2 '${node.name}': a snapshot with ID '${id}' exists`, { node: node.name });
    if (Buffer.byteLength(id) > 0xffff || Buffer.byteLength(name) > 0xffff) throw new BlockError('EINVAL', 'snapshot ID or name is too long');
    const now = Date.now();
    // The snapshot keeps the current L1 table where it is; the active state moves to a copy.
    const sn: SnapshotInfo = {
      id, name, l1Offset: h.l1TableOffset, l1Size: h.l1Size,
      dateSec: opts.dateSec ?? Math.floor(now / 1000), dateNsec: opts.dateNsec ?? (now % 1000) * 1e6,
      vmClockNsec: opts.vmClockNsec ?? 0, vmStateSize: 0, diskSize: h.size, icount: opts.icount ?? 0, extraRest: Buffer.alloc(0),
    };
    const delta = newDelta(s);
    const l1 = Buffer.from(s.l1);
    await countTree(s, l1, h.l1Size, 1, delta);
    if (h.nbSnapshots) bump(delta, h.snapshotsOffset, clustersFor(bytes, s.geo.clusterSize), s.geo.clusterSize, -1);
    await commit(node, s, { l1, l1Size: h.l1Size, size: h.size, snapshots: [...list, sn], delta });
    return sn;
  });
}

/** Makes the snapshot's state the active one (its virtual size too, as qemu-img does). */
export async function applySnapshot(node: BlockNode, nameOrId: string, opts: { match?: 'either' | 'id' | 'name' } = {}): Promise<void> {
  const s = qstate(node);
  const before = s.header.size;
  await s.lock.run(async () => {
    writable(node, s);
    // The tables are read and copied from the disk: it must match memory first.
    await writeBackMeta(s);
    const [h, cs] = [s.header, s.geo.clusterSize];
    const { list } = await loadTable(s);
    const sn = list[find(node, list, nameOrId, opts.match ?? 'either')]!;
    const size = sn.diskSize ?? h.size;
    const l1Size = Math.max(sn.l1Size, l1EntriesFor(size, s.geo));
    const l1 = await readL1(s, sn.l1Offset, sn.l1Size, l1Size);
    const delta = newDelta(s);
    await countTree(s, l1, sn.l1Size, 1, delta);
    await countTree(s, s.l1, h.l1Size, -1, delta);
    if (h.l1Size) bump(delta, h.l1TableOffset, clustersFor(h.l1Size * 8, cs), cs, -1);
    await commit(node, s, { l1, l1Size, size, snapshots: null, delta });
  });
  if (s.header.size !== before) for (const e of node.parents) e.parent.childResized?.(e);
}

/** Removes a snapshot and drops its references. */
export async function deleteSnapshot(node: BlockNode, nameOrId: string, opts: { match?: 'either' | 'id' | 'name' } = {}): Promise<void> {
  const s = qstate(node);
  await s.lock.run(async () => {
    writable(node, s);
    // The tables are read and copied from the disk: it must match memory first.
    await writeBackMeta(s);
    const [h, cs] = [s.header, s.geo.clusterSize];
    const { list, bytes } = await loadTable(s);
    const i = find(node, list, nameOrId, opts.match ?? 'either');
    const [sn, delta] = [list[i]!, newDelta(s)];
    const snL1 = await readL1(s, sn.l1Offset, sn.l1Size, sn.l1Size);
    await countTree(s, snL1, sn.l1Size, -1, delta);
    if (sn.l1Size) bump(delta, sn.l1Offset, clustersFor(sn.l1Size * 8, cs), cs, -1);
    bump(delta, h.snapshotsOffset, clustersFor(bytes, cs), cs, -1);
    // The active tree is rewritten too: flags turn on where a count drops to 1.
    if (h.l1Size) bump(delta, h.l1TableOffset, clustersFor(h.l1Size * 8, cs), cs, -1);
    const rest = list.filter((_, k) => k !== i);
    await commit(node, s, { l1: Buffer.from(s.l1), l1Size: h.l1Size, size: h.size, snapshots: rest, delta });
  });
}
