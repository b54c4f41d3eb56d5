/**
 * The counting half of the qcow2 check (check.ts drives it and writes repairs): reads every
 * structure that references clusters through an edge to the `file` node (never the driver's
 * open, so a corrupt image stays checkable), builds the refcount each cluster should have,
 * and compares it with the stored one. Counting, messages and result fields follow
 * qemu-img 7.2, whose output scripts parse.
 */
import { BlockError } from '../../error.js';
import * as io from '../../io.js';
import type { BlockChild } from '../../node.js';
import { compressedLocation } from './entries.js';
import {
  AUTOCLEAR, EXT_BITMAPS, EXT_CRYPTO, EXT_DATA_FILE, geometry, getRefcount, INCOMPAT, MAX_L1_BYTES, MAX_REFTABLE_BYTES,
  parseHeader, type Geometry, type Qcow2Header,
} from './format.js';

export type RepairMode = 'none' | 'leaks' | 'all';

/** `qemu-img check --output=json`'s ImageCheck: optional counters appear only when non-zero. */
export interface CheckResult {
  filename: string;
  format: 'qcow2';
  'check-errors': number;
  'image-end-offset'?: number;
  'total-clusters'?: number;
  'allocated-clusters'?: number;
  'fragmented-clusters'?: number;
  'compressed-clusters'?: number;
  leaks?: number;
  corruptions?: number;
  'leaks-fixed'?: number;
  'corruptions-fixed'?: number;
}

export interface CheckOptions {
  repair: RepairMode;
  /** qemu-img's per-problem lines ("ERROR cluster 5 refcount=0 reference=1"); stderr in the CLI. */
  log?: (line: string) => void;
  filename?: string;
}

/** The check could not run to the end (qemu-img: "Check failed: ...", exit 1). */
export class CheckFailed extends BlockError {}

const L1E_RESERVED = 0x7f000000000001ffn;
const L2E_STD_RESERVED = 0x3f000000000001fen;
const OFFSET_MASK = 0x00fffffffffffe00n;
const REFT_OFFSET_MASK = 0xfffffffffffffe00n;
const BME_RESERVED = 0xff000000000001fen;
const COPIED = 1n << 63n;
const COMPRESSED = 1n << 62n;
const ZERO = 1n;

interface Counters {
  corruptions: number; leaks: number; checkErrors: number; leaksFixed: number; corruptionsFixed: number;
  allocated: number; fragmented: number; compressed: number;
}
const newCounters = (): Counters => ({ corruptions: 0, leaks: 0, checkErrors: 0, leaksFixed: 0, corruptionsFixed: 0, allocated: 0, fragmented: 0, compressed: 0 });
const hex = (v: bigint | number): string => v.toString(16);
const align8 = (n: number): number => Math.ceil(n / 8) * 8;

export interface EntryFix { pos: number; value: bigint; set: boolean }

/** One pass over the image: load, count references, compare, plan and write fixes. */
export class Checker {
  h!: Qcow2Header;
  g!: Geometry;
  cs = 0;
  /** Clusters compared: the file's, plus any referenced in its last partial cluster. */
  nb = 0;
  ref = new Float64Array(0);
  res = newCounters();
  reftable!: Buffer;
  blocks = new Map<number, Buffer>();
  l1!: Buffer;
  snapshots: { id: string; name: string; l1Offset: number; l1Size: number }[] = [];
  snapshotsSize = 0;
  /** qemu-img's "rebuild" condition: a used cluster's stored refcount is 0, or a block is bad. */
  rebuild = false;
  /** A used cluster has no usable refcount block: only a new refcount structure can fix it. */
  structural = false;
  /** Old refcount table and blocks as counted, dropped when a new structure replaces them. */
  structClusters: number[] = [];
  highest = 0;
  maxRc = 0;

  constructor(readonly file: BlockChild, readonly log: (l: string) => void) {}

  read(off: number, n: number): Promise<Buffer> {
    const b = Buffer.alloc(n);
    return n ? io.read(this.file, off, b).then(() => b) : Promise.resolve(b);
  }
  get fileLen(): number {
    return io.getLength(this.file);
  }

