/**
 * The vhost-user-blk fast path: when the exported node is a plain file (raw, no window, on a
 * page-cached regular file), a session's rings are served end to end by a native worker thread
 * (src/native/vhost-blk-worker.ts), without entering JavaScript. Everything else — qcow2,
 * filters, throttling, O_DIRECT, block devices — stays on the TypeScript path (dataplane.ts).
 *
 * The worker takes the ring's kick fd (the control plane's watcher is paused, not closed) and
 * signals the call fd itself. Stopping a ring (GET_VRING_BASE), a new memory table, a drained
 * section and the end of the session take the rings back synchronously: the worker finishes
 * the batch in progress and hands over the position. The guest memory mapping is held while
 * the worker has queues.
 *
 * Context: main loop.
 */
import type { BlockBackend } from '../../backend/backend.js';
import { stateOf } from '../../block/node.js';
import { Perm } from '../../block/types.js';
import type { AioContext } from '../../block/context.js';
import type { VhostBlkWorker } from '../../native/vhost-blk-worker.js';
import { acquireWorker, releaseWorker } from './iothread-workers.js';
import { VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES } from '../../../hw/virtio/virtio-blk-abi.js';
import type { VhostUserBlkBackend } from './backend.js';
import { VIRTIO_RING_F_EVENT_IDX } from './blk-features.js';
import type { GuestMemoryTable } from './memory.js';
import type { Vring } from './vring.js';

/** What the worker serves: a file descriptor and the disk's shape. */
export interface FastPathTarget {
  fd: number;
  length: number;
  readOnly: boolean;
}

/**
 * The file a backend's node reads and writes directly, or null when a request needs the block
 * layer (formats, windows, filters, throttling, O_DIRECT alignment, zero detection).
 * `SPINDLE_VHOST_FASTPATH=0` turns the fast path off.
 */
export function fastPathTarget(backend: BlockBackend): FastPathTarget | null {
  if (process.env.SPINDLE_VHOST_FASTPATH === '0') return null;
  if (backend.throttle) return null;
  let node = backend.node;
  if (!node) return null;
  const readOnly = node.readOnly || !(backend.root && backend.root.perm & Perm.WRITE);
  if (node.driver.format === 'raw') {
    const s = stateOf<{ offset: number; size: number }>(node);
    if (s.offset !== 0 || s.size >= 0 || node.detectZeroes !== 'off') return null;
    node = node.file?.node ?? null;
  }
  if (!node || node.driver.format !== 'file' || node.detectZeroes !== 'off') return null;
  const f = stateOf<{ fd: number; direct: boolean; blockDev: boolean; noFlush: boolean }>(node);
  if (f.direct || f.blockDev || f.noFlush || !(f.fd >= 0)) return null;
  return { fd: f.fd, length: backend.node!.length, readOnly };
}

/** A session's rings on the native worker of its node's AioContext (iothread-workers.ts). */
export class NativeRings {
  private ctx: AioContext;
  private worker: VhostBlkWorker;
  /** Ring index -> the worker's queue index. */
  private readonly slots = new Map<number, number>();
  /** Rings taken back for a drained section, restarted at its end. */
  private suspended: Vring[] | null = null;
  private release: (() => void) | null = null;
  private memory: GuestMemoryTable | null = null;

  constructor(
    private readonly be: VhostUserBlkBackend,
    private target: FastPathTarget,
    private readonly o: { serial: string; writeCache: () => boolean; context: () => AioContext },
  ) {
    this.ctx = o.context();
    this.worker = acquireWorker(this.ctx);
  }

  /** Whether this target is still the one served (same fd, shape and mode). */
  serves(t: FastPathTarget): boolean {
    return t.fd === this.target.fd && t.length === this.target.length && t.readOnly === this.target.readOnly;
  }

