/**
 * Refcounts: the refcount table, its blocks (cached), and cluster allocation.
 *
 * Changes reach the disk in an order that survives a crash at any write: a cluster's
 * refcount is raised before anything on disk points at it (allocations for data are raised
 * in memory and written back before the L2 tables that use them, see writeback.ts; the
 * rest is written through), and lowered only after nothing on disk points at it any more;
 * a new refcount block is written before the table entry that links it, and a new table
 * before the header that names it. A crash in between leaves leaked clusters at worst,
 * never a reference to a free cluster.
 */
import { BlockError } from '../../error.js';
import * as io from '../../io.js';
import type { BlockChild } from '../../node.js';
import { entryOffset, rcGet, rcSet, writeEntry } from './entries.js';
import type { Geometry } from './format.js';
import { badRefcountBlock, metadataInFree, planTableGrowth, type MetadataAt } from './refcount-layout.js';

/** Byte range of a block that holds entries [first, last]. */
function byteSpan(first: number, last: number, bits: number): [number, number] {
  return [Math.floor((first * bits) / 8), Math.ceil(((last + 1) * bits) / 8)];
}

export interface HeaderSink {
  /** Writes the refcount table offset and cluster count into the header. */
  setRefcountTable(offset: number, clusters: number): Promise<void>;
}

export class Refcounts {
  table: Buffer;
  tableOffset: number;
  private readonly blocks = new Map<number, Buffer>();
  /** Lowest cluster index that may be free. */
  freeHint = 0;
  readonly maxRefcount: number;
  /** Called once when corruption is found (the driver marks the image corrupt). */
  onCorrupt: ((msg: string) => void) | null = null;
  /**
   * What metadata outside the refcount structures (L1 table, L2 tables) lies in bytes
   * [offset, offset+bytes), or '' if none known: such clusters are never handed out.
   */
  metadataAt: MetadataAt = null;
  /** Set once corruption is found: the refcounts change no more. */
  private broken: string | null = null;
  /** Cluster indices of the refcount blocks, once the table has been checked (first allocation). */
  private blockClusters: Set<number> | null = null;

  constructor(
    private readonly file: BlockChild,
    private readonly geo: Geometry,
    table: Buffer,
    tableOffset: number,
    private readonly header: HeaderSink,
    private readonly nodeName: string,
  ) {
    this.table = table;
    this.tableOffset = tableOffset;
    this.maxRefcount = geo.refcountBits >= 53 ? Number.MAX_SAFE_INTEGER : 2 ** geo.refcountBits - 1;
  }

  get tableEntries(): number {
    return this.table.length / 8;
  }

  /** Reports corruption: the image is marked corrupt and its refcounts change no more. */
  private corrupt(msg: string): BlockError {
    const f = this.file.node.options['filename'];
    const full = `qcow2 image '${typeof f === 'string' ? f : this.nodeName}' is corrupt: ${msg}`;
    if (this.broken === null) {
      this.broken = full;
      this.onCorrupt?.(full);
    }
    return new BlockError('EIO', full, { node: this.nodeName });
  }

  /** Refuses changes once corruption was found (they could only spread it). */
  private checkUsable(): void {
    if (this.broken !== null) throw new BlockError('EIO', `${this.broken}; no further refcount changes`, { node: this.nodeName });
  }

  /** What is wrong with a refcount block at `off` (entry `ti`), or '' if nothing. */
  private badBlock(off: number, ti: number): string {
    return badRefcountBlock(this.geo.clusterSize, off, ti, io.getLength(this.file), this.tableOffset, this.table.length, this.metadataAt);
  }

  /** Offset of the refcount block of table entry `ti` (0: none). */
  private blockOffset(ti: number): number {
    if (ti >= this.tableEntries) return 0;
    // Bits 56-63 belong to the offset too (qcow2.txt); no file reaches that far.
    if (this.table[ti * 8] !== 0) throw this.corrupt(`refcount table entry ${ti} points past 2^56`);
    return entryOffset(this.table, ti * 8);
  }

  /**
   * Checks the whole table once before the first change: every block inside the file, clear
   * of the other metadata, and no block named twice (a corrupt table could otherwise make the
   * search for a free cluster run through the same full block again and again).
   */
  private checkTable(): Set<number> {
    if (this.blockClusters) return this.blockClusters;
    const cs = this.geo.clusterSize;
    const seen = new Set<number>();
    for (let ti = 0; ti < this.tableEntries; ti++) {
      const off = this.blockOffset(ti);
      if (!off) continue;
      const bad = this.badBlock(off, ti);
      if (bad) throw this.corrupt(bad);
      if (seen.has(off / cs)) throw this.corrupt(`refcount block ${off} is named twice in the refcount table`);
      seen.add(off / cs);
    }
    this.blockClusters = seen;
    return seen;
  }

