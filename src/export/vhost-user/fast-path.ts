/**
 * The vhost-user-blk fast path: a session's rings are served by a native worker thread
 * (src/native/vhost-blk-worker.ts) without entering JavaScript, when the exported node is
 * - a plain file (raw, no window, on a page-cached regular file): every request, end to end;
 * - a format whose driver reports host mappings (qcow2 on such a file): reads and writes of
 *   clusters in the worker's mapping table (mapping.ts), with everything else forwarded to
 *   the block layer through shared rings (forwarding.ts) — DESIGN's hybrid.
 * Filters, throttling, O_DIRECT, zero detection and block devices stay on the TypeScript path
 * (dataplane.ts).
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
import type { BackendIO } from '../../backend/io.js';
import type { AioContext } from '../../block/context.js';
import type { VhostBlkWorker } from '../../native/vhost-blk-worker.js';
import { acquireWorker, releaseWorker } from './iothread-workers.js';
import { VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES } from '../../../hw/virtio/virtio-blk-abi.js';
import type { VhostUserBlkBackend } from './backend.js';
import { VIRTIO_RING_F_EVENT_IDX } from './blk-features.js';
import type { GuestMemoryTable } from './memory.js';
import type { Vring } from './vring.js';
import { Forwarder } from './forwarding.js';
import { hostFileTarget, type HostFileTarget } from '../host-file.js';
import { MappingCache } from './mapping.js';
import type { InflightMemory, InflightQueue } from './inflight.js';

export type FastPathTarget = HostFileTarget;

/**
 * The file a backend's node reads and writes directly (hostFileTarget), or null.
 * `SPINDLE_VHOST_FASTPATH=0` turns the fast path off, `=raw` keeps formats off it.
 */
