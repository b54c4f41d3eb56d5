/**
 * A bounded cache of L2 tables, keyed by host offset. Loads of one table share one read;
 * the least recently used table that is clean and not being written goes when the cache is
 * full.
 *
 * Tables are written back: an allocation changes its table here and marks the bytes dirty;
 * writeBack() (from the driver's metadata write-back, after the refcounts) writes them out.
 * A dirty table stays cached: evicted and reloaded, it would come back without its entries.
 */
import * as io from '../../io.js';
import type { BlockChild } from '../../node.js';

interface Entry {
  buf: Buffer;
  /** Writes in flight from this table. */
  pins: number;
  /** Dirty byte range [lo, hi); lo >= hi when clean. */
  lo: number;
  hi: number;
}

export class L2Cache {
  private readonly tables = new Map<number, Entry>();
  private readonly loading = new Map<number, Promise<Buffer>>();
  /** Offsets of the tables with dirty bytes. */
  private readonly dirty = new Set<number>();

  constructor(
    private readonly file: BlockChild,
    private readonly tableSize: number,
    readonly capacity: number,
  ) {}

  /** The table if cached (the synchronous fast path); refreshes its LRU position. */
  peek(offset: number): Buffer | undefined {
    const e = this.tables.get(offset);
    if (!e) return undefined;
    // Map order is insertion order: re-inserting makes it most recently used.
    this.tables.delete(offset);
    this.tables.set(offset, e);
    return e.buf;
  }

  async get(offset: number): Promise<Buffer> {
    const hit = this.peek(offset);
    if (hit) return hit;
    let p = this.loading.get(offset);
    if (!p) {
      p = this.load(offset);
      this.loading.set(offset, p);
    }
    return p;
  }

  private async load(offset: number): Promise<Buffer> {
    const buf = Buffer.alloc(this.tableSize);
    try {
      await io.read(this.file, offset, buf);
    } finally {
      this.loading.delete(offset);
    }
    this.insert(offset, buf);
    return buf;
  }

  /** Puts a table (new, or just written whole) in the cache, clean. */
  insert(offset: number, buf: Buffer): void {
    const old = this.tables.get(offset);
    if (old && old.lo < old.hi) throw new Error(`L2 table ${offset} replaced while dirty`);
    this.tables.delete(offset);
    this.tables.set(offset, { buf, pins: 0, lo: 0, hi: 0 });
    this.evict();
  }

  /** Marks bytes [start, end) of the cached table at `offset` as changed, to be written back. */
  markDirty(offset: number, start: number, end: number): void {
    const e = this.tables.get(offset);
    if (!e) throw new Error(`L2 table ${offset} marked dirty but not cached`);
    if (e.lo >= e.hi) {
      e.lo = start;
      e.hi = end;
      this.dirty.add(offset);
    } else {
      e.lo = Math.min(e.lo, start);
      e.hi = Math.max(e.hi, end);
    }
  }

  get dirtyCount(): number {
    return this.dirty.size;
  }

  /**
   * Writes every dirty range out, in parallel; a range is clean once its write lands. The
   * caller holds the metadata lock, so no table changes meanwhile.
   */
  async writeBack(): Promise<void> {
    if (!this.dirty.size) return;
    const writes: Promise<void>[] = [];
    for (const off of this.dirty) {
      const e = this.tables.get(off)!;
      const lo = e.lo, hi = e.hi;
      writes.push(this.writeRange(off, e, lo, hi).then(() => {
        if (e.lo === lo && e.hi === hi) {
          e.lo = e.hi = 0;
          this.dirty.delete(off);
        }
      }));
    }
    const results = await Promise.allSettled(writes);
    this.evict();
    for (const r of results) if (r.status === 'rejected') throw r.reason;
  }

  /** The table stays cached until its write lands (a reload would miss the bytes). */
  private async writeRange(offset: number, e: Entry, start: number, end: number): Promise<void> {
    e.pins++;
    try {
      await io.write(this.file, offset + start, Buffer.from(e.buf.subarray(start, end)));
    } finally {
      e.pins--;
      this.evict();
    }
  }

  /** Forgets every table; the caller has written back the dirty ones. */
  clear(): void {
    if (this.dirty.size) throw new Error('L2 cache cleared while tables are dirty');
    this.tables.clear();
  }

  private evict(): void {
    if (this.tables.size <= this.capacity) return;
    for (const [off, e] of this.tables) {
      if (this.tables.size <= this.capacity) break;
      if (e.pins === 0 && e.lo >= e.hi) this.tables.delete(off);
    }
  }
}
