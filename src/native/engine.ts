// The native I/O engine: callback-based reads, writes, flushes and fallocate
// over io_uring (default) or a native thread pool.  Requests of one tick are
// written as descriptors into a shared Int32Array and submitted with one
// native call from a microtask; completions arrive in batches through one
// callback.  Nothing is allocated per request on the slab path.
import { constants } from 'node:os';
import { native, type NativeEngineHandle } from './addon.js';
import { check, EngineError } from './errors.js';
import { allocBuffer, freeBuffer, slabIdOf } from './slab.js';
import type {
  EngineFeatures, EngineKind, EngineOptions, EngineStats, IoDone, IoEngine, OpenOptions,
} from './engine-types.js';

export { EngineError, errnoName } from './errors.js';
export {
  allocatedBytes, blockSizeHint, fileSize, ftruncate, isBlockDevice, lockBytes, seekData, seekHole, testLock,
} from './hostfacts.js';

export { FALLOC } from './engine-types.js';
export type {
  EngineFeatures, EngineKind, EngineOptions, EngineStats, IoDone, IoEngine, OpenOptions,
} from './engine-types.js';

// Descriptor layout, shared with native/src/common.h.
const OP_READ = 1, OP_WRITE = 2, OP_READV = 3, OP_WRITEV = 4;
const OP_FSYNC = 5, OP_FDATASYNC = 6, OP_FALLOCATE = 7;
/** Or'ed into a write's op: may run at once on this thread (a page-cached file). */
const OP_INLINE = 0x100;
const DESC_INTS = 8;
const IOV_INTS = 3;
const MAX_OFFSET = Number.MAX_SAFE_INTEGER;
const ECANCELED = constants.errno.ECANCELED;
const EMPTY: readonly Uint8Array[] = [];

/** A request waiting in JS because the ring is full. */
interface Pending { op: number; fd: number; iov: readonly Uint8Array[]; offset: number; mode: number; len: number; done: IoDone }

class Engine implements IoEngine {
  private readonly h: NativeEngineHandle;
  private readonly sub: Int32Array;
  private readonly subF: Float64Array;
  private readonly iovArea: Int32Array;
  private readonly comp: Int32Array;
  /** (id, result) pairs of the writes the last submit did inline. */
  private readonly icomp: Int32Array;
  /** (id, result) pairs of slow-path writes done inline, delivered by the next flush. */
  private readonly inlineDone: number[] = [];
  private readonly dones: (IoDone | undefined)[];
  /** Non-slab buffers held until completion, so their memory stays alive. */
  private readonly keep: (readonly Uint8Array[] | undefined)[];
  private readonly freeIds: Int32Array;
  private nFree: number;
  private active = 0; // given a request id (written or submitted), not completed
  private nDesc = 0;
  private nIov = 0;
  private flushQueued = false;
  private readonly overflow: (Pending | undefined)[] = [];
  private overflowHead = 0;
  private idleWaiters: (() => void)[] = [];
  private destroyed = false;
  get isDestroyed(): boolean { return this.destroyed; }
  private nSubmitted = 0;
  private nCompleted = 0;
  private nBatches = 0;
  private nFallback = 0;
  private readonly flushFn = (): void => this.flush();

  constructor(readonly kind: EngineKind, entries: number, threads: number, flags: number) {
    try {
      this.h = new native.NativeEngine(kind, entries, threads, (n: number) => this.complete(n), flags);
    } catch (e) {
      const errno = (e as { errno?: number }).errno;
      if (typeof errno === 'number') throw new EngineError(errno, (e as Error).message);
      throw e;
    }
    const a = this.h.areas();
    this.sub = new Int32Array(a.sub);
    this.subF = new Float64Array(a.sub);
    this.iovArea = new Int32Array(a.iov);
    this.comp = new Int32Array(a.comp);
    this.icomp = new Int32Array(a.icomp);
    this.dones = new Array<IoDone | undefined>(entries).fill(undefined);
    this.keep = new Array<readonly Uint8Array[] | undefined>(entries).fill(undefined);
    this.freeIds = new Int32Array(entries);
    for (let i = 0; i < entries; i++) this.freeIds[i] = entries - 1 - i;
    this.nFree = entries;
  }

  open(path: string, opts: OpenOptions): number {
    const fd = native.open(path, !!opts.write, !!opts.create, !!opts.direct, !!opts.truncate);
    return check(fd, `Could not open '${path}'`);
  }

