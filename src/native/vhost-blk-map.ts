/**
 * The cluster table of a mapped vhost-blk queue (native/src/vhostblk/map.h): which guest
 * clusters the native worker may serve itself, and where they live in the image file. The
 * format driver fills it (set) for clusters whose mapping is known and stable, and takes
 * entries back (invalidate, then the worker's barrier()) before it changes them — a COW,
 * a discard, a snapshot. The worker reads it without locks; a cluster not in it is forwarded.
 */
import { native, type NativeVhostBlkMap } from './addon.js';

function checkInt(what: string, v: number): void {
  if (!Number.isSafeInteger(v) || v < 0) throw new RangeError(`VhostBlkMap: ${what} must be an integer >= 0, got ${v}`);
}

export class VhostBlkMap {
  /** The native table (what addQueue's `map` takes). */
  readonly handle: NativeVhostBlkMap;
  readonly clusterSize: number;

  /**
   * A table of ceil(lengthBytes / 2^clusterBits) clusters, all unmapped. clusterBits: 9..21.
   * `maxBytes` bounds the entries' memory (8 bytes a cluster, in chunks of 4096): beyond it the
   * oldest chunk is evicted (retired until reclaim()); absent or 0: no bound.
   */
  constructor(readonly clusterBits: number, readonly lengthBytes: number, maxBytes = 0) {
    if (!Number.isInteger(clusterBits) || clusterBits < 9 || clusterBits > 21) {
      throw new RangeError(`VhostBlkMap: clusterBits must be an integer in [9, 21], got ${clusterBits}`);
    }
    checkInt('lengthBytes', lengthBytes);
    checkInt('maxBytes', maxBytes);
    this.clusterSize = 2 ** clusterBits;
    this.handle = new native.VhostBlkMap(clusterBits, lengthBytes, maxBytes);
  }

  private aligned(what: string, v: number): void {
    checkInt(what, v);
    if (v % this.clusterSize !== 0) {
      throw new RangeError(`VhostBlkMap: ${what} ${v} is not a multiple of the cluster size ${this.clusterSize}`);
    }
  }

  /**
   * Guest [guestOffset, +bytes) is at host [hostOffset, +bytes) of the image file; `writable`:
   * the worker may write it in place. All three cluster aligned. Clusters beyond the table are
   * ignored.
   */
  set(guestOffset: number, bytes: number, hostOffset: number, writable: boolean): void {
    this.aligned('guestOffset', guestOffset);
    this.aligned('bytes', bytes);
    this.aligned('hostOffset', hostOffset);
    this.handle.set(guestOffset, bytes, hostOffset, writable);
  }

  /**
   * Unmaps every cluster overlapping [guestOffset, +bytes). A request that looked the old entry
   * up may still be doing its I/O: call the worker's barrier() before changing those clusters.
   * Returns how many were mapped (none: no barrier needed).
   */
  invalidate(guestOffset: number, bytes: number): number {
    checkInt('guestOffset', guestOffset);
    checkInt('bytes', bytes);
    return this.handle.invalidate(guestOffset, bytes) ?? 0;
  }

  /** Unmaps everything (then barrier(), as for invalidate). */
  clear(): void {
    this.handle.clear();
  }

  /** Mapped clusters. */
  get size(): number {
    return this.handle.size;
  }

  /** Evicted chunks a worker may still be reading: free them with reclaim() after its barrier(). */
  get retired(): number {
    return this.handle.retired;
  }

  /** Frees the retired chunks. Only after barrier() (or with no queue using the table). */
  reclaim(): void {
    this.handle.reclaim();
  }
}