  /** Header, tables and snapshot list; refuses what qemu-img's open refuses. */
  async load(): Promise<void> {
    const len = this.fileLen;
    let head = await this.read(0, Math.min(len, 4096));
    this.h = parseHeader(head);
    const cs = (this.cs = 2 ** this.h.clusterBits);
    if (cs > head.length && len > head.length) this.h = parseHeader((head = await this.read(0, Math.min(cs, len))));
    const h = this.h;
    const bad = (m: string): BlockError => new BlockError('EINVAL', m);
    if (h.incompatible & INCOMPAT.DATA_FILE || h.extensions.some((e) => e.type === EXT_DATA_FILE)) {
      throw new BlockError('ENOTSUP', 'external data files are not supported');
    }
    if (h.refcountTableOffset % cs || !h.refcountTableOffset) throw bad('Invalid reference count table offset');
    if (!h.refcountTableClusters || h.refcountTableClusters * cs > MAX_REFTABLE_BYTES) throw bad('Reference count table too large');
    if (h.l1Size * 8 > MAX_L1_BYTES) throw bad('Active L1 table too large');
    if (h.l1TableOffset % cs) throw bad('Invalid L1 table offset');
    if (h.nbSnapshots && h.snapshotsOffset % cs) throw bad('Invalid snapshot table offset');
    if (h.nbSnapshots > 65536) throw bad('Too many snapshots');
    this.g = geometry(h);
    this.maxRc = this.g.refcountBits >= 53 ? Number.MAX_SAFE_INTEGER : 2 ** this.g.refcountBits - 1;
    this.nb = Math.ceil(len / cs);
    this.ref = new Float64Array(this.nb);
    this.reftable = await this.read(h.refcountTableOffset, h.refcountTableClusters * cs);
    this.l1 = await this.read(h.l1TableOffset, h.l1Size * 8);
    let off = h.snapshotsOffset;
    for (let i = 0; i < h.nbSnapshots; i++) {
      if (off + 40 > len) throw bad('Snapshot table exceeds the end of the file');
      const e = await this.read(off, 40);
      const idLen = e.readUInt16BE(12);
      const nameLen = e.readUInt16BE(14);
      const extra = e.readUInt32BE(36);
      const s = await this.read(off + 40 + extra, idLen + nameLen);
      this.snapshots.push({
        l1Offset: Number(e.readBigUInt64BE(0)), l1Size: e.readUInt32BE(8),
        id: s.toString('utf8', 0, idLen), name: s.toString('utf8', idLen),
      });
      off += align8(40 + extra + idLen + nameLen);
    }
    this.snapshotsSize = off - h.snapshotsOffset;
  }

  /** Counts one reference to every cluster that [offset, offset+size) touches. */
  inc(offset: number, size: number): boolean {
    if (size <= 0) return false;
    const cs = this.cs;
    // The last cluster may be partly allocated: a reference a little past the end is fine.
    if (offset + size - this.fileLen >= cs) {
      this.log(`ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x${hex(offset)} size 0x${hex(size)}`);
      this.res.corruptions++;
      return false;
    }
    const last = Math.floor((offset + size - 1) / cs);
    for (let k = Math.floor(offset / cs); k <= last; k++) {
      if (k >= this.ref.length) {
        const grown = new Float64Array(Math.max(k + 1, this.ref.length * 2));
        grown.set(this.ref);
        this.ref = grown;
      }
      if (k >= this.nb) this.nb = k + 1;
      if (this.ref[k]! >= this.maxRc) {
        this.log(`ERROR: overflow cluster offset=0x${hex(k * cs)}`);
        this.log('Use qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy if the image cannot be opened for writing');
        this.res.corruptions++;
        continue;
      }
      this.ref[k]!++;
    }
    return true;
  }

