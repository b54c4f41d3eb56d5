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
import { VhostBlkWorker } from '../../native/vhost-blk-worker.js';
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
  const readOnly = node.readOnly || !(backend.root && backend.root.perm & 0x2);
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

/** A session's rings on a native worker. */
export class NativeRings {
  private readonly worker = new VhostBlkWorker();
  private readonly attached = new Set<number>();
  private release: (() => void) | null = null;
  private memory: GuestMemoryTable | null = null;

  constructor(private readonly be: VhostUserBlkBackend, private target: FastPathTarget, private readonly o: { serial: string; writeCache: () => boolean }) {}

  /** Whether this target is still the one served (same fd, shape and mode). */
  serves(t: FastPathTarget): boolean {
    return t.fd === this.target.fd && t.length === this.target.length && t.readOnly === this.target.readOnly;
  }

  /** Start (or restart, after its kick fd or enable state changed) ring `ring`; false if it cannot. */
  start(ring: Vring): boolean {
    if (this.attached.has(ring.index)) this.stop(ring);
    if (!this.be.ringReady(ring) || ring.kickFd < 0 || !ring.kick) return false;
    const m = this.be.memory;
    const layout = m.layout;
    if (!layout || !m.ram) return false;
    if (this.memory !== m) {
      if (this.attached.size > 0) return false; // memoryChanged() moves every ring first
      this.release?.();
      this.worker.setMemory(layout, m.regions.map((r) => [r.guestPhysAddr, r.guestPhysAddr + r.size] as [number, number]));
      this.memory = m;
      this.release = m.hold();
    }
    const a = ring.addr!;
    const desc = m.uvaToGpa(a.descUser);
    const avail = m.uvaToGpa(a.availUser);
    const used = m.uvaToGpa(a.usedUser);
    if (desc === null || avail === null || used === null || !m.ram.contains(used, 4)) return false;
    ring.kick.setWatching(false);
    this.worker.addQueue(ring.index, {
      num: ring.num, desc, avail, used,
      lastAvail: ring.lastAvailIdx,
      usedIdx: m.ram.bytes[used + 2]! | (m.ram.bytes[used + 3]! << 8),
      eventIdx: this.be.hasFeature(VIRTIO_RING_F_EVENT_IDX),
      kickFd: ring.kickFd, callFd: ring.callFd, fd: this.target.fd,
      capacitySectors: Math.floor(this.target.length / 512), readOnly: this.target.readOnly,
      serial: this.o.serial, writeCache: this.o.writeCache(),
      discard: this.be.hasFeature(VIRTIO_BLK_F_DISCARD), writeZeroes: this.be.hasFeature(VIRTIO_BLK_F_WRITE_ZEROES),
    });
    this.attached.add(ring.index);
    return true;
  }

  /** Take ring `ring` back: its position goes to the ring, and JavaScript watches its kick again. */
  stop(ring: Vring): void {
    if (!this.attached.delete(ring.index)) return;
    const pos = this.worker.removeQueue(ring.index);
    ring.lastAvailIdx = pos.lastAvail;
    ring.kick?.setWatching(true);
  }

  has(ring: Vring): boolean {
    return this.attached.has(ring.index);
  }

  kick(ring: Vring): void {
    if (this.attached.has(ring.index)) this.worker.kick(ring.index);
  }

  callChanged(ring: Vring): void {
    if (this.attached.has(ring.index)) this.worker.setCallFd(ring.index, ring.callFd);
  }

  writeCacheChanged(on: boolean): void {
    for (const i of this.attached) this.worker.setWriteCache(i, on);
  }

  /** A new memory table: every ring moves to it at its position. */
  memoryChanged(): void {
    const rings = [...this.attached].map((i) => this.be.rings[i]!);
    for (const r of rings) this.stop(r);
    for (const r of this.be.rings) if (this.be.ringReady(r)) this.start(r);
  }

  pause(): void {
    this.worker.pause();
  }

  resume(): void {
    this.worker.resume();
  }

  /** Every ring back (positions to the rings), the thread joined, the memory released. */
  close(): void {
    for (const i of [...this.attached]) this.stop(this.be.rings[i]!);
    this.worker.destroy();
    this.release?.();
    this.release = null;
    this.memory = null;
  }
}
