/**
 * xen-disk: the blkif backend (the protocol Linux's blkback speaks) over a BlockBackend.
 *
 * Realize plays the toolstack: it creates the frontend directory
 * /local/domain/1/device/vbd/<vdev> and the backend directory
 * /local/domain/0/backend/vbd/1/<vdev>, publishes the features, and goes InitWait. When the
 * frontend goes Initialised (or Connected), the backend reads ring-ref(s), ring-page-order,
 * event-channel and protocol (x86_64-abi or x86_32-abi), maps the ring through the grant table, binds the event
 * channel, publishes sectors/sector-size/info/mode and goes Connected. Frontend Closing or
 * Closed tears down (after the requests in flight complete); frontend Initialising after
 * that starts over from InitWait.
 *
 * Requests are served asynchronously through BackendIO; every guest mistake (bad grant,
 * bad segment, out-of-range sectors, unknown operation) becomes an error response, never an
 * exception out of a port handler. One pass over the ring takes at most one ring's worth of
 * requests; the rest wait for the next turn of the event loop.
 *
 * Without drive=, the disk opens its own backend from the `params` key (through the injected
 * openDrive) when the frontend connects, and releases it (detach + unref) on disconnect.
 */
import type { BackendIO } from '../../src/backend/io.js';
import type { BlockBackend } from '../../src/backend/backend.js';
import { HwError } from '../core/error.js';
import type { Device, Machine } from '../core/machine.js';
import {
  BLKIF_MAX_SEGMENTS_PER_REQUEST, BLKIF_OP_DISCARD, BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_INDIRECT, BLKIF_OP_READ,
  BLKIF_OP_WRITE, BLKIF_OP_WRITE_BARRIER, BLKIF_RSP_EOPNOTSUPP, BLKIF_RSP_ERROR, BLKIF_RSP_OKAY, SharedRing,
  mapSegments, readIndirectSegments, readRingParams, type BlkifRequest, type BlkifSegment,
} from './blkif-ring.js';
import { DOMID_BACKEND, DOMID_GUEST, type XenBridge } from './xen-bridge.js';
import { XenbusState } from './xenstore.js';

export const XEN_DISK_MAX_RING_PAGE_ORDER = 4;
export const XEN_DISK_MAX_INDIRECT_SEGMENTS = 256;
export const VDISK_READONLY = 0x4;
const SECTOR = 512;
const FUA = 0x4; // ReqFlags.FUA (the I/O API's flag; hw/ must not import src/block)

export interface XenDiskOptions {
  id: string;
  bridge: XenBridge;
  /** The virtual-device number (51712 = xvda). */
  vdev: number;
  /** A backend the disk holds from realize to unrealize. */
  drive?: BlockBackend;
  /** Without drive: opens the backend named by the `params` key on connect. */
  openDrive?: (params: string) => Promise<BlockBackend>;
}

export class XenDisk implements Device {
  readonly type = 'xen-disk';
  readonly id: string;
  readonly frontendPath: string;
  readonly backendPath: string;
  private readonly bridge: XenBridge;
  private readonly drive: BlockBackend | undefined;
  private readonly vdev: number;
  private readonly openDrive: ((params: string) => Promise<BlockBackend>) | undefined;
  private io: BackendIO | null = null;
  /** The backend attached right now (drive, or the one opened from params). */
  private attached: BlockBackend | null = null;
  private unwatch: (() => void) | null = null;
  private ring: SharedRing | null = null;
  private port = 0;
  private reqCons = 0;
  private rspProdPvt = 0;
  private inFlight = 0;
  /** Bumped by every teardown: completions of an older generation send no response. */
  private gen = 0;
  private connecting = false;
  private barrier: BlkifRequest | null = null;
  private blocked = false;
  private passQueued = false;
  /** State to publish once the requests in flight are done (teardown). */
  private pendingState: number | null = null;
  private readonly kick = (): void => this.processRing();
  /** Counters for tests: requests answered, by status. */
  readonly stats = { ok: 0, error: 0, eopnotsupp: 0, connects: 0 };

  constructor(opts: XenDiskOptions) {
    this.id = opts.id;
    this.bridge = opts.bridge;
    this.drive = opts.drive;
    this.openDrive = opts.openDrive;
    if (!Number.isInteger(opts.vdev) || opts.vdev <= 0 || opts.vdev > 0xfffffff) throw new HwError('EINVAL', `xen-disk '${opts.id}': invalid vdev ${opts.vdev}`);
    this.frontendPath = `/local/domain/${DOMID_GUEST}/device/vbd/${opts.vdev}`;
    this.backendPath = `/local/domain/${DOMID_BACKEND}/backend/vbd/${DOMID_GUEST}/${opts.vdev}`;
    this.vdev = opts.vdev;
  }