  /** Every reference, in qemu-img's order (it decides which one overflows first). */
  async calculate(): Promise<void> {
    const h = this.h;
    this.inc(0, this.cs);
    await this.checkL1(h.l1TableOffset, h.l1Size, true);
    for (const sn of this.snapshots) {
      if (sn.l1Offset % this.cs) {
        this.log(`ERROR snapshot ${sn.id} (${sn.name}) l1_offset=0x${hex(sn.l1Offset)}: L1 table is not cluster aligned; snapshot table entry corrupted`);
        this.res.corruptions++;
      } else if (sn.l1Size > MAX_L1_BYTES / 8) {
        this.log(`ERROR snapshot ${sn.id} (${sn.name}) l1_size=0x${hex(sn.l1Size)}: L1 table is too large; snapshot table entry corrupted`);
        this.res.corruptions++;
      } else await this.checkL1(sn.l1Offset, sn.l1Size, false);
    }
    this.inc(h.snapshotsOffset, this.snapshotsSize);
    const rtClusters = h.refcountTableClusters;
    if (this.inc(h.refcountTableOffset, rtClusters * this.cs)) {
      for (let i = 0; i < rtClusters; i++) this.structClusters.push(h.refcountTableOffset / this.cs + i);
    }
    const crypto = h.extensions.find((e) => e.type === EXT_CRYPTO);
    if (crypto && crypto.data.length >= 16) this.inc(Number(crypto.data.readBigUInt64BE(0)), Number(crypto.data.readBigUInt64BE(8)));
    await this.checkBitmaps();
    this.checkRefblocks();
  }

  async checkL1(offset: number, size: number, active: boolean): Promise<void> {
    if (!size) return;
    this.inc(offset, size * 8);
    const l1 = await this.read(offset, size * 8);
    for (let i = 0; i < size; i++) {
      const e = l1.readBigUInt64BE(i * 8);
      if (!e) continue;
      if (e & L1E_RESERVED) {
        this.log(`ERROR found L1 entry with reserved bits set: ${hex(e)}`);
        this.res.corruptions++;
      }
      const l2 = Number(e & OFFSET_MASK);
      this.inc(l2, this.cs);
      if (l2 % this.cs) {
        this.log(`ERROR l2_offset=${hex(l2)}: Table is not cluster aligned; L1 entry corrupted`);
        this.res.corruptions++;
      }
      await this.checkL2(l2, active);
    }
  }

  async checkL2(offset: number, active: boolean): Promise<void> {
    const { l2Size, l2EntrySize: es } = this.g;
    const extl2 = es === 16;
    const t = await this.read(offset, this.cs);
    const r = this.res;
    let next = 0;
    for (let i = 0; i < l2Size; i++) {
      const e = t.readBigUInt64BE(i * es);
      const bm = extl2 ? t.readBigUInt64BE(i * es + 8) : 0n;
      if (e & COMPRESSED) {
        const loc = compressedLocation(t, i * es, this.g.clusterBits);
        if (e & COPIED) {
          this.log(`ERROR: coffset=0x${hex(loc.offset)}: copied flag must never be set for compressed clusters`);
          r.corruptions++;
        }
        if (bm) {
          this.log(`ERROR compressed cluster ${i} with non-zero subcluster allocation bitmap, entry=0x${hex(e)}`);
          r.corruptions++;
          continue;
        }
        this.inc(loc.offset, loc.bytes);
        if (active) {
          r.allocated++;
          r.compressed++;
          r.fragmented++; // compressed clusters are fragmented by nature (qemu-img counts them so)
        }
        continue;
      }
      if (e & L2E_STD_RESERVED) {
        this.log(`ERROR found l2 entry with reserved bits set: ${hex(e)}`);
        r.corruptions++;
      }
      const host = Number(e & OFFSET_MASK);
      const zero = !extl2 && (e & ZERO) !== 0n;
      if (!host) {
        if (!zero && bm & 0xffffffffn) {
          r.corruptions++;
          this.log('ERROR: Unallocated cluster has non-zero subcluster allocation map');
        }
        continue;
      }
      if ((bm >> 32n) & bm) {
        r.corruptions++;
        this.log(`ERROR offset=${hex(host)}: Allocated cluster has corrupted subcluster allocation bitmap`);
      }
      if (host % this.cs) {
        r.corruptions++;
        const data = extl2 ? (bm & 0xffffffffn) !== 0n : !zero;
        this.log(data ? `ERROR offset=${hex(host)}: Data cluster is not properly aligned; L2 entry corrupted.`
          : `ERROR offset=${hex(host)}: Preallocated cluster is not properly aligned; L2 entry corrupted.`);
      }
      if (active) {
        r.allocated++;
        if (next && host !== next) r.fragmented++;
        next = host + this.cs;
      }
      this.inc(host, this.cs);
    }
  }

