/**
 * The qcow2 driver table: open (header checks, tables, backing file), resize, reopen,
 * permissions and description. Reads and writes are in read.ts/write.ts, discard and
 * status in ops.ts, allocation in refcount.ts.
 */
import { dirname, isAbsolute, resolve } from 'node:path';
import { BlockError } from '../../error.js';
import * as io from '../../io.js';
import type { BlockNode } from '../../node.js';
import { backingChildPerms, defaultChildPerms } from '../../perms.js';
import { ChildRole, Perm, type BlockDriver, type NodeOptions } from '../../types.js';
import { warn } from '../../warn.js';

import {
  EXT_CRYPTO, EXT_DATA_FILE, geometry, INCOMPAT, l1EntriesFor, parseHeader, unknownIncompatible, type Qcow2Header,
} from './format.js';
import { checkQcow2 } from './check.js';
import { qcow2FormatSpecific } from './info.js';
import { L2Cache } from './l2-cache.js';
import { qcow2HostExtents, qcow2WatchMappings } from './host-extents.js';
import { bindRefcounts } from './map.js';
import { unmappingAll } from './mapping-watch.js';
import { qcow2BlockStatus, qcow2Discard, qcow2WriteZeroes } from './ops.js';
import { qcow2Readv } from './read.js';
import { Refcounts } from './refcount.js';
import { readSnapshotTable, snapshotJson } from './snapshot-table.js';
import { Mutex, qstate, type Qcow2State } from './state.js';
import { qcow2Writev } from './write.js';
import { metaDirty, qcow2BeforeClose, qcow2Flush, writeBackMeta } from './writeback.js';

const MAX_L1_BYTES = 32 << 20;
const MAX_REFTABLE_BYTES = 8 << 20;

/** How open errors name the image: its file name when known, else the node name. */
function imageName(node: BlockNode): string {
  const f = node.file?.node.options['filename'];
  return typeof f === 'string' ? f : node.name;
}

function bad(node: BlockNode, msg: string): BlockError {
  return new BlockError('EINVAL', `Could not open qcow2 image '${imageName(node)}': ${msg}`, { node: node.name });
}

/** parseHeader's errors (bad magic, version, cluster size) with the image named. */
function parseNamed(node: BlockNode, buf: Buffer): Qcow2Header {
  try {
    return parseHeader(buf);
  } catch (e) {
    if (!(e instanceof BlockError)) throw e;
    throw new BlockError(e.code, `Could not open qcow2 image '${imageName(node)}': ${e.message.replace(/^qcow2: /, '')}`, { node: node.name }, e);
  }
}