  realize(_m: Machine): void {
    if (!this.bridge.realized) throw new HwError('EINVAL', `xen-disk '${this.id}': xen bridge '${this.bridge.id}' is not realized`);
    if (!this.drive && !this.openDrive) throw new HwError('EINVAL', `xen-disk '${this.id}': needs drive= or a way to open the params key`);
    const xs = this.bridge.store;
    if (xs.exists(`${this.backendPath}/state`)) throw new HwError('EEXIST', `xen-disk '${this.id}': vbd ${this.vdev} already has a backend`);
    if (this.drive) {
      this.io = this.drive.attachDevice(this, this.deviceOps());
      this.attached = this.drive;
    }
    const fe = this.frontendPath;
    const be = this.backendPath;
    this.writeKeys(fe, { backend: be, 'backend-id': DOMID_BACKEND, 'virtual-device': this.vdev, 'device-type': 'disk', state: XenbusState.Initialising });
    this.writeKeys(be, { frontend: fe, 'frontend-id': DOMID_GUEST, online: 1, type: 'spindle', dev: `xvd${String.fromCharCode(97 + ((this.vdev >> 4) & 0xf))}` });
    if (!xs.exists(`${be}/params`)) xs.write(`${be}/params`, '');
    this.setState(XenbusState.Initialising);
    this.publishFeatures();
    this.setState(XenbusState.InitWait);
    this.unwatch = xs.watch(`${fe}/state`, this.id, () => this.frontendChanged());
  }

  unrealize(_m: Machine): void {
    this.unwatch?.();
    this.unwatch = null;
    this.teardown(XenbusState.Closed);
    if (this.drive && this.attached === this.drive) {
      this.drive.detachDevice(this);
      this.attached = null;
      this.io = null;
    }
    const xs = this.bridge.store;
    xs.rm(this.backendPath);
    xs.rm(this.frontendPath);
  }

  private deviceOps(): { resize(): void } {
    return { resize: () => this.publishSize() };
  }

  private setState(s: number): void {
    this.bridge.store.write(`${this.backendPath}/state`, String(s));
  }

  private state(): number {
    return this.bridge.store.readInt(`${this.backendPath}/state`) ?? XenbusState.Unknown;
  }

  private writeKeys(dir: string, keys: Record<string, string | number>): void {
    for (const [k, v] of Object.entries(keys)) this.bridge.store.write(`${dir}/${k}`, String(v));
  }

  private publishFeatures(): void {
    this.writeKeys(this.backendPath, {
      'feature-flush-cache': 1, 'feature-barrier': 1, 'feature-discard': 1, 'discard-granularity': SECTOR,
      'discard-alignment': 0, 'discard-secure': 0, 'feature-persistent': 0,
      'feature-max-indirect-segments': XEN_DISK_MAX_INDIRECT_SEGMENTS,
      'max-ring-page-order': XEN_DISK_MAX_RING_PAGE_ORDER, 'max-ring-pages': 1 << XEN_DISK_MAX_RING_PAGE_ORDER,
    });
    this.publishSize();
  }

  /** sectors, sector-size, info and mode (when a backend is attached). */
  private publishSize(): void {
    if (!this.io) return;
    const ro = this.io.isReadOnly();
    this.writeKeys(this.backendPath, { 'sector-size': SECTOR, sectors: Math.floor(this.io.getLength() / SECTOR), info: ro ? VDISK_READONLY : 0, mode: ro ? 'r' : 'w' });
  }

  private fail(msg: string): void {
    this.bridge.store.write(`${this.backendPath}/error`, msg);
  }

  // ---- the state machine ----

  private frontendChanged(): void {
    const fs = this.bridge.store.readInt(`${this.frontendPath}/state`) ?? XenbusState.Unknown;
    const bs = this.state();
    switch (fs) {
      case XenbusState.Initialising:
        if ((bs === XenbusState.Closed || bs === XenbusState.Closing) && this.pendingState === null) {
          this.publishFeatures();
          this.setState(XenbusState.InitWait);
        }
        return;
      case XenbusState.Initialised:
      case XenbusState.Connected:
        if (bs === XenbusState.InitWait && !this.connecting && !this.ring) void this.connect();
        return;
      case XenbusState.Closing:
        this.teardown(XenbusState.Closing);
        return;
      case XenbusState.Closed:
      case XenbusState.Unknown:
        this.teardown(XenbusState.Closed);
        return;
      default:
    }
  }

