/**
 * The vhost-user-blk data plane of one session: the virtio-blk request code (hw/block's
 * VirtioBlk, the same one Spindle's own virtio-blk-pci runs) over the front-end's guest memory,
 * with the rings the control plane set up.
 *
 *   kick eventfd ──► ringKicked ──► VirtioBlk.kick ──pop──► BackendIO ──► finish ──► used ring
 *                                                                           └──► call eventfd (batched)
 *
 * The guest memory table is mapped as one layout indexed by guest-physical address (memory.ts),
 * so the virtqueue code's bounds checks are the only way in. A ring stops (GET_VRING_BASE) only
 * once its requests in flight have completed into the used ring, so the base reported and the
 * used index agree when the front-end hands the ring to someone else (a restarted guest driver,
 * a new back-end). A new memory table retires the device: its requests finish on the old
 * mapping (held until then), and the rings restart on the new one afterwards.
 *
 * Context: main loop.
 */
import type { BackendIO } from '../../backend/io.js';
import { VirtioBlk } from '../../../hw/block/virtio-blk.js';
import type { VirtQueue } from '../../../hw/virtio/virtqueue.js';
import { VIRTIO_BLK_F_FLUSH } from '../../../hw/virtio/virtio-blk-abi.js';
import { eventfdWrite } from '../../native/unix-fd.js';
import type { VhostUserBlkBackend, VhostUserBlkHooks } from './backend.js';
import { MAX_QUEUE_SIZE } from './blk-features.js';
import { NativeRings, type FastPathTarget } from './fast-path.js';
import type { AioContext } from '../../block/context.js';
import type { GuestMemoryTable } from './memory.js';
import type { InflightMemory, InflightQueue } from './inflight.js';
import type { Vring } from './vring.js';

export interface DataPlaneOptions {
  /** Returned by VIRTIO_BLK_T_GET_ID (up to 20 bytes). */
  serial: string;
  /** Whether the export's backend is drained right now (new devices start drained). */
  drained: () => boolean;
  /** The file a native worker may serve the rings from (fast-path.ts), or null. */
  fastPath: () => FastPathTarget | null;
  /** The AioContext of the exported node: its native thread serves the fast path. */
  context: () => AioContext;
}

/** A VirtioBlk on one memory table, and the hold that keeps that table mapped. */
interface Active {
  dev: VirtioBlk;
  memory: GuestMemoryTable;
  release: () => void;
  /** Per queue: set up on this device (addresses translated, positions taken). */
  configured: boolean[];
  /** Per queue: popping allowed (started, enabled and not stopping). */
  running: boolean[];
  /** Inflight buffers its queues write, held until the device goes. */
  logs: Map<InflightMemory, () => void>;
}

export class VhostUserBlkDataPlane {
  private active: Active | null = null;
  /** Devices of replaced memory tables whose requests are still in flight. */
  private readonly retiring = new Set<Active>();
  /** GET_VRING_BASE replies waiting for a queue to go idle, by queue index. */
  private readonly stopWaiters = new Map<number, () => void>();
  /** The rings on a native worker (the fast path), while the session uses it. */
  private native: NativeRings | null = null;
  /** The session runs on the TypeScript path from now on (it started there, or fell back). */
  private jsOnly = false;
  /** Rings the native path left, still completing forwarded requests: TypeScript waits for them. */
  private handingOver: NativeRings | null = null;

  constructor(private readonly be: VhostUserBlkBackend, private readonly io: BackendIO, private readonly o: DataPlaneOptions) {}

  /** Hooks for the session's control plane. */
  static hooks(plane: (be: VhostUserBlkBackend) => VhostUserBlkDataPlane | null): VhostUserBlkHooks {
    return {
      ringChanged: (be, ring) => plane(be)?.ringChanged(ring),
      ringKicked: (be, ring) => plane(be)?.kicked(ring),
      ringStopping: (be, ring) => plane(be)?.stopping(ring),
      memoryChanged: (be) => plane(be)?.memoryChanged(),
      callChanged: (be, ring) => plane(be)?.native?.callChanged(ring),
      writeCacheChanged: (be, on) => plane(be)?.writeCacheChanged(on),
    };
  }

