/**
 * The qcow2 driver's per-node state, shared by its modules.
 */
import type { BlockChild, BlockNode } from '../../node.js';
import type { UnmapListener } from '../../types.js';
import { stateOf } from '../../node.js';
import type { Geometry, Qcow2Header } from './format.js';
import type { L2Cache } from './l2-cache.js';
import type { Refcounts } from './refcount.js';
import type { SnapshotInfo } from './snapshot-table.js';

export interface Qcow2State {
  header: Qcow2Header;
  geo: Geometry;
  /** The `file` edge: where the image's bytes live. */
  file: BlockChild;
  /** The L1 table, big-endian entries as on disk. */
  l1: Buffer;
  l2: L2Cache;
  refcounts: Refcounts;
  /** Opened read-only (asked, or forced by the corrupt bit): never writes the file. */
  readOnly: boolean;
  /** Set once metadata corruption is found: no further metadata writes. */
  corrupt: boolean;
  /** Serialises metadata changes (allocation, discard, resize). */
  lock: Mutex;
  /** Guest clusters being allocated; later writes to them wait. */
  allocating: Map<number, Promise<void>>;
  /** The internal snapshots as last read (open, or a snapshot operation); undefined if unreadable. */
  snapshots?: SnapshotInfo[];
  /** watchMappings listeners, told before a mapping hostExtents reported changes (mapping-watch.ts). */
  mapWatchers: Set<UnmapListener>;
  /** Bumped at every such report: a hostExtents lookup that spans one starts over. */
  mapGen: number;
}

export function qstate(node: BlockNode): Qcow2State {
  return stateOf<Qcow2State>(node);
}

/** A FIFO async mutex. */
export class Mutex {
  private held = false;
  private readonly waiters: (() => void)[] = [];
  async run<T>(fn: () => Promise<T>): Promise<T> {
    if (this.held) await new Promise<void>((r) => this.waiters.push(r));
    else this.held = true;
    try {
      return await fn();
    } finally {
      const next = this.waiters.shift();
      if (next) next();
      else this.held = false;
    }
  }
  get locked(): boolean {
    return this.held;
  }
}