  /** Bitmaps count only while the autoclear bit says they are consistent (as qemu-img). */
  async checkBitmaps(): Promise<void> {
    const ext = this.h.extensions.find((e) => e.type === EXT_BITMAPS);
    if (!ext || !(this.h.autoclear & AUTOCLEAR.BITMAPS) || ext.data.length < 24 || !ext.data.readUInt32BE(0)) return;
    const n = ext.data.readUInt32BE(0);
    const dirSize = Number(ext.data.readBigUInt64BE(8));
    const dirOff = Number(ext.data.readBigUInt64BE(16));
    this.inc(dirOff, dirSize);
    const dir = await this.read(dirOff, dirSize);
    for (let i = 0, p = 0; i < n; i++) {
      if (p + 24 > dir.length) {
        this.res.corruptions++;
        return;
      }
      const tOff = Number(dir.readBigUInt64BE(p));
      const tSize = dir.readUInt32BE(p + 8);
      p += align8(24 + dir.readUInt32BE(p + 20) + dir.readUInt16BE(p + 18));
      this.inc(tOff, tSize * 8);
      const table = await this.read(tOff, tSize * 8);
      for (let k = 0; k < tSize; k++) {
        const e = table.readBigUInt64BE(k * 8);
        const off = Number(e & OFFSET_MASK);
        if (e & BME_RESERVED || (off && e & 1n) || off % this.cs) {
          this.res.corruptions++;
          continue;
        }
        if (off) this.inc(off, this.cs);
      }
    }
  }

  checkRefblocks(): void {
    const r = this.res;
    for (let i = 0; i < this.reftable.length / 8; i++) {
      const e = this.reftable.readBigUInt64BE(i * 8);
      const off = Number(e & REFT_OFFSET_MASK);
      const c = Math.floor(off / this.cs);
      if (e & 0x1ffn || off % this.cs) {
        this.log(e & 0x1ffn ? `ERROR refcount table entry ${i} has reserved bits set` : `ERROR refcount block ${i} is not cluster aligned; refcount table entry corrupted`);
        r.corruptions++;
        this.rebuild = this.structural = true;
        continue;
      }
      if (c >= this.nb) {
        r.corruptions++;
        this.log(`ERROR refcount block ${i} is outside image`);
        this.structural = true;
        continue;
      }
      if (!off) continue;
      this.inc(off, this.cs);
      this.structClusters.push(c);
      if (this.ref[c] !== 1) {
        this.log(`ERROR refcount block ${i} refcount=${this.ref[c]}`);
        r.corruptions++;
        this.rebuild = this.structural = true;
      }
    }
  }

  /** Offset of the refcount block that holds cluster c's refcount (0: none). */
  blockOff(c: number): number {
    const ti = Math.floor(c / this.g.rbEntries);
    return ti < this.reftable.length / 8 ? Number(this.reftable.readBigUInt64BE(ti * 8) & REFT_OFFSET_MASK) : 0;
  }

  /** Loads cluster c's refcount block (COPIED checks reach past the compared range too). */
  async loadBlockOf(c: number): Promise<void> {
    const off = this.blockOff(c);
    if (off && !(off % this.cs) && !this.blocks.has(off)) this.blocks.set(off, await this.read(off, this.cs));
  }