  /**
   * Clusters [c, c+n) are free by their refcounts: refuse them if they hold metadata (a corrupt
   * refcount of 0 would make the next write overwrite it).
   */
  private checkFree(c: number, n: number): void {
    const what = metadataInFree(this.geo.clusterSize, c, n, this.tableOffset, this.table.length, this.metadataAt, () => this.checkTable());
    if (what) throw this.corrupt(`cluster ${c * this.geo.clusterSize} has refcount 0 but holds ${what}`);
  }

  private async loadBlock(off: number, ti = -1): Promise<Buffer> {
    let b = this.blocks.get(off);
    if (b) return b;
    const cs = this.geo.clusterSize;
    const bad = this.badBlock(off, ti);
    if (bad) throw this.corrupt(bad);
    b = Buffer.alloc(cs);
    await io.read(this.file, off, b);
    if (this.blocks.size > 256) this.evictOne();
    this.blocks.set(off, b);
    return b;
  }

  /** Refcount writes in flight, per block offset: such a block stays cached. */
  private readonly writing = new Map<number, number>();
  /** Byte ranges [lo, hi) of cached blocks raised in memory but not written yet. */
  private readonly dirty = new Map<number, [number, number]>();

  /**
   * Drops the oldest cached block that no write is in flight for: evicted and reloaded
   * before its write landed, a block would come back from disk without it (and a cluster
   * just allocated would look free again).
   */
  private evictOne(): void {
    for (const k of this.blocks.keys()) {
      if (!this.writing.has(k) && !this.dirty.has(k)) {
        this.blocks.delete(k);
        return;
      }
    }
  }

  /** The refcount of cluster `c` (clusters past the table count as free). */
  async get(c: number): Promise<number> {
    const ti = Math.floor(c / this.geo.rbEntries);
    const off = this.blockOffset(ti);
    if (!off) return 0;
    return rcGet(await this.loadBlock(off, ti), c % this.geo.rbEntries, this.geo.refcountBits);
  }

  /** Adds `delta` to the refcounts of clusters [c, c+n), written through. */
  async update(c: number, n: number, delta: number): Promise<void> {
    this.checkUsable();
    this.checkTable();
    if (!Number.isSafeInteger(c) || c < 0) throw this.corrupt(`refcount update for an invalid cluster index ${c}`);
    await this.loadSpan(c, n, delta);
    await this.writeSpans(this.updateMem(c, n, delta));
  }

  /** Loads the blocks for clusters [c, c+n); they must exist. */
  private async loadSpan(c: number, n: number, delta: number): Promise<void> {
    const rbE = this.geo.rbEntries;
    for (let ti = Math.floor(c / rbE); ti <= Math.floor((c + n - 1) / rbE); ti++) {
      const off = this.blockOffset(ti);
      if (!off) {
        if (delta > 0) throw this.corrupt(`no refcount block for cluster ${Math.max(c, ti * rbE)}`);
        throw this.corrupt(`freeing cluster ${Math.max(c, ti * rbE)}, whose refcount is already 0`);
      }
      await this.loadBlock(off, ti);
    }
  }

  /** The in-memory half of an update (blocks loaded): synchronous, so no one sees it half done. */
  private updateMem(c: number, n: number, delta: number): [number, Buffer][] {
    const rbE = this.geo.rbEntries;
    const bits = this.geo.refcountBits;
    const spans: [number, Buffer][] = [];
    for (let i = c; i < c + n; ) {
      const ti = Math.floor(i / rbE);
      const end = Math.min(c + n, (ti + 1) * rbE);
      const off = entryOffset(this.table, ti * 8);
      const blk = this.blocks.get(off)!;
      const first = i % rbE;
      const last = end - 1 - ti * rbE;
      for (let k = first; k <= last; k++) {
        const v = rcGet(blk, k, bits) + delta;
        if (v < 0) throw this.corrupt(`refcount of cluster ${ti * rbE + k} would drop below 0`);
        if (v > this.maxRefcount) throw new BlockError('EINVAL', `qcow2 '${this.nodeName}': refcount of cluster ${ti * rbE + k} would overflow ${this.geo.refcountBits} bits`);
      }
      for (let k = first; k <= last; k++) {
        const v = rcGet(blk, k, bits) + delta;
        rcSet(blk, k, bits, v);
        if (v === 0 && ti * rbE + k < this.freeHint) this.freeHint = ti * rbE + k;
      }
      const [b0, b1] = byteSpan(first, last, bits);
      spans.push([off + b0, Buffer.from(blk.subarray(b0, b1))]);
      i = end;
    }
    return spans;
  }