  /** Requests in flight over every device of the session. */
  get inFlight(): number {
    let n = 0;
    for (const a of [this.active, ...this.retiring]) if (a) for (const q of a.dev.queues) n += q.inFlight;
    return n;
  }

  /** Whether the rings are served natively (for tests and diagnostics). */
  get onFastPath(): boolean {
    return this.native !== null;
  }

  /** Guest clusters in the native worker's mapping table (a format on the fast path). */
  get nativeMappedClusters(): number {
    return this.native?.mappedClusters ?? 0;
  }

  /** The kernel thread serving the rings natively, or null. */
  get nativeThreadId(): number | null {
    return this.native ? this.native.threadId : null;
  }

  /** The export's backend was drained / undrained. */
  drainedBegin(): void {
    this.active?.dev.drainedBegin();
    this.native?.suspend();
  }
  drainedEnd(): void {
    this.active?.dev.drainedEnd();
    const n = this.native;
    if (!n) return;
    // The graph may have changed under the export (a format or filter on top, a throttle):
    // then the block layer must see every request. Else the rings start again, on the thread
    // of the node's context (an iothread move happens in a drained section).
    const t = this.o.fastPath();
    if (!t || !n.serves(t)) {
      n.undrain();
      this.toTypeScript();
    } else n.resume(t);
  }

  /** The export's length changed: requests are checked against the new capacity from now on. */
  resized(): void {
    this.active?.dev.updateCapacity();
    const n = this.native;
    if (!n) return;
    const t = this.o.fastPath();
    if (t && n.serves(t, true)) n.retarget(t);
    else this.toTypeScript();
  }

  private writeCacheChanged(on: boolean): void {
    this.io.setWriteCache(on);
    this.native?.writeCacheChanged(this.effectiveWriteCache());
  }

  /** Without FLUSH the driver cannot make writes stable: write through (as VirtioBlk does). */
  private effectiveWriteCache(): boolean {
    return this.be.hasFeature(VIRTIO_BLK_F_FLUSH) && this.io.isWriteCacheEnabled();
  }

  /** Moves the session's rings from the native worker to the TypeScript path, at their positions. */
  private toTypeScript(): void {
    const n = this.native;
    if (!n) return;
    this.native = null;
    this.jsOnly = true;
    this.handingOver = n;
    n.close(); // calls nativeIdle once no forwarded request is left
  }

  /** The native rings are closed and nothing they forwarded is in flight: TypeScript may start. */
  private nativeIdle(n: NativeRings): void {
    if (this.handingOver !== n) return;
    this.handingOver = null;
    for (const [i, w] of [...this.stopWaiters]) if (!this.busy(i)) w();
    this.restartWhenIdle();
  }

  /** The session ended: nothing new is popped; what is in flight finishes, then memory goes. */
  close(): void {
    this.native?.close();
    this.native = null;
    if (this.active) this.retire(this.active);
    this.active = null;
    for (const w of this.stopWaiters.values()) w();
    this.stopWaiters.clear();
  }

  private ringChanged(ring: Vring): void {
    if (this.native) {
      if (this.native.start(ring) || !this.be.ringReady(ring)) return;
      this.toTypeScript(); // e.g. a polled ring (no kick fd): the worker needs one
      return;
    }
    if (!this.jsOnly && !this.active && this.retiring.size === 0 && !this.o.drained()) {
      const t = this.o.fastPath();
      if (t) {
        const n: NativeRings = new NativeRings(this.be, t, {
          serial: this.o.serial, writeCache: () => this.effectiveWriteCache(), context: this.o.context,
          io: this.io, call: (i) => this.call(i), idle: () => this.nativeIdle(n),
        });
        this.native = n;
        if (n.start(ring) || !this.be.ringReady(ring)) return;
        this.native = null;
        n.close();
      }
    }
    this.jsOnly = true;
    const a = this.device();
    if (!a) return;
    const i = ring.index;
    if (!this.be.ringReady(ring)) {
      // Disabled (SET_VRING_ENABLE 0): stop popping; requests in flight still complete.
      a.running[i] = false;
      return;
    }
    if (!a.configured[i] && !this.configure(a, ring)) return;
    a.running[i] = true;
    // The front-end may have made requests available before it passed the kick fd.
    a.dev.kick(i);
  }