  /** Where cluster c's refcount lives, or null if it has no usable block. */
  slot(c: number): { block: Buffer; off: number; idx: number } | null {
    const off = this.blockOff(c);
    const block = this.blocks.get(off);
    return off && block ? { block, off, idx: c % this.g.rbEntries } : null;
  }

  /** The stored refcount of cluster c (0 without a block); null if it cannot be read. */
  stored(c: number): number | null {
    if (!this.blockOff(c)) return 0;
    const s = this.slot(c);
    try {
      return s ? getRefcount(s.block, s.idx, this.g.refcountBits) : null;
    } catch {
      return null;
    }
  }

  /** Stored against counted, for every cluster; returns the refcount changes it would make. */
  compare(fix: RepairMode): Map<number, number> {
    const plan = new Map<number, number>();
    const r = this.res;
    this.highest = 0;
    for (let i = 0; i < this.nb; i++) {
      const r1 = this.stored(i);
      if (r1 === null) {
        this.log(`Can't get refcount for cluster ${i}: Input/output error`);
        r.checkErrors++;
        continue;
      }
      const r2 = i < this.ref.length ? this.ref[i]! : 0;
      if (r1 > 0 || r2 > 0) this.highest = i;
      if (r1 === r2) continue;
      if (r1 === 0) {
        this.rebuild = true;
        if (!this.slot(i)) this.structural = true;
      }
      const ok = (r1 > r2 && fix !== 'none') || (r1 < r2 && fix === 'all' && this.slot(i) !== null);
      this.log(`${ok ? 'Repairing' : r1 < r2 ? 'ERROR' : 'Leaked'} cluster ${i} refcount=${r1} reference=${r2}`);
      if (ok) {
        plan.set(i, r2);
        if (r1 > r2) r.leaksFixed++;
        else r.corruptionsFixed++;
      } else if (r1 < r2) r.corruptions++;
      else r.leaks++;
    }
    return plan;
  }

  /** COPIED must be set exactly when the refcount is 1, in the active L1 and its L2 tables. */
  async checkCopied(rc: (c: number) => Promise<number | null>, repair: boolean): Promise<EntryFix[]> {
    const fixes: EntryFix[] = [];
    const { l2Size, l2EntrySize: es } = this.g;
    const cs = this.cs;
    const note = (what: string, pos: number, e: bigint, refcount: number): void => {
      this.log(`${repair ? 'Repairing' : 'ERROR'} OFLAG_COPIED ${what}${hex(e)} refcount=${refcount}`);
      if (!repair) return void this.res.corruptions++;
      fixes.push({ pos, value: refcount === 1 ? e | COPIED : e & ~COPIED, set: refcount === 1 });
      this.res.corruptionsFixed++;
    };
    for (let i = 0; i < this.l1.length / 8; i++) {
      const e = this.l1.readBigUInt64BE(i * 8);
      const l2 = Number(e & OFFSET_MASK);
      if (!l2) continue;
      const r1 = await rc(Math.floor(l2 / cs));
      if (r1 === null) continue;
      if ((r1 === 1) !== ((e & COPIED) !== 0n)) note(`L2 cluster: l1_index=${i} l1_entry=`, this.h.l1TableOffset + i * 8, e, r1);
      const t = await this.read(l2, cs);
      for (let j = 0; j < l2Size; j++) {
        const d = t.readBigUInt64BE(j * es);
        const host = Number(d & OFFSET_MASK);
        if (d & COMPRESSED || !host) continue;
        const r2 = await rc(Math.floor(host / cs));
        if (r2 === null) continue;
        if ((r2 === 1) !== ((d & COPIED) !== 0n)) note('data cluster: l2_entry=', l2 + j * es, d, r2);
      }
    }
    return fixes;
  }
}


/** A checker with every structure read and every reference counted. */
export async function loaded(file: BlockChild, log: (l: string) => void): Promise<Checker> {
  const c = new Checker(file, log);
  await c.load();
  await c.calculate();
  for (let k = 0; k < c.nb; k += c.g.rbEntries) await c.loadBlockOf(k);
  return c;
}