  private async connect(): Promise<void> {
    this.connecting = true;
    const gen = this.gen;
    try {
      if (!this.io) {
        const params = this.bridge.store.read(`${this.backendPath}/params`) ?? '';
        if (!params || !this.openDrive) return this.fail('no drive and no params to open one from');
        let b: BlockBackend;
        try {
          b = await this.openDrive(params);
        } catch (err) {
          return this.fail(`opening '${params}': ${(err as Error).message}`);
        }
        if (gen !== this.gen || !this.unwatch) {
          b.unref(); // torn down (or unplugged) while opening
          return;
        }
        this.io = b.attachDevice(this, this.deviceOps());
        this.attached = b;
      }
      const err = this.mapRing();
      if (err) {
        this.fail(err);
        this.teardown(XenbusState.Closing);
        return;
      }
      this.publishSize();
      this.bridge.store.rm(`${this.backendPath}/error`);
      this.stats.connects++;
      this.setState(XenbusState.Connected);
      this.processRing();
    } finally {
      this.connecting = false;
    }
  }

  /** Maps the ring and binds the event channel; returns an error message or null. */
  private mapRing(): string | null {
    const params = readRingParams(this.bridge.store, this.frontendPath, XEN_DISK_MAX_RING_PAGE_ORDER);
    if (typeof params === 'string') return params;
    const { refs, port, abi } = params;
    try {
      const pages = refs.map((r) => this.bridge.grants.map(r, DOMID_BACKEND, true));
      this.bridge.evtchn.bind(port, DOMID_BACKEND, this.kick);
      this.ring = new SharedRing(pages, abi);
    } catch (e) {
      return `mapping the ring: ${(e as Error).message}`;
    }
    this.port = port;
    this.reqCons = 0;
    this.rspProdPvt = 0;
    return null;
  }

  /** Stops serving the ring; publishes `state` once the requests in flight are done. */
  private teardown(state: number): void {
    this.gen++;
    if (this.ring) this.bridge.evtchn.unbind(this.port, this.kick);
    this.ring = null;
    this.port = 0;
    this.barrier = null;
    this.blocked = false;
    this.pendingState = state;
    if (this.inFlight === 0) this.finishTeardown();
  }

  private finishTeardown(): void {
    const state = this.pendingState;
    if (state === null) return;
    this.pendingState = null;
    const own = this.attached && this.attached !== this.drive ? this.attached : null;
    if (own) {
      own.detachDevice(this);
      own.unref(); // the reference openDrive gave us
      this.attached = null;
      this.io = null;
    }
    if (this.bridge.store.exists(this.backendPath)) this.setState(state);
    // The frontend may already have asked to start over.
    if (this.unwatch && this.bridge.store.readInt(`${this.frontendPath}/state`) === XenbusState.Initialising) this.frontendChanged();
  }

  // ---- requests ----

  private processRing(): void {
    const ring = this.ring;
    if (!ring || this.blocked) return;
    let budget = ring.size;
    for (;;) {
      const prod = ring.reqProd;
      const avail = (prod - this.reqCons) >>> 0;
      if (avail > ring.size) {
        // A broken frontend: stop serving; tear down outside any I/O completion.
        this.fail(`ring overflow: req_prod ${prod}, req_cons ${this.reqCons}`);
        this.blocked = true;
        const gen = this.gen;
        setImmediate(() => {
          if (gen === this.gen) this.teardown(XenbusState.Closing);
        });
        return;
      }
      if (avail === 0) {
        ring.reqEvent = (this.reqCons + 1) >>> 0;
        if (ring.reqProd === prod) return;
        continue;
      }
      // Every slot holds a response not yet pushed: wait for completions.
      if (((this.reqCons - this.rspProdPvt) >>> 0) >= ring.size) return;
      if (budget-- === 0) {
        if (!this.passQueued) {
          this.passQueued = true;
          setImmediate(() => {
            this.passQueued = false;
            this.processRing();
          });
        }
        return;
      }
      const req = ring.readRequest(this.reqCons);
      this.reqCons = (this.reqCons + 1) >>> 0;
      this.dispatch(req);
      if (this.blocked || this.ring !== ring) return;
    }
  }

  private dispatch(req: BlkifRequest): void {
    try {
      switch (req.operation) {
        case BLKIF_OP_READ:
        case BLKIF_OP_WRITE:
          if (req.nrSegments === 0 || req.nrSegments > BLKIF_MAX_SEGMENTS_PER_REQUEST) return this.respond(req, BLKIF_RSP_ERROR);
          return this.readWrite(req, req.operation, req.seg, 0);
        case BLKIF_OP_INDIRECT:
          return this.indirect(req);
        case BLKIF_OP_WRITE_BARRIER:
          if (req.nrSegments > BLKIF_MAX_SEGMENTS_PER_REQUEST) return this.respond(req, BLKIF_RSP_ERROR);
          if (this.inFlight > 0) {
            this.barrier = req;
            this.blocked = true;
            return;
          }
          return this.runBarrier(req);
        case BLKIF_OP_FLUSH_DISKCACHE:
          return this.async(req, this.io!.flush());
        case BLKIF_OP_DISCARD: {
          const sectors = Math.floor(this.io!.getLength() / SECTOR);
          if (req.discardFlag & ~1) return this.respond(req, BLKIF_RSP_ERROR);
          if (req.discardFlag) return this.respond(req, BLKIF_RSP_EOPNOTSUPP); // discard-secure=0
          if (req.sector + req.nrSectors > BigInt(sectors) || this.io!.isReadOnly()) return this.respond(req, BLKIF_RSP_ERROR);
          return this.async(req, this.io!.discard(Number(req.sector) * SECTOR, Number(req.nrSectors) * SECTOR));
        }
        default:
          return this.respond(req, BLKIF_RSP_EOPNOTSUPP);
      }
    } catch {
      this.respond(req, BLKIF_RSP_ERROR);
    }
  }