  private async writeSpans(spans: [number, Buffer][]): Promise<void> {
    const cs = this.geo.clusterSize;
    const blockOf = (off: number): number => off - (off % cs);
    for (const [off] of spans) this.writing.set(blockOf(off), (this.writing.get(blockOf(off)) ?? 0) + 1);
    let i = 0;
    try {
      for (; i < spans.length; i++) {
        const [off, bytes] = spans[i]!;
        try {
          await io.write(this.file, off, bytes);
        } finally {
          this.doneWriting(blockOf(off));
        }
      }
    } finally {
      for (let k = i + 1; k < spans.length; k++) this.doneWriting(blockOf(spans[k]![0]));
    }
  }

  private doneWriting(blk: number): void {
    const n = (this.writing.get(blk) ?? 1) - 1;
    if (n > 0) this.writing.set(blk, n);
    else this.writing.delete(blk);
  }

  /**
   * Allocates `n` contiguous clusters like alloc(), but raises their refcounts in memory
   * only: writeBack() writes them, and must, before anything on disk points at them.
   * Sub-byte refcounts share bytes between clusters, so for them the write happens now.
   */
  async allocDirty(n: number): Promise<number> {
    if (this.geo.refcountBits < 8) return this.alloc(n);
    this.checkUsable();
    const c = await this.findRun(n);
    this.markDirty(this.updateMem(c, n, 1));
    this.freeHint = c + n;
    return c * this.geo.clusterSize;
  }

  /** A run of `n` free clusters whose refcount blocks exist and are loaded. */
  private async findRun(n: number): Promise<number> {
    for (;;) {
      const c = await this.findFree(n, this.freeHint);
      const missing = await this.firstMissingBlock(c, n);
      if (missing >= 0) {
        await this.ensureBlock(missing);
        continue;
      }
      await this.loadSpan(c, n, 1);
      if ((await this.get(c)) !== 0) continue; // taken while loading
      this.checkFree(c, n);
      return c;
    }
  }

  /** Raises the refcounts of clusters [c, c+n) (in use already) by one, in memory, like allocDirty(). */
  async raiseDirty(c: number, n: number): Promise<void> {
    if (this.geo.refcountBits < 8) return this.update(c, n, 1);
    this.checkUsable();
    this.checkTable();
    await this.loadSpan(c, n, 1);
    this.markDirty(this.updateMem(c, n, 1));
  }

  private markDirty(spans: [number, Buffer][]): void {
    const cs = this.geo.clusterSize;
    for (const [off, bytes] of spans) {
      const blk = off - (off % cs);
      const lo = off - blk, hi = lo + bytes.length;
      const d = this.dirty.get(blk);
      if (d) {
        d[0] = Math.min(d[0], lo);
        d[1] = Math.max(d[1], hi);
      } else this.dirty.set(blk, [lo, hi]);
    }
  }

  /** Refcount blocks with raised counts not written yet. */
  get dirtyCount(): number {
    return this.dirty.size;
  }

  /**
   * Writes every raised count that is only in memory, in parallel. Context: under the
   * driver's metadata lock (nothing changes meanwhile).
   */
  async writeBack(): Promise<void> {
    if (!this.dirty.size) return;
    const spans: [number, Buffer][] = [];
    for (const [blk, [lo, hi]] of this.dirty) spans.push([blk + lo, Buffer.from(this.blocks.get(blk)!.subarray(lo, hi))]);
    const cs = this.geo.clusterSize;
    const results = await Promise.allSettled(spans.map((sp) => this.writeSpans([sp])));
    results.forEach((r, i) => {
      if (r.status === 'fulfilled') this.dirty.delete(spans[i]![0] - (spans[i]![0] % cs));
    });
    for (const r of results) if (r.status === 'rejected') throw r.reason;
  }

  /**
   * First run of `n` free clusters at or after `from`: a block at a time, synchronously inside
   * a loaded block; clusters without a block (or past the table) are free.
   */
  private async findFree(n: number, from: number): Promise<number> {
    this.checkTable();
    const rbE = this.geo.rbEntries;
    const bits = this.geo.refcountBits;
    let start = from;
    let run = 0;
    for (let c = from; ; ) {
      const ti = Math.floor(c / rbE);
      const end = (ti + 1) * rbE;
      const off = this.blockOffset(ti);
      if (!off) {
        if (run === 0) start = c;
        run += end - c;
        if (run >= n) return start;
        c = end;
        continue;
      }
      const blk = await this.loadBlock(off, ti);
      for (; c < end; c++) {
        if (rcGet(blk, c - ti * rbE, bits) === 0) {
          if (run === 0) start = c;
          if (++run === n) return start;
        } else run = 0;
      }
    }
  }