  /** Start (or restart, after its kick fd or enable state changed) ring `ring`; false if it cannot. */
  start(ring: Vring): boolean {
    if (this.slots.has(ring.index)) this.stop(ring);
    if (this.suspended) {
      // Drained: it starts with the others when the section ends.
      if (!this.suspended.includes(ring)) this.suspended.push(ring);
      return true;
    }
    if (!this.be.ringReady(ring) || ring.kickFd < 0 || !ring.kick) return false;
    const m = this.be.memory;
    const layout = m.layout;
    if (!layout || !m.ram) return false;
    if (this.memory !== m) {
      if (this.slots.size > 0) return false; // memoryChanged() moves every ring first
      this.release?.();
      this.memory = m;
      this.release = m.hold();
    }
    const a = ring.addr!;
    const desc = m.uvaToGpa(a.descUser);
    const avail = m.uvaToGpa(a.availUser);
    const used = m.uvaToGpa(a.usedUser);
    if (desc === null || avail === null || used === null || !m.ram.contains(used, 4)) return false;
    const slot = this.worker.allocIndex();
    ring.kick.setWatching(false);
    try {
      this.worker.addQueue(slot, {
        memory: layout, spans: m.regions.map((r) => [r.guestPhysAddr, r.guestPhysAddr + r.size] as [number, number]),
        num: ring.num, desc, avail, used,
        lastAvail: ring.lastAvailIdx,
        usedIdx: m.ram.bytes[used + 2]! | (m.ram.bytes[used + 3]! << 8),
        eventIdx: this.be.hasFeature(VIRTIO_RING_F_EVENT_IDX),
        kickFd: ring.kickFd, callFd: ring.callFd, fd: this.target.fd,
        capacitySectors: Math.floor(this.target.length / 512), readOnly: this.target.readOnly,
        serial: this.o.serial, writeCache: this.o.writeCache(),
        discard: this.be.hasFeature(VIRTIO_BLK_F_DISCARD), writeZeroes: this.be.hasFeature(VIRTIO_BLK_F_WRITE_ZEROES),
      });
    } catch (e) {
      ring.kick.setWatching(true);
      this.worker.freeIndex(slot);
      throw e;
    }
    this.slots.set(ring.index, slot);
    return true;
  }

  /** Take ring `ring` back: its position goes to the ring, and JavaScript watches its kick again. */
  stop(ring: Vring): void {
    if (this.suspended) this.suspended = this.suspended.filter((r) => r !== ring);
    const slot = this.slots.get(ring.index);
    if (slot === undefined) return;
    this.slots.delete(ring.index);
    const pos = this.worker.removeQueue(slot);
    this.worker.freeIndex(slot);
    ring.lastAvailIdx = pos.lastAvail;
    ring.kick?.setWatching(true);
  }

  kick(ring: Vring): void {
    const slot = this.slots.get(ring.index);
    if (slot !== undefined) this.worker.kick(slot);
  }

  callChanged(ring: Vring): void {
    const slot = this.slots.get(ring.index);
    if (slot !== undefined) this.worker.setCallFd(slot, ring.callFd);
  }

  writeCacheChanged(on: boolean): void {
    for (const slot of this.slots.values()) this.worker.setWriteCache(slot, on);
  }

  /** The disk changed shape (a resize): the rings restart, at their positions, with the new one. */
  retarget(t: FastPathTarget): void {
    const rings = [...this.slots.keys()].map((i) => this.be.rings[i]!);
    for (const r of rings) this.stop(r);
    this.target = t;
    for (const r of rings) if (this.be.ringReady(r)) this.start(r);
  }

  /** A new memory table: every ring moves to it at its position. */
  memoryChanged(): void {
    for (const i of [...this.slots.keys()]) this.stop(this.be.rings[i]!);
    for (const r of this.be.rings) if (this.be.ringReady(r)) this.start(r);
  }

  /** A drained section: the rings come back (the worker ends its batch), nothing is served. */
  suspend(): void {
    if (this.suspended) return;
    const rings = [...this.slots.keys()].map((i) => this.be.rings[i]!);
    for (const r of rings) this.stop(r);
    this.suspended = rings;
  }

  /** The section ended: the rings start again, on the thread of the node's context now. */
  resume(): void {
    const rings = this.suspended;
    if (!rings) return;
    this.suspended = null;
    const ctx = this.o.context();
    if (ctx !== this.ctx) {
      const old = this.ctx;
      this.worker = acquireWorker(ctx);
      this.ctx = ctx;
      releaseWorker(old);
    }
    for (const r of rings) if (this.be.ringReady(r)) this.start(r);
  }

  /** The native thread serving the rings. */
  get threadId(): number {
    return this.worker.threadId;
  }

  /** Every ring back (positions to the rings), the worker released, the memory released. */
  close(): void {
    this.suspended = null;
    for (const i of [...this.slots.keys()]) this.stop(this.be.rings[i]!);
    releaseWorker(this.ctx);
    this.release?.();
    this.release = null;
    this.memory = null;
  }
}