  private indirect(req: BlkifRequest): void {
    const segs = req.indirectOp === BLKIF_OP_READ || req.indirectOp === BLKIF_OP_WRITE
      ? readIndirectSegments(this.bridge.grants, DOMID_BACKEND, req, XEN_DISK_MAX_INDIRECT_SEGMENTS) : null;
    if (!segs) return this.respond(req, BLKIF_RSP_ERROR);
    this.readWrite(req, req.indirectOp, segs, 0);
  }

  /** Checks and maps the segments; issues the request (flags: FUA for barriers). */
  private readWrite(req: BlkifRequest, op: number, segs: readonly BlkifSegment[], flags: number, done?: (status: number) => void): void {
    const io = this.io!;
    const finish = done ?? ((s: number) => this.respond(req, s));
    if (op === BLKIF_OP_WRITE && io.isReadOnly()) return finish(BLKIF_RSP_ERROR);
    const mapped = mapSegments(this.bridge.grants, DOMID_BACKEND, segs, op === BLKIF_OP_READ);
    if (!mapped) return finish(BLKIF_RSP_ERROR);
    const { iov, sectors } = mapped;
    const total = Math.floor(io.getLength() / SECTOR);
    if (req.sector + BigInt(sectors) > BigInt(total)) return finish(BLKIF_RSP_ERROR);
    const gen = this.gen;
    this.inFlight++;
    const cb = (err: unknown): void => this.completed(gen, req, err ? BLKIF_RSP_ERROR : BLKIF_RSP_OKAY, done);
    const offset = Number(req.sector) * SECTOR;
    if (op === BLKIF_OP_READ) io.readv(offset, sectors * SECTOR, iov, 0, cb);
    else io.writev(offset, sectors * SECTOR, iov, flags, cb);
  }

  /** Runs a promise-shaped request (flush, discard) as an in-flight one. */
  private async(req: BlkifRequest, p: Promise<void>, done?: (status: number) => void): void {
    const gen = this.gen;
    this.inFlight++;
    p.then(() => this.completed(gen, req, BLKIF_RSP_OKAY, done), () => this.completed(gen, req, BLKIF_RSP_ERROR, done));
  }

  /** A barrier: everything before it is complete; flush, write (FUA), then the ring moves on. */
  private runBarrier(req: BlkifRequest): void {
    this.blocked = true;
    this.barrier = null;
    const gen = this.gen;
    const end = (status: number): void => {
      if (gen !== this.gen) return;
      this.respond(req, status);
      this.blocked = false;
      this.processRing();
    };
    this.async(req, this.io!.flush(), (st) => {
      if (st !== BLKIF_RSP_OKAY || req.nrSegments === 0) return end(st);
      this.readWrite(req, BLKIF_OP_WRITE, req.seg, FUA, end);
    });
  }

  private completed(gen: number, req: BlkifRequest, status: number, done?: (status: number) => void): void {
    this.inFlight--;
    if (gen !== this.gen) {
      if (this.inFlight === 0 && this.pendingState !== null) setImmediate(() => this.finishTeardown());
      return;
    }
    if (done) done(status);
    else this.respond(req, status);
    if (this.barrier && this.inFlight === 0) {
      const b = this.barrier;
      setImmediate(() => {
        if (gen === this.gen && this.barrier === b) this.runBarrier(b);
      });
    } else if (!this.blocked) this.processRing();
  }

  /** Pushes a response and notifies the guest if it asked (rsp_event). */
  private respond(req: BlkifRequest, status: number): void {
    const ring = this.ring;
    if (!ring) return;
    if (status === BLKIF_RSP_OKAY) this.stats.ok++;
    else if (status === BLKIF_RSP_EOPNOTSUPP) this.stats.eopnotsupp++;
    else this.stats.error++;
    ring.writeResponse(this.rspProdPvt, { id: req.id, operation: req.operation, status });
    const old = ring.rspProd;
    const now = (this.rspProdPvt + 1) >>> 0;
    this.rspProdPvt = now;
    ring.rspProd = now;
    if (((now - ring.rspEvent) >>> 0) < ((now - old) >>> 0)) this.bridge.evtchn.notifyGuest(this.port);
  }
}
