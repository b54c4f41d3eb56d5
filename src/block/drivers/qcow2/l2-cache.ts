/**
 * A bounded cache of L2 tables, keyed by host offset. Loads of one table share one read;
 * the least recently used unpinned table goes when the cache is full. Tables are written
 * through by their users, so eviction never writes.
 */
import * as io from '../../io.js';
import type { BlockChild } from '../../node.js';

interface Entry {
  buf: Buffer;
  pins: number;
}

export class L2Cache {
  private readonly tables = new Map<number, Entry>();
  private readonly loading = new Map<number, Promise<Buffer>>();

  constructor(
    private readonly file: BlockChild,
    private readonly tableSize: number,
    private readonly capacity: number,
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

  /** Puts a table (new or just written) in the cache. */
  insert(offset: number, buf: Buffer): void {
    this.tables.delete(offset);
    this.tables.set(offset, { buf, pins: 0 });
    this.evict();
  }

  /**
   * Writes bytes [start, end) of `table` (the cached table at `offset`) through to the file.
   * The table stays cached until the write lands: evicted and reloaded meanwhile, it would
   * come back from disk without these entries.
   */
  async writeThrough(offset: number, table: Buffer, start: number, end: number): Promise<void> {
    const e = this.tables.get(offset);
    if (e?.buf === table) e.pins++;
    try {
      await io.write(this.file, offset + start, Buffer.from(table.subarray(start, end)));
    } finally {
      if (e?.buf === table) {
        e.pins--;
        this.evict();
      }
    }
  }

  pin(offset: number): void {
    const e = this.tables.get(offset);
    if (e) e.pins++;
  }
  unpin(offset: number): void {
    const e = this.tables.get(offset);
    if (e && e.pins > 0) e.pins--;
  }

  drop(offset: number): void {
    this.tables.delete(offset);
  }

  clear(): void {
    this.tables.clear();
  }

  private evict(): void {
    if (this.tables.size <= this.capacity) return;
    for (const [off, e] of this.tables) {
      if (this.tables.size <= this.capacity) break;
      if (e.pins === 0) this.tables.delete(off);
    }
  }
}