function checkHeader(node: BlockNode, h: Qcow2Header, fileLen: number): void {
  const unknown = unknownIncompatible(h);
  if (unknown.length) throw new BlockError('ENOTSUP', `Could not open qcow2 image '${imageName(node)}': unsupported qcow2 feature(s): ${unknown.join(', ')}`, { node: node.name });
  if (h.cryptMethod !== 0 || h.extensions.some((e) => e.type === EXT_CRYPTO)) {
    throw new BlockError('ENOTSUP', `Could not open qcow2 image '${imageName(node)}': encrypted images are not supported`, { node: node.name });
  }
  if (h.incompatible & INCOMPAT.DATA_FILE || h.extensions.some((e) => e.type === EXT_DATA_FILE)) {
    throw new BlockError('ENOTSUP', `Could not open qcow2 image '${imageName(node)}': external data files are not supported`, { node: node.name });
  }
  if (h.incompatible & INCOMPAT.COMPRESSION && h.compressionType !== 0) {
    throw new BlockError('ENOTSUP', `Could not open qcow2 image '${imageName(node)}': compression type ${h.compressionType} (zstd) is not supported`, { node: node.name });
  }
  if (h.version === 2 && h.refcountOrder !== 4) throw bad(node, 'version 2 images must have 16-bit refcounts');
  const g = geometry(h);
  const cs = g.clusterSize;
  if (h.size > Number.MAX_SAFE_INTEGER / 2) throw bad(node, `virtual size ${h.size} is too large`);
  if (h.l1Size * 8 > MAX_L1_BYTES) throw bad(node, `L1 table of ${h.l1Size} entries is too large`);
  if (h.l1Size < l1EntriesFor(h.size, g)) throw bad(node, `L1 table of ${h.l1Size} entries is too small for ${h.size} bytes`);
  if (h.l1TableOffset % cs || (h.l1Size && h.l1TableOffset === 0)) throw bad(node, `L1 table offset ${h.l1TableOffset} is invalid`);
  if (h.l1TableOffset + h.l1Size * 8 > fileLen) throw bad(node, `L1 table lies past the end of the file`);
  if (h.refcountTableOffset % cs || h.refcountTableOffset === 0) throw bad(node, `refcount table offset ${h.refcountTableOffset} is invalid`);
  if (h.refcountTableClusters === 0 || h.refcountTableClusters * cs > MAX_REFTABLE_BYTES) {
    throw bad(node, `refcount table of ${h.refcountTableClusters} clusters is invalid`);
  }
  if (h.refcountTableOffset + h.refcountTableClusters * cs > fileLen) throw bad(node, 'refcount table lies past the end of the file');
  // Both tables are written in place: one on top of the other would corrupt both.
  const rtEnd = h.refcountTableOffset + h.refcountTableClusters * cs;
  if (h.l1Size && h.l1TableOffset < rtEnd && h.refcountTableOffset < h.l1TableOffset + h.l1Size * 8) {
    throw bad(node, `L1 table (offset ${h.l1TableOffset}) overlaps the refcount table (offset ${h.refcountTableOffset})`);
  }
  if (h.incompatible & INCOMPAT.EXTL2 && h.clusterBits < 14) throw bad(node, 'extended L2 entries need clusters of at least 16 KiB');
  if (h.nbSnapshots > 65536) throw bad(node, `${h.nbSnapshots} snapshots are too many (at most 65536)`);
  if (h.nbSnapshots && (h.snapshotsOffset % cs || h.snapshotsOffset === 0)) throw bad(node, `snapshot table offset ${h.snapshotsOffset} is invalid`);
}

/** Writes bytes into the header (cluster 0). */
async function writeHeaderField(s: Qcow2State, offset: number, buf: Buffer): Promise<void> {
  await io.write(s.file, offset, buf);
}

/** Options of the backing node: what the user gave, or what the header names. */
function backingOptions(node: BlockNode, o: NodeOptions, h: Qcow2Header): NodeOptions | string | null {
  const given = o['backing'];
  if (given === null) return null;
  if (given !== undefined) return given as NodeOptions | string;
  if (!h.backingFile) return null;
  const fileOpts = node.file!.node.options;
  const base = typeof fileOpts['filename'] === 'string' ? dirname(fileOpts['filename']) : process.cwd();
  const path = isAbsolute(h.backingFile) ? h.backingFile : resolve(base, h.backingFile);
  const fmt = h.backingFormat;
  if (!fmt) {
    throw new BlockError('EINVAL', `Could not open qcow2 image '${imageName(node)}': its backing file '${h.backingFile}' has no recorded format, and Spindle does not guess raw; name it with backing.driver (or record it: spindle img rebase -u -F FMT)`, { node: node.name });
  }
  return { driver: fmt, file: { driver: 'file', filename: path } };
}