  close(fd: number): void {
    check(native.close(fd), `Could not close fd ${fd}`);
  }

  readv(fd: number, iov: readonly Uint8Array[], offset: number, done: IoDone, inline = false): void {
    this.rw(inline ? OP_READ | OP_INLINE : OP_READ, fd, iov, offset, done);
  }

  writev(fd: number, iov: readonly Uint8Array[], offset: number, done: IoDone, inline = false): void {
    this.rw(inline ? OP_WRITE | OP_INLINE : OP_WRITE, fd, iov, offset, done);
  }

  fsync(fd: number, datasync: boolean, done: IoDone): void {
    this.enqueue(datasync ? OP_FDATASYNC : OP_FSYNC, fd, EMPTY, 0, 0, 0, done);
  }

  fallocate(fd: number, mode: number, offset: number, len: number, done: IoDone): void {
    if (!(offset >= 0 && offset <= MAX_OFFSET && len > 0 && len <= MAX_OFFSET)) {
      throw new RangeError(`fallocate: bad range ${offset}+${len}`);
    }
    this.enqueue(OP_FALLOCATE, fd, EMPTY, offset, mode | 0, len, done);
  }

  allocBuffer(size: number, align?: number): Buffer {
    return allocBuffer(size, align);
  }

  freeBuffer(buf: Buffer): void {
    freeBuffer(buf);
  }

  isAligned(iov: readonly Uint8Array[], align: number): boolean {
    for (let i = 0; i < iov.length; i++) {
      const b = iov[i]!;
      if (slabIdOf(b.buffer) < 0 || b.byteOffset % align !== 0 || b.byteLength % align !== 0) return false;
    }
    return true;
  }

  stats(): EngineStats {
    return {
      submitted: this.nSubmitted, completed: this.nCompleted, batches: this.nBatches,
      enters: this.h.enters(), fallbackRequests: this.nFallback, fixedRequests: this.h.features()[0],
      inlineWrites: this.h.features()[3], inlineBackoffs: this.h.features()[4],
    };
  }

  features(): EngineFeatures {
    const f = this.h.features();
    return { setupFlags: f[1], fixedSlots: f[2] };
  }

  inFlight(): number {
    return this.active + (this.overflow.length - this.overflowHead);
  }

