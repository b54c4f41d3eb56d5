/**
 * The native worker's mapping table for a format node (qcow2): which guest clusters live where
 * in the image file, learned from the driver (`hostExtents`) after forwarded requests complete,
 * and withdrawn the moment the driver says a mapping is about to stop being true
 * (`watchMappings`): the entries go, then a barrier waits until the worker is between
 * requests, so no request still uses the old host offset when the driver goes on to free or
 * reuse that cluster.
 *
 * A lookup that returns after a withdrawal it raced with is dropped (a generation count), so a
 * stale host offset never reaches the table.
 *
 * Context: main loop.
 */
import type { BlockNode } from '../../block/node.js';
import { VhostBlkMap } from '../../native/vhost-blk-map.js';

/** Learning is best effort: beyond this many ranges waiting, new ones are dropped. */
const MAX_PENDING = 256;
/**
 * The table's memory bound: 32 MiB of 8-byte entries, what QEMU's default qcow2 L2 cache may
 * grow to (256 GiB of 64 KiB clusters); $SPINDLE_VHOST_MAP_BYTES overrides it. Past it the
 * oldest 32 KiB chunk of entries goes (its clusters are forwarded and relearned).
 */
const mapBytes = (): number => Number(process.env.SPINDLE_VHOST_MAP_BYTES) || 32 << 20;
/** Evicted chunks are freed in batches, after a worker barrier. */
const RECLAIM_AT = 16;
/**
 * A request teaches the mapping of its whole aligned window, not just its own clusters: the
 * format answers from the table it just read for the request, and a random workload warms up
 * in a few hundred lookups instead of one per cluster.
 */
const WINDOW = 4 << 20;

export class MappingCache {
  readonly map: VhostBlkMap;
  private readonly clusterSize: number;
  private gen = 0;
  private readonly pending: number[] = [];
  private running = false;
  private closed = false;
  private readonly unwatch: () => void;

  constructor(private readonly node: BlockNode, clusterBits: number, private readonly barrier: () => void) {
    const drv = node.driver;
    if (!drv.hostExtents || !drv.watchMappings) throw new Error(`${drv.format}: no host mapping`);
    this.clusterSize = 2 ** clusterBits;
    this.map = new VhostBlkMap(clusterBits, node.length, mapBytes());
    // Watching starts before the first lookup: no change can fall between the two.
    this.unwatch = drv.watchMappings(node, (offset, bytes) => this.unmapped(offset, bytes));
  }

  /** A forwarded request on [offset, +bytes) completed: look its clusters up for the worker. */
  learn(offset: number, bytes: number): void {
    if (this.closed || this.pending.length >= 2 * MAX_PENDING) return;
    const w = Math.max(this.clusterSize, WINDOW);
    const start = Math.floor(offset / w) * w;
    const end = Math.min(Math.ceil((offset + bytes) / w) * w, this.node.length);
    if (end <= start) return;
    this.pending.push(start, end - start);
    if (!this.running) void this.run();
  }

  /**
   * Everything goes (a drained section ended: the graph or the image may have changed). No
   * queue uses the table now, so evicted chunks are freed too.
   */
  clear(): void {
    this.gen++;
    this.pending.length = 0;
    this.map.clear();
    this.map.reclaim();
  }

  close(): void {
    this.closed = true;
    this.unwatch();
    this.clear();
  }

  private unmapped(offset: number, bytes: number): void {
    this.gen++;
    // Only a worker that could have looked one of them up needs waiting for.
    if (this.map.invalidate(offset, bytes) > 0) {
      this.barrier();
      this.map.reclaim();
    }
  }

  private async run(): Promise<void> {
    this.running = true;
    const drv = this.node.driver;
    const cs = this.clusterSize;
    const len = this.node.length;
    try {
      while (this.pending.length > 0 && !this.closed) {
        const offset = this.pending.shift()!;
        const bytes = this.pending.shift()!;
        const gen = this.gen;
        let extents;
        try {
          extents = await drv.hostExtents!(this.node, offset, bytes);
        } catch {
          continue; // a read error: the requests stay forwarded
        }
        if (gen !== this.gen || this.closed) continue;
        for (const e of extents) {
          if (e.host < 0 || e.offset % cs !== 0 || e.host % cs !== 0) continue;
          // The last cluster of a disk whose length is not a cluster multiple is whole in the file.
          const n = e.offset + e.bytes === len ? Math.ceil(e.bytes / cs) * cs : Math.floor(e.bytes / cs) * cs;
          if (n > 0) this.map.set(e.offset, n, e.host, e.writable);
        }
        if (this.map.retired >= RECLAIM_AT) {
          this.barrier();
          this.map.reclaim();
        }
      }
    } finally {
      this.running = false;
    }
  }
}