  /**
   * Allocates `n` contiguous clusters: raises their refcounts to 1 (written) and returns
   * the host offset of the first. Context: under the driver's allocation lock.
   */
  async alloc(n: number): Promise<number> {
    this.checkUsable();
    const c = await this.findRun(n);
    const spans = this.updateMem(c, n, 1);
    this.freeHint = c + n;
    await this.writeSpans(spans);
    return c * this.geo.clusterSize;
  }

  /** Table index of the first refcount block missing for clusters [c, c+n), or -1. */
  private async firstMissingBlock(c: number, n: number): Promise<number> {
    const rbE = this.geo.rbEntries;
    for (let ti = Math.floor(c / rbE); ti <= Math.floor((c + n - 1) / rbE); ti++) {
      if (!this.blockOffset(ti)) return ti;
    }
    return -1;
  }

  /** Creates the refcount block for table index `ti`. */
  private async ensureBlock(ti: number): Promise<void> {
    if (ti >= this.tableEntries) {
      await this.growTable(ti);
      return;
    }
    const rbE = this.geo.rbEntries;
    const cs = this.geo.clusterSize;
    const c = await this.findFree(1, this.freeHint);
    this.checkFree(c, 1);
    const blk = Buffer.alloc(cs);
    if (Math.floor(c / rbE) === ti) {
      // The new block describes itself.
      rcSet(blk, c % rbE, this.geo.refcountBits, 1);
    } else {
      const missing = await this.firstMissingBlock(c, 1);
      if (missing >= 0) return this.ensureBlock(missing);
      await this.update(c, 1, 1);
    }
    await io.write(this.file, c * cs, blk);
    this.blocks.set(c * cs, blk);
    const e = Buffer.alloc(8);
    writeEntry(e, 0, c * cs, false);
    await io.write(this.file, this.tableOffset + ti * 8, e);
    e.copy(this.table, ti * 8);
    this.blockClusters?.add(c);
    if (c + 1 > this.freeHint) this.freeHint = c + 1;
  }

  /**
   * Grows the refcount table to cover table index `need`: new blocks and the new table go
   * past everything the old table covers, described by the new blocks themselves; the header
   * switches to them in one write; then the old table's clusters are freed.
   */
  private async growTable(need: number): Promise<void> {
    const rbE = this.geo.rbEntries;
    const cs = this.geo.clusterSize;
    const bits = this.geo.refcountBits;
    const oldEntries = this.tableEntries;
    const oldOffset = this.tableOffset;
    const oldClusters = this.table.length / cs;
    const fileEnd = Math.ceil(io.getLength(this.file) / cs);
    const base = Math.max(oldEntries * rbE, fileEnd);
    const { tClusters, nBlocks } = planTableGrowth(this.geo, oldEntries, base, need);
    const tableStart = base;
    const blocksStart = base + tClusters;
    const newBlocks = Array.from({ length: nBlocks }, () => Buffer.alloc(cs));
    for (let c = tableStart; c < blocksStart + nBlocks; c++) {
      const ti = Math.floor(c / rbE);
      rcSet(newBlocks[ti - oldEntries]!, c % rbE, bits, 1);
    }
    const table = Buffer.alloc(tClusters * cs);
    this.table.copy(table, 0, 0, oldEntries * 8);
    for (let k = 0; k < nBlocks; k++) {
      this.blockClusters?.add(blocksStart + k);
      writeEntry(table, (oldEntries + k) * 8, (blocksStart + k) * cs, false);
      await io.write(this.file, (blocksStart + k) * cs, newBlocks[k]!);
      this.blocks.set((blocksStart + k) * cs, newBlocks[k]!);
    }
    await io.write(this.file, tableStart * cs, table);
    await io.flush(this.file);
    await this.header.setRefcountTable(tableStart * cs, tClusters);
    this.table = table;
    this.tableOffset = tableStart * cs;
    this.freeHint = Math.max(this.freeHint, blocksStart + nBlocks);
    await this.update(oldOffset / cs, oldClusters, -1);
  }

  /** Frees clusters [offset, offset + n clusters). */
  async free(offset: number, n: number): Promise<void> {
    await this.update(Math.floor(offset / this.geo.clusterSize), n, -1);
  }
}