  private kicked(ring: Vring): void {
    if (this.native) return this.native.kick(ring); // a wake-up that raced the hand-over
    const a = this.active;
    if (a && a.running[ring.index]) a.dev.kick(ring.index);
  }

  private stopping(ring: Vring): Promise<void> | void {
    // The worker ends its batch first; what it forwarded completes before the reply.
    if (this.native) return this.native.stop(ring);
    const a = this.active;
    const i = ring.index;
    if (a) a.running[i] = false;
    const finish = (): void => {
      const cur = this.active;
      if (cur && cur.configured[i]) this.unconfigure(cur, cur.dev.queues[i]!, ring);
    };
    // Requests of this ring may still be in flight on the device or on one a new memory table
    // retired: the reply waits for all of them.
    if (!this.busy(i)) return finish();
    return new Promise<void>((resolve) => {
      this.stopWaiters.set(i, () => {
        this.stopWaiters.delete(i);
        finish();
        resolve();
      });
    });
  }

  /** Whether queue `i` has requests in flight on any device of the session. */
  private busy(i: number): boolean {
    if (this.handingOver?.forwarding(i)) return true;
    if (this.active && this.active.dev.queues[i]!.inFlight > 0) return true;
    for (const r of this.retiring) if (r.dev.queues[i]!.inFlight > 0) return true;
    return false;
  }

  /** Publish what completed, report the position, and forget the ring's addresses. */
  private unconfigure(a: Active, q: VirtQueue, ring: Vring): void {
    this.publish(q);
    ring.lastAvailIdx = q.lastAvailIdx;
    a.configured[q.index] = false;
    q.enabled = false;
    q.ringsChanged();
  }

  private memoryChanged(): void {
    if (this.native) return this.native.memoryChanged();
    const a = this.active;
    if (!a) return;
    // Rings keep their positions: hand them back to the rings before the device goes.
    for (let i = 0; i < a.configured.length; i++) {
      if (a.configured[i]) this.be.rings[i]!.lastAvailIdx = a.dev.queues[i]!.lastAvailIdx;
    }
    this.retire(a);
    this.active = null;
    this.restartWhenIdle();
  }

  /** The device for the current memory table, made on first use; null while an old one drains. */
  private device(): Active | null {
    if (this.active) return this.active;
    const memory = this.be.memory;
    if (!memory.ram || this.retiring.size > 0 || this.handingOver) return null;
    const n = this.be.numQueues;
    const dev = new VirtioBlk(memory.ram, this.io, { numQueues: n, queueSize: MAX_QUEUE_SIZE, serial: this.o.serial, blockSize: this.be.blockSize });
    const holdMemory = memory.hold();
    const logs = new Map<InflightMemory, () => void>();
    const release = (): void => {
      holdMemory();
      for (const r of logs.values()) r();
      logs.clear();
    };
    const a: Active = { dev, memory, release, configured: new Array<boolean>(n).fill(false), running: new Array<boolean>(n).fill(false), logs };
    dev.transport = {
      notifyQueue: (vq) => this.call(vq.index),
      // Capacity changes reach the front-end on the back-end channel (backend.setCapacity).
      notifyConfig: () => {},
      isrCleared: () => {},
      queueBroken: (vq) => this.signal(vq.index, 'errFd', `ring ${vq.index} broke: ${dev.brokenReason}`),
    };
    dev.onFinish = (vq) => this.finished(a, vq);
    dev.pollOnCompletion = (vq) => {
      if (a.running[vq.index]) dev.kick(vq.index);
    };
    dev.activate(this.be.ackedFeatures);
    if (this.o.drained()) dev.drainedBegin();
    this.active = a;
    return a;
  }