  idle(): Promise<void> {
    if (this.inFlight() === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  destroy(): void {
    if (this.destroyed) return;
    if (this.nDesc > 0 || this.inlineDone.length > 0) this.flush(); // written this tick: let them run like the rest
    this.destroyed = true;
    const rest = this.h.destroy();
    const queued = this.overflow.slice(this.overflowHead);
    this.overflow.length = 0;
    this.overflowHead = 0;
    queueMicrotask(() => {
      let first: unknown;
      let failed = false;
      const deliver = (done: IoDone | undefined, res: number): void => {
        try { done?.(res); } catch (e) { if (!failed) { failed = true; first = e; } }
      };
      for (let i = 0; i < rest.length; i += 2) {
        const id = rest[i]!;
        const done = this.dones[id];
        this.retire(id);
        deliver(done, rest[i + 1]!);
      }
      for (const p of queued) deliver(p!.done, -ECANCELED);
      this.wakeIdle();
      if (failed) throw first;
    });
  }

  private rw(op: number, fd: number, iov: readonly Uint8Array[], offset: number, done: IoDone): void {
    if (!(offset >= 0 && offset <= MAX_OFFSET) || iov.length === 0) {
      throw new RangeError(`bad I/O request: offset ${offset}, ${iov.length} segments`);
    }
    this.enqueue(op, fd, iov, offset, 0, 0, done);
  }

  private enqueue(op: number, fd: number, iov: readonly Uint8Array[], offset: number, mode: number, len: number,
    done: IoDone): void {
    if (typeof done !== 'function') throw new TypeError('done must be a function');
    if (this.destroyed) {
      queueMicrotask(() => done(-ECANCELED));
      return;
    }
    if (this.nFree === 0 || this.overflowHead < this.overflow.length) {
      this.overflow.push({ op, fd, iov, offset, mode, len, done }); // ring full: keep FIFO order
      return;
    }
    this.start(op, fd, iov, offset, mode, len, done);
  }

  /** Gives the request an id and writes its descriptor (or takes the slow path). */
  private start(op: number, fd: number, iov: readonly Uint8Array[], offset: number, mode: number, len: number,
    done: IoDone): void {
    const id = this.freeIds[--this.nFree]!;
    this.dones[id] = done;
    this.active++;
    this.nSubmitted++;
    if (!this.flushQueued) {
      this.flushQueued = true;
      queueMicrotask(this.flushFn);
    }
    const sub = this.sub;
    const base = this.nDesc * DESC_INTS;
    if ((op & ~OP_INLINE) >= OP_FSYNC) {
      sub[base] = op;
      sub[base + 1] = id;
      sub[base + 2] = fd;
      sub[base + 3] = mode;
      this.subF[(base >> 1) + 2] = len;
      this.subF[(base >> 1) + 3] = offset;
      this.nDesc++;
      return;
    }
    const n = iov.length;
    if (n === 1) {
      const b = iov[0]!;
      const slab = slabIdOf(b.buffer);
      if (slab >= 0) { // the hot case: one slab segment
        sub[base] = op;
        sub[base + 1] = id;
        sub[base + 2] = fd;
        sub[base + 3] = slab;
        sub[base + 4] = b.byteOffset;
        sub[base + 5] = b.byteLength;
        this.subF[(base >> 1) + 3] = offset;
        this.nDesc++;
        return;
      }
    } else if (this.nIov + n <= this.iovArea.length / IOV_INTS && this.encodeIov(iov)) {
      sub[base] = ((op & ~OP_INLINE) === OP_READ ? OP_READV : OP_WRITEV) | (op & OP_INLINE);
      sub[base + 1] = id;
      sub[base + 2] = fd;
      sub[base + 3] = this.nIov;
      sub[base + 4] = n;
      this.subF[(base >> 1) + 3] = offset;
      this.nIov += n;
      this.nDesc++;
      return;
    }
    // Slow path: memory outside the slabs, one native call for this request.
    this.nFallback++;
    const held = n === 1 ? iov : iov.slice();
    this.keep[id] = held;
    try {
      const res = this.h.submitExternal(op, id, fd, offset, held);
      if (typeof res === 'number') this.inlineDone.push(id, res); // a flush is queued: it delivers
    } catch (e) {
      this.retire(id); // e.g. a segment that is not a Uint8Array
      this.nCompleted--;
      this.nSubmitted--;
      throw e;
    }
  }

  /** Writes slab segments at nIov; false (nothing committed) if any is not slab memory. */
  private encodeIov(iov: readonly Uint8Array[]): boolean {
    const a = this.iovArea;
    let p = this.nIov * IOV_INTS;
    for (let i = 0; i < iov.length; i++) {
      const b = iov[i]!;
      const slab = slabIdOf(b.buffer);
      if (slab < 0) return false;
      a[p] = slab;
      a[p + 1] = b.byteOffset;
      a[p + 2] = b.byteLength;
      p += IOV_INTS;
    }
    return true;
  }

  private flush(): void {
    this.flushQueued = false;
    if (this.destroyed) return;
    const n = this.nDesc;
    this.nDesc = 0;
    this.nIov = 0;
    this.nBatches++;
    // A failed kernel entry leaves the SQEs queued; the backend retries them
    // on its next flush or completion pass.
    const k = this.h.submit(n); // with n = 0 too: it enters the kernel for slow-path requests
    if (k > 0 || this.inlineDone.length > 0) this.completeInline(k);
  }

  /** Delivers the writes done inline: `k` from the last submit, then the slow-path ones. */
  private completeInline(k: number): void {
    let first: unknown;
    let failed = false;
    const deliver = (id: number, res: number): void => {
      const done = this.dones[id]!;
      this.retire(id);
      try { done(res); } catch (e) { if (!failed) { failed = true; first = e; } }
    };
    // Copied out first: a callback's own requests may start a submit that reuses the area.
    const ic = k > 0 ? this.icomp.slice(0, 2 * k) : null;
    const ext = this.inlineDone.length > 0 ? this.inlineDone.splice(0) : null;
    if (ic) for (let i = 0; i < ic.length; i += 2) deliver(ic[i]!, ic[i + 1]!);
    if (ext) for (let i = 0; i < ext.length; i += 2) deliver(ext[i]!, ext[i + 1]!);
    if (this.overflowHead < this.overflow.length) this.drainOverflow();
    if (this.idleWaiters.length > 0 && this.inFlight() === 0) this.wakeIdle();
    if (failed) throw first;
  }

  private retire(id: number): void {
    this.dones[id] = undefined;
    if (this.keep[id] !== undefined) this.keep[id] = undefined;
    this.freeIds[this.nFree++] = id;
    this.active--;
    this.nCompleted++;
  }

  /** Called by the native side once per batch of `n` (id, result) pairs. */
  private complete(n: number): void {
    const comp = this.comp;
    let first: unknown;
    let failed = false;
    for (let i = 0; i < 2 * n; i += 2) {
      const id = comp[i]!;
      const done = this.dones[id]!;
      this.retire(id);
      // A throwing callback must not lose the rest of the batch.
      try { done(comp[i + 1]!); } catch (e) { if (!failed) { failed = true; first = e; } }
    }
    if (this.overflowHead < this.overflow.length) this.drainOverflow();
    if (this.idleWaiters.length > 0 && this.inFlight() === 0) this.wakeIdle();
    if (failed) throw first;
  }

  private drainOverflow(): void {
    const q = this.overflow;
    while (this.overflowHead < q.length && this.nFree > 0 && !this.destroyed) {
      const p = q[this.overflowHead]!;
      q[this.overflowHead++] = undefined;
      this.start(p.op, p.fd, p.iov, p.offset, p.mode, p.len, p.done);
    }
    if (this.overflowHead === q.length) {
      q.length = 0;
      this.overflowHead = 0;
    }
  }

  private wakeIdle(): void {
    const w = this.idleWaiters;
    this.idleWaiters = [];
    for (const resolve of w) resolve();
  }
}

function chooseKind(opts?: EngineOptions): 'auto' | EngineKind {
  const k = opts?.kind ?? 'auto';
  if (k !== 'auto') return k;
  const env = process.env.SPINDLE_ENGINE;
  if (env === 'io_uring' || env === 'threads') return env;
  if (env !== undefined && env !== '' && env !== 'auto') {
    throw new RangeError(`SPINDLE_ENGINE must be 'auto', 'io_uring' or 'threads', got '${env}'`);
  }
  return 'auto';
}

/** A new engine; 'auto' (default, or SPINDLE_ENGINE) prefers io_uring and falls back to threads. */
export function createEngine(opts?: EngineOptions): IoEngine {
  const entries = opts?.entries ?? 256;
  const threads = opts?.threads ?? 4;
  if (!Number.isInteger(entries) || entries < 1 || entries > 32768) {
    throw new RangeError(`entries must be an integer in [1, 32768], got ${entries}`);
  }
  if (!Number.isInteger(threads) || threads < 1 || threads > 256) {
    throw new RangeError(`threads must be an integer in [1, 256], got ${threads}`);
  }
  const flags = nativeFlags(opts);
  const kind = chooseKind(opts);
  if (kind !== 'auto') return new Engine(kind, entries, threads, flags);
  try {
    return new Engine('io_uring', entries, threads, flags);
  } catch (e) {
    if (!(e instanceof EngineError)) throw e;
    return new Engine('threads', entries, threads, flags);
  }
}

// EngineFlags in native/src/common.h.
const NO_FIXED_BUFFERS = 1;
const NO_INLINE_READS = 2;

function nativeFlags(opts?: EngineOptions): number {
  let flags = opts?.nativeFlags ?? 0;
  const fixed = opts?.fixedBuffers ?? process.env.SPINDLE_NO_FIXED_BUFFERS !== '1';
  if (!fixed) flags |= NO_FIXED_BUFFERS;
  if (!(opts?.inlineReads ?? process.env.SPINDLE_NO_INLINE_READS !== '1')) flags |= NO_INLINE_READS;
  return flags;
}

/** What an engine's backend enabled (diagnostics and tests). */
export function engineFeatures(e: IoEngine): EngineFeatures {
  if (!(e instanceof Engine)) throw new TypeError('not a native engine');
  return e.features();
}

let defaultEngine: Engine | undefined;

/** The process-wide engine, created on first use; later calls ignore opts. */
export function getEngine(opts?: EngineOptions): IoEngine {
  if (defaultEngine === undefined || defaultEngine.isDestroyed) {
    defaultEngine = createEngine(opts) as Engine;
  }
  return defaultEngine;
}