export const qcow2Driver: BlockDriver = {
  format: 'qcow2',
  supportsBacking: true,
  optionKeys: ['file', 'backing', 'l2-cache-size'],

  async open(node, o, ctx) {
    const file = (await ctx.openChild(node, o['file'] as never, 'file', ChildRole.DATA | ChildRole.METADATA | ChildRole.PRIMARY))!;
    const fileLen = io.getLength(file);
    const first = Buffer.alloc(Math.min(fileLen, 4096));
    await io.read(file, 0, first);
    let h = parseNamed(node, first);
    const cs = 2 ** h.clusterBits;
    if (cs > first.length && fileLen > first.length) {
      const whole = Buffer.alloc(Math.min(cs, fileLen));
      await io.read(file, 0, whole);
      h = parseNamed(node, whole);
    }
    checkHeader(node, h, fileLen);
    const g = geometry(h);
    let readOnly = node.readOnly;
    if (h.incompatible & INCOMPAT.CORRUPT && !readOnly) {
      warn(`qcow2 image '${imageName(node)}' is marked corrupt; opening it read-only (repair it with 'qemu-img check -r all')`);
      node.readOnly = readOnly = true;
    }
    if (h.incompatible & INCOMPAT.DIRTY && !readOnly) {
      // Lazy refcounts were in use and the image was not closed: its refcounts may be
      // stale. Repair them before writing anything, as QEMU does.
      warn(`qcow2 image '${imageName(node)}' was not closed cleanly; repairing its refcounts`);
      const r = await checkQcow2(file, { repair: 'all', filename: imageName(node) });
      if (r.corruptions || r['check-errors']) {
        throw new BlockError('EIO', `Could not open qcow2 image '${imageName(node)}' read-write: it was not closed cleanly and repairing it left ${r.corruptions ?? 0} errors; try 'spindle img check -r all'`, { node: node.name });
      }
      const again = Buffer.alloc(Math.min(cs, io.getLength(file)));
      await io.read(file, 0, again);
      h = parseNamed(node, again);
      checkHeader(node, h, io.getLength(file));
    }
    const l1 = Buffer.alloc(h.l1Size * 8);
    if (h.l1Size) await io.read(file, h.l1TableOffset, l1);
    const reftable = Buffer.alloc(h.refcountTableClusters * cs);
    await io.read(file, h.refcountTableOffset, reftable);
    const cacheTables = Math.max(4, Math.min(h.l1Size, Math.floor(Number(o['l2-cache-size'] ?? 32 << 20) / cs)));
    const s: Qcow2State = {
      header: h, geo: g, file, l1, readOnly, corrupt: false, lock: new Mutex(), allocating: new Map(),
      mapWatchers: new Set(), mapGen: 0,
      l2: new L2Cache(file, cs, cacheTables),
      refcounts: null!,
    };
    s.refcounts = new Refcounts(file, g, reftable, h.refcountTableOffset, {
      async setRefcountTable(offset, clusters) {
        const b = Buffer.alloc(12);
        b.writeBigUInt64BE(BigInt(offset), 0);
        b.writeUInt32BE(clusters, 8);
        await writeHeaderField(s, 48, b);
        h.refcountTableOffset = offset;
        h.refcountTableClusters = clusters;
      },
    }, node.name);
    bindRefcounts(s);
    try {
      // For info(); a table that cannot be read fails the snapshot operations, not the open.
      if (h.nbSnapshots) s.snapshots = (await readSnapshotTable(file, h)).list;
      else s.snapshots = [];
    } catch {
      s.snapshots = undefined;
    }
    node.opaque = s;
    const bopts = backingOptions(node, o, h);
    if (bopts !== null) await ctx.openChild(node, bopts, 'backing', ChildRole.COW);
    if (!readOnly && h.autoclear !== 0n) {
      // Spindle maintains no autoclear feature (bitmaps): clear the bits before it writes,
      // so readers know that e.g. the bitmaps missed these writes (qcow2.txt, autoclear).
      // Last, so an open that fails earlier has written nothing.
      await io.write(file, 88, Buffer.alloc(8));
      await io.flush(file);
      h.autoclear = 0n;
    }
  },
  getLength: (node) => qstate(node).header.size,
  childPerms(node, child, perm, shared) {
    if (child.role & ChildRole.COW) return backingChildPerms(perm, shared);
    const p = defaultChildPerms(perm, shared, true);
    p.perm |= Perm.CONSISTENT_READ;
    // Metadata changes need write and resize on the file even if no parent writes yet.
    if (!node.readOnly) p.perm |= Perm.WRITE | Perm.RESIZE;
    p.shared &= ~(Perm.WRITE | Perm.RESIZE);
    return p;
  },
  readv: qcow2Readv,
  writev: qcow2Writev,
  flush: qcow2Flush,
  beforeClose(node) {
    // A native fast path must let go of the image before the file goes.
    unmappingAll(qstate(node));
    return qcow2BeforeClose(node);
  },
  discard: qcow2Discard,
  writeZeroes: qcow2WriteZeroes,
  blockStatus: qcow2BlockStatus,
  hostExtents: qcow2HostExtents,
  watchMappings: qcow2WatchMappings,

  async truncate(node, length) {
    const s = qstate(node);
    const h = s.header;
    if (length < h.size) throw new BlockError('ENOTSUP', `qcow2 '${node.name}': shrinking is not supported`, { node: node.name });
    // A backing file longer than the old size would show through the new area: it must read
    // as zeroes (as QEMU does it), which takes zero clusters (version 3).
    const old = h.size;
    const blen = node.backing ? node.backing.node.length : 0;
    const hidden = length > old && blen > old;
    if (hidden && h.version === 2) {
      throw new BlockError('ENOTSUP', `qcow2 '${node.name}': cannot grow a version 2 image past its old size while its backing file is longer (the new area cannot be zeroed)`, { node: node.name });
    }
    await s.lock.run(async () => {
      const need = l1EntriesFor(length, s.geo);
      if (need > h.l1Size) {
        const cs = s.geo.clusterSize;
        const clusters = Math.ceil((need * 8) / cs);
        const host = await s.refcounts.alloc(clusters);
        const l1 = Buffer.alloc(clusters * cs);
        s.l1.copy(l1);
        await io.write(s.file, host, l1);
        await io.flush(s.file);
        const b = Buffer.alloc(12);
        b.writeUInt32BE(need, 0);
        b.writeBigUInt64BE(BigInt(host), 4);
        await writeHeaderField(s, 36, b);
        const oldOffset = h.l1TableOffset;
        const oldClusters = Math.ceil((h.l1Size * 8) / cs);
        // The L1 table moves (its entries are unchanged): rare enough to report it all.
        unmappingAll(s);
        h.l1Size = need;
        h.l1TableOffset = host;
        s.l1 = l1.subarray(0, need * 8);
        if (oldClusters) await s.refcounts.free(oldOffset, oldClusters);
      }
    });
    if (hidden) {
      const cs = s.geo.clusterSize;
      const head = Math.min(Math.ceil(old / cs) * cs, length);
      if (head > old) {
        const zeroes = Buffer.alloc(head - old);
        await new Promise<void>((res, rej) => qcow2Writev(node, old, zeroes.length, [zeroes], 0, (e) => (e ? rej(e) : res())));
      }
      const end = Math.ceil(Math.min(length, blen) / cs) * cs;
      if (end > head) await qcow2WriteZeroes(node, head, end - head, 0);
    }
    await s.lock.run(async () => {
      const b = Buffer.alloc(8);
      b.writeBigUInt64BE(BigInt(length));
      await writeHeaderField(s, 24, b);
      h.size = length;
    });
  },
  reopen: {
    async prepare(st) {
      const s = qstate(st.node);
      if (!st.readOnly && s.header.incompatible & (INCOMPAT.CORRUPT | INCOMPAT.DIRTY)) {
        throw new BlockError('EPERM', `qcow2 image '${st.node.name}' is marked corrupt or dirty and cannot be made writable`, { node: st.node.name });
      }
      // Read-only from now on: what is cached goes to the disk first.
      if (st.readOnly && !s.readOnly && metaDirty(s)) await s.lock.run(() => writeBackMeta(s));
    },
    commit(st) {
      const s = qstate(st.node);
      if (st.readOnly && !s.readOnly) unmappingAll(s); // nothing is writable in place any more
      s.readOnly = st.readOnly;
    },
    abort() {},
  },
  describe(node) {
    const s = qstate(node);
    return !node.backing && s.header.backingFile ? { backing: null } : {};
  },
  info(node) {
    const s = qstate(node);
    const h = s.header;
    const info: Record<string, unknown> = { 'cluster-size': 2 ** h.clusterBits, 'format-specific': qcow2FormatSpecific(h) };
    if (s.snapshots?.length) info['snapshots'] = s.snapshots.map(snapshotJson);
    // The backing file as the header names it (query-block's backing_file, ImageInfo).
    if (h.backingFile) {
      info['backing-filename'] = h.backingFile;
      if (h.backingFormat) info['backing-filename-format'] = h.backingFormat;
    }
    return info;
  },
};