export function fastPathTarget(backend: BlockBackend): HostFileTarget | null {
  if (process.env.SPINDLE_VHOST_FASTPATH === '0') return null;
  return hostFileTarget(backend, process.env.SPINDLE_VHOST_FASTPATH !== 'raw');
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
  /** Mapped mode: the worker's mapping table, and the forwarded requests of this memory table. */
  private cache: MappingCache | null = null;
  private fwd: Forwarder | null = null;
  /** Forwarders of older memory tables, finishing their requests. */
  private readonly retired = new Set<Forwarder>();
  /** Rings that start once nothing forwarded is left on them. */
  private readonly deferred = new Set<number>();
  /** GET_VRING_BASE replies waiting for a ring's forwarded requests. */
  private readonly waiters = new Map<number, (() => void)[]>();
  /** Per ring: the inflight record the worker writes; the buffers are held until close. */
  private readonly logs = new Map<number, InflightQueue>();
  private readonly logHolds = new Map<InflightMemory, () => void>();
  private closed = false;

  constructor(
    private readonly be: VhostUserBlkBackend,
    private target: FastPathTarget,
    private readonly o: {
      serial: string;
      writeCache: () => boolean;
      context: () => AioContext;
      io: BackendIO;
      call: (index: number) => void;
      /** Every forwarded request is done after close(): the rings may go elsewhere. */
      idle?: () => void;
    },
  ) {
    this.ctx = o.context();
    this.worker = acquireWorker(this.ctx);
    if (target.mapped) this.cache = this.mappingCache(target.mapped);
  }

  /** Whether this target is still the one served (same fd, mode and format node; and length unless resized). */
  serves(t: FastPathTarget, resized = false): boolean {
    const a = this.target;
    return t.fd === a.fd && (resized || t.length === a.length) && t.readOnly === a.readOnly && t.mapped?.node === a.mapped?.node;
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
    const i = ring.index;
    if (this.cache && (!this.fwd || this.fwd.memory !== m)) {
      if (this.fwd) this.retire(this.fwd);
      this.fwd = this.forwarder(m);
    }
    if (this.forwarding(i)) {
      // Its used ring is still being written from here: the worker takes it once that is done.
      this.deferred.add(i);
      return true;
    }
    this.deferred.delete(i);
    const a = ring.addr!;
    const desc = m.uvaToGpa(a.descUser);
    const avail = m.uvaToGpa(a.availUser);
    const used = m.uvaToGpa(a.usedUser);
    if (desc === null || avail === null || used === null || !m.ram.contains(used, 4)) return false;
    const usedIdx = m.ram.dv.getUint16(used + 2, true);
    const log = this.be.inflightFor(ring);
    let lastAvail = ring.lastAvailIdx;
    let inflight: { region: Uint8Array; counter: number; resubmit: number[] } | undefined;
    if (log) {
      const r = log.recover(ring.num, lastAvail, usedIdx);
      for (const p of r.problems) this.be.errors.push(`ring ${i}: inflight record: ${p}`);
      lastAvail = r.lastAvail;
      inflight = { region: log.bytes, counter: log.nextCounter, resubmit: r.resubmit };
      if (log.memory && !this.logHolds.has(log.memory)) this.logHolds.set(log.memory, log.memory.hold());
    }
    const slot = this.worker.allocIndex();
    ring.kick.setWatching(false);
    try {
      this.worker.addQueue(slot, {
        memory: layout, spans: m.regions.map((r) => [r.guestPhysAddr, r.guestPhysAddr + r.size] as [number, number]),
        num: ring.num, desc, avail, used,
        lastAvail, usedIdx, inflight,
        eventIdx: this.be.hasFeature(VIRTIO_RING_F_EVENT_IDX),
        kickFd: ring.kickFd, callFd: ring.callFd, errFd: ring.errFd, fd: this.target.fd,
        capacitySectors: Math.floor(this.target.length / 512), blockSize: this.be.blockSize, readOnly: this.target.readOnly,
        serial: this.o.serial, writeCache: this.o.writeCache(),
        discard: this.be.hasFeature(VIRTIO_BLK_F_DISCARD), writeZeroes: this.be.hasFeature(VIRTIO_BLK_F_WRITE_ZEROES),
        unmap: this.target.unmap,
        ...(this.cache && this.fwd ? { map: this.cache.map, forward: this.fwd.queue(i).attach(ring.num, desc, avail, used) } : {}),
      });
    } catch (e) {
      ring.kick.setWatching(true);
      this.worker.freeIndex(slot);
      throw e;
    }
    this.slots.set(i, slot);
    if (log) this.logs.set(i, log);
    else this.logs.delete(i);
    this.dropUnusedLogs();
    return true;
  }

  /** Let go of inflight buffers no attached ring writes (a device reset brought a new one). */
  private dropUnusedLogs(): void {
    if (this.anyForwarding) return; // a detached forward queue may still complete into an old one
    const used = new Set([...this.slots.keys()].map((i) => this.logs.get(i)?.memory));
    for (const [mem, release] of this.logHolds) {
      if (used.has(mem)) continue;
      release();
      this.logHolds.delete(mem);
    }
  }

  /**
   * Take ring `ring` back: its position goes to the ring, and JavaScript watches its kick again.
   * Requests the worker forwarded and that are not done yet complete into the used ring from
   * here; the promise (if any) resolves once they have (GET_VRING_BASE waits for it).
   */
  stop(ring: Vring): Promise<void> | void {
    const i = ring.index;
    if (this.suspended) this.suspended = this.suspended.filter((r) => r !== ring);
    this.deferred.delete(i);
    const slot = this.slots.get(i);
    if (slot !== undefined) {
      this.slots.delete(i);
      const pos = this.worker.removeQueue(slot);
      this.worker.freeIndex(slot);
      ring.lastAvailIdx = pos.lastAvail;
      ring.kick?.setWatching(true);
      this.fwd?.queue(i).detach(pos.lastAvail, pos.usedIdx, this.logs.get(i) ?? null);
    }
    if (!this.forwarding(i)) return;
    return new Promise<void>((resolve) => {
      const w = this.waiters.get(i);
      if (w) w.push(resolve);
      else this.waiters.set(i, [resolve]);
    });
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

  /** The disk changed size: the rings check requests against the new capacity from now on. */
  retarget(t: FastPathTarget): void {
    this.target = t;
    this.fwd?.dev.updateCapacity();
    const c = this.cache;
    if (c && t.mapped && t.length > c.map.lengthBytes) {
      // The table cannot cover the new clusters: the rings move to a bigger one.
      const rings = [...this.slots.keys()].map((i) => this.be.rings[i]!);
      for (const r of rings) void this.stop(r);
      c.close();
      this.cache = this.mappingCache(t.mapped);
      for (const r of rings) if (this.be.ringReady(r)) this.start(r);
      return;
    }
    for (const slot of this.slots.values()) this.worker.setCapacity(slot, Math.floor(t.length / 512));
  }

  /** A new memory table: every ring moves to it at its position. */
  memoryChanged(): void {
    for (const i of [...this.slots.keys()]) void this.stop(this.be.rings[i]!);
    for (const r of this.be.rings) if (this.be.ringReady(r)) this.start(r);
  }

  /** A drained section: the rings come back (the worker ends its batch), nothing is served. */
  suspend(): void {
    if (this.suspended) return;
    const rings = [...this.slots.keys(), ...this.deferred].map((i) => this.be.rings[i]!);
    for (const r of rings) void this.stop(r);
    this.suspended = rings;
    this.fwd?.drainedBegin();
  }

  /** The section ended: the rings start again, on the thread of the node's context now, for `t` (as served). */
  resume(t: FastPathTarget): void {
    const rings = this.suspended;
    if (!rings) return;
    this.suspended = null;
    this.target = t; // a reopen may have changed its discard mode
    const ctx = this.o.context();
    if (ctx !== this.ctx) {
      const old = this.ctx;
      this.worker = acquireWorker(ctx);
      this.ctx = ctx;
      releaseWorker(old);
    }
    // What was mapped may not be any more (snapshots, reopen, a new image under the node).
    this.cache?.clear();
    this.fwd?.drainedEnd();
    for (const r of rings) if (this.be.ringReady(r)) this.start(r);
  }

  /** A drained section ended and the session leaves the worker: forwarded requests go on. */
  undrain(): void {
    this.fwd?.drainedEnd();
  }

  /** Guest clusters in the worker's mapping table. */
  get mappedClusters(): number {
    return this.cache?.map.size ?? 0;
  }

  /** The native thread serving the rings. */
  get threadId(): number {
    return this.worker.threadId;
  }

  /** Whether requests forwarded from ring `i` are still being served here. */
  forwarding(i: number): boolean {
    if (this.fwd?.busy(i)) return true;
    for (const f of this.retired) if (f.busy(i)) return true;
    return false;
  }

  /** Whether any forwarded request is still being served here. */
  get anyForwarding(): boolean {
    return [this.fwd, ...this.retired].some((f) => f?.anyBusy);
  }

  /**
   * Every ring back (positions to the rings), the worker released. Forwarded requests finish
   * into the used rings (o.idle follows once they have); the memory goes after them.
   */
  close(): void {
    this.closed = true;
    this.suspended = null;
    this.deferred.clear();
    for (const i of [...this.slots.keys()]) void this.stop(this.be.rings[i]!);
    releaseWorker(this.ctx);
    this.cache?.close();
    if (this.fwd) this.retire(this.fwd);
    this.fwd = null;
    this.release?.();
    this.release = null;
    this.memory = null;
    if (!this.anyForwarding) this.finished();
  }

  /** Closed, and nothing forwarded is left: the inflight records are no longer written from here. */
  private finished(): void {
    for (const r of this.logHolds.values()) r();
    this.logHolds.clear();
    this.o.idle?.();
  }

  /** The worker's table for `mapped`; withdrawals wait for whichever worker serves the rings then. */
  private mappingCache(mapped: NonNullable<FastPathTarget['mapped']>): MappingCache {
    return new MappingCache(mapped.node, mapped.clusterBits, () => this.worker.barrier());
  }

  private forwarder(m: GuestMemoryTable): Forwarder {
    return new Forwarder(m, this.o.io, {
      numQueues: this.be.numQueues,
      serial: this.o.serial,
      blockSize: this.be.blockSize,
      features: this.be.ackedFeatures,
      call: this.o.call,
      idle: (f, i) => this.idle(f, i),
      done: (offset, bytes) => this.cache?.learn(offset, bytes),
    });
  }

  /** A forwarder of an older memory table: it serves what it has, then closes. */
  private retire(f: Forwarder): void {
    if (f.anyBusy) this.retired.add(f);
    else f.close();
  }

  /** Nothing forwarded is left on ring `i` of `f`. */
  private idle(f: Forwarder, i: number): void {
    if (this.retired.has(f) && !f.anyBusy) {
      this.retired.delete(f);
      f.close();
    }
    if (this.forwarding(i)) return;
    const w = this.waiters.get(i);
    if (w) {
      this.waiters.delete(i);
      for (const f of w) f();
    }
    if (this.closed) {
      if (!this.anyForwarding) this.finished();
      return;
    }
    if (this.deferred.has(i)) {
      const ring = this.be.rings[i]!;
      this.deferred.delete(i);
      if (this.be.ringReady(ring)) this.start(ring);
    }
  }
}