  /** Point queue `ring.index` of the device at the ring's memory, at the ring's position. */
  private configure(a: Active, ring: Vring): boolean {
    const addr = ring.addr!;
    const m = this.be.memory;
    const desc = m.uvaToGpa(addr.descUser);
    const avail = m.uvaToGpa(addr.availUser);
    const used = m.uvaToGpa(addr.usedUser);
    const q = a.dev.queues[ring.index]!;
    if (desc === null || avail === null || used === null || ring.num > q.maxNum) return false;
    q.num = ring.num;
    q.desc = desc;
    q.avail = avail;
    q.used = used;
    q.enabled = true;
    q.ringsChanged();
    // Pop from the base the front-end set (after what the inflight record says a previous
    // back-end took), resubmitting what that one left in flight; push after what the used
    // ring already holds.
    const usedIdx = q.usedIdxInRam();
    const log = this.be.inflightFor(ring);
    q.log = log;
    if (log) {
      const r = log.recover(ring.num, ring.lastAvailIdx, usedIdx);
      for (const p of r.problems) this.be.errors.push(`ring ${ring.index}: inflight record: ${p}`);
      if (log.memory && !a.logs.has(log.memory)) a.logs.set(log.memory, log.memory.hold());
      q.resume(r.lastAvail, usedIdx, r.resubmit);
    } else q.resume(ring.lastAvailIdx, usedIdx);
    a.configured[ring.index] = true;
    // A buffer no running queue writes any more (the front-end got a new one at a device reset) goes now.
    for (const [mem, release] of a.logs) {
      if (a.dev.queues.some((vq, i) => a.configured[i] && (vq.log as InflightQueue | null)?.memory === mem)) continue;
      release();
      a.logs.delete(mem);
    }
    return true;
  }

  private finished(a: Active, vq: VirtQueue): void {
    if (vq.inFlight !== 0) return;
    if (this.retiring.has(a)) {
      this.publish(vq);
      if (!a.dev.queues.some((q) => q.inFlight > 0)) {
        this.retiring.delete(a);
        a.release();
        this.restartWhenIdle();
      }
    }
    if (!this.busy(vq.index)) this.stopWaiters.get(vq.index)?.();
  }

  private retire(a: Active): void {
    a.running.fill(false);
    a.dev.drainedBegin();
    if (a.dev.queues.some((q) => q.inFlight > 0)) {
      this.retiring.add(a);
    } else {
      for (const q of a.dev.queues) this.publish(q);
      a.release();
    }
  }

  /** After a memory change: once no old request is in flight, restart the ready rings. */
  private restartWhenIdle(): void {
    if (this.retiring.size > 0 || this.handingOver || this.be.closed) return;
    // (A ring whose GET_VRING_BASE waits is stopping, not restarting.)
    for (const ring of this.be.rings) if (this.be.ringReady(ring) && !this.stopWaiters.has(ring.index)) this.ringChanged(ring);
  }

  /** Store the used index now (not at the next batch) and interrupt if the driver wants one. */
  private publish(q: VirtQueue): void {
    if (q.flush()) this.call(q.index);
  }

  private call(index: number): void {
    this.signal(index, 'callFd');
  }

  /** Writes ring `index`'s call or err eventfd (`why` goes to the session's errors first). */
  private signal(index: number, key: 'callFd' | 'errFd', why?: string): void {
    if (why) this.be.errors.push(why);
    const fd = this.be.rings[index]?.[key] ?? -1;
    if (fd < 0) return;
    try {
      eventfdWrite(fd);
    } catch (e) {
      // A full counter (EAGAIN) still wakes the front-end; anything else is worth recording.
      if ((e as { code?: string }).code !== 'EAGAIN') this.be.errors.push(`ring ${index}: ${key === 'callFd' ? 'call' : 'err'} fd: ${(e as Error).message}`);
    }
  }
}
