/**
 * The I/O half of BlockBackend: `BackendIO`, the only handle a device model holds.
 *
 * Context: any AioContext. It has no path back to nodes or graph calls: devices cannot
 * change the graph by construction. Requests made while the backend is drained are queued
 * and issued when the section ends; errors go through the rerror/werror policy, and a
 * request stopped by the policy is kept and re-issued on resume.
 *
 *   start ─> issue ─ drained? ─> core.queued (re-issued at drained_end)
 *              │ no medium / past the end ─> fails
 *              │ throttled and over the limit ─> the throttle's FIFO (released by its timer)
 *              v
 *            send ─> root ─> reqDone (error policy) ─> complete (statistics, callback)
 *
 * An unthrottled backend pays one `core.throttle !== null` test; a throttled request waits in
 * the throttle's queue as this same pooled PendingReq (no allocation).
 */
import { BlockError } from '../block/error.js';
import * as io from '../block/io.js';
import type { BlockChild } from '../block/node.js';
import { ReqFlags, type IoCallback, type IoVec } from '../block/types.js';
import type { ErrorAction, IoStatus } from './device-ops.js';
import { Acct, acctNow, type BlockAcctStats } from './stats.js';
import type { Throttled, ThrottleGroupMember } from './throttle-group.js';

/** What the I/O half needs of a backend (implemented by BlockBackend). */
export interface BackendCore {
  readonly name: string;
  root: BlockChild | null;
  quiesce: number;
  inFlight: number;
  writeCache: boolean;
  rerror: ErrorAction;
  werror: ErrorAction;
  iostatus: IoStatus;
  readonly queued: PendingReq[];
  readonly stopped: PendingReq[];
  /** The backend's throttle group membership; null: not throttled. */
  throttle: ThrottleGroupMember | null;
  readonly stats: BlockAcctStats;
  /** Policy said stop: tell the world (BLOCK_IO_ERROR, VM stop). */
  reportError(op: 'read' | 'write', action: ErrorAction, err: BlockError): void;
  requestDone(): void;
}

/** What a backend request does: a read or write (by `write`), a flush, a discard, write-zeroes. */
export const enum ReqOp { RW, FLUSH, DISCARD, ZEROES }

/** A backend request; pooled, with its completion bound once. */
export class PendingReq {
  core: BackendCore = null!;
  op: ReqOp = ReqOp.RW;
  /** A write as the error policy sees it (flush, discard and write-zeroes are writes). */
  write = false;
  offset = 0;
  bytes = 0;
  iov: IoVec = null!;
  flags = 0;
  cb: IoCallback = null!;
  /** Whether the request counts in the backend's inFlight (sent to the root, or throttled). */
  counted = false;
  /** When the request started (ns on the throttle clock), for the statistics. */
  start = 0;
  readonly done: IoCallback = (err) => reqDone(this, err);
  readonly ok = (): void => reqDone(this, null);
  readonly failed = (e: unknown): void => reqDone(this, e instanceof BlockError ? e : new BlockError('EIO', String(e)));
  readonly flushed: IoCallback = (err) => {
    this.core.inFlight--;
    complete(this, err);
  };
}
const pool: PendingReq[] = [];
const EMPTY_IOV: IoVec = [];

function noMedium(core: BackendCore): BlockError {
  return new BlockError('ENOMEDIUM', `No medium in block device '${core.name}'`, { op: 'io' });
}

/** Issues (or re-issues) a backend request on the current root. */
export function issue(r: PendingReq): void {
  const core = r.core;
  if (core.quiesce > 0) {
    core.queued.push(r);
    return;
  }
  const root = core.root;
  r.counted = false;
  if (!root) return void process.nextTick(r.done, noMedium(core));
  // The device sees the medium's length: a growable root (a bare file) must not grow through
  // it. Other roots refuse such requests themselves (io.checkRange), so they skip this check.
  const len = io.isGrowable(root.node) ? io.getLength(root) : Infinity;
  if (r.offset + r.bytes > len && Number.isSafeInteger(r.offset + r.bytes)) {
    const err = new BlockError('EINVAL', `${r.write ? 'write' : 'read'} on block device '${core.name}': request [${r.offset}, ${r.offset + r.bytes}) is past the end of the ${len}-byte medium`, { offset: r.offset, bytes: r.bytes });
    return void process.nextTick(r.done, err);
  }
  r.counted = true;
  core.inFlight++;
  // QEMU throttles reads and writes (write-zeroes is a write); flush and discard pass.
  if (core.throttle !== null && (r.op === ReqOp.RW || r.op === ReqOp.ZEROES) && core.throttle.intercept(r, r.write)) return;
  send(r, root);
}

/** Issues a request the throttle let go (it passed the drain and range checks before waiting). */
export function releaseThrottled(t: Throttled): void {
  const r = t as PendingReq;
  const root = r.core.root;
  if (root) return send(r, root);
  r.counted = false;
  r.core.inFlight--;
  process.nextTick(r.done, noMedium(r.core));
}

function send(r: PendingReq, root: BlockChild): void {
  if (r.op === ReqOp.RW) {
    if (r.write) io.writev(root, r.offset, r.bytes, r.iov, r.flags, r.done);
    else io.readv(root, r.offset, r.bytes, r.iov, r.flags, r.done);
    return;
  }
  // Not the read/write hot path: the promise forms of the block layer serve.
  const p = r.op === ReqOp.FLUSH ? io.flush(root) : r.op === ReqOp.DISCARD ? io.discard(root, r.offset, r.bytes) : io.writeZeroes(root, r.offset, r.bytes, r.flags);
  p.then(r.ok, r.failed);
}

function reqDone(r: PendingReq, err: BlockError | null): void {
  const core = r.core;
  if (r.counted) core.inFlight--;
  if (err) {
    const policy = r.write ? core.werror : core.rerror;
    const nospace = err.code === 'ENOSPC';
    const action: ErrorAction = policy === 'enospc' ? (nospace ? 'stop' : 'report') : policy;
    core.reportError(r.write ? 'write' : 'read', action, err);
    if (action === 'stop') {
      core.iostatus = nospace ? 'nospace' : 'failed';
      core.stopped.push(r);
      core.requestDone();
      return;
    }
    if (action === 'ignore') err = null;
    else if (core.iostatus === 'ok') core.iostatus = nospace ? 'nospace' : 'failed';
  } else if (r.op === ReqOp.RW && r.write && !core.writeCache && core.root) {
    // Write cache off: the write is complete only once it is stable.
    core.inFlight++;
    io.flush(core.root).then(() => r.flushed(null), (e: BlockError) => r.flushed(e));
    return;
  }
  complete(r, err);
}

const ACCT_OF: readonly Acct[] = [Acct.READ, Acct.FLUSH, Acct.UNMAP, Acct.WRITE];

function complete(r: PendingReq, err: BlockError | null): void {
  const core = r.core;
  const cb = r.cb;
  core.stats.done(r.op === ReqOp.RW ? (r.write ? Acct.WRITE : Acct.READ) : ACCT_OF[r.op]!, r.offset, r.bytes, r.start, err !== null);
  r.core = null!;
  r.cb = null!;
  r.iov = null!;
  pool.push(r);
  core.requestDone();
  cb(err);
}

function start(core: BackendCore, write: boolean, offset: number, bytes: number, iov: IoVec, flags: number, cb: IoCallback, op = ReqOp.RW): void {
  const r = pool.pop() ?? new PendingReq();
  r.core = core;
  r.op = op;
  r.write = write;
  r.offset = offset;
  r.bytes = bytes;
  r.iov = iov;
  r.flags = flags;
  r.cb = cb;
  r.start = acctNow();
  issue(r);
}

/** The device's handle on its backend. */
export interface BackendIO {
  /** The backend's name, for the device's messages. */
  readonly name: string;
  readv(offset: number, bytes: number, iov: IoVec, flags: number, cb: IoCallback): void;
  writev(offset: number, bytes: number, iov: IoVec, flags: number, cb: IoCallback): void;
  read(offset: number, buf: Uint8Array): Promise<void>;
  write(offset: number, buf: Uint8Array, flags?: number): Promise<void>;
  flush(): Promise<void>;
  discard(offset: number, bytes: number): Promise<void>;
  writeZeroes(offset: number, bytes: number, mayUnmap: boolean): Promise<void>;
  getLength(): number;
  isInserted(): boolean;
  isReadOnly(): boolean;
  isWriteCacheEnabled(): boolean;
  setWriteCache(on: boolean): void;
  iostatus(): IoStatus;
  /**
   * The device was reset: its requests the error policy stopped are dropped, never retried
   * or completed (the guest forgot them; a resume must not write them). Returns how many.
   */
  dropStopped(): number;
}

/** Implementation; `#core` is private, so a device reaches nothing but these methods. */
export class BackendIOImpl implements BackendIO {
  readonly #core: BackendCore;
  #revoked = false;
  constructor(core: BackendCore) {
    this.#core = core;
  }
  get name(): string {
    return this.#core.name;
  }
  /** Called by the backend when the device detaches: the handle stops working. */
  revoke(): void {
    this.#revoked = true;
  }
  #live(cb: IoCallback): boolean {
    if (!this.#revoked) return true;
    process.nextTick(cb, new BlockError('ENOMEDIUM', `Block device '${this.#core.name}' is detached from this device`));
    return false;
  }
  readv(offset: number, bytes: number, iov: IoVec, flags: number, cb: IoCallback): void {
    if (this.#live(cb)) start(this.#core, false, offset, bytes, iov, flags, cb);
  }
  writev(offset: number, bytes: number, iov: IoVec, flags: number, cb: IoCallback): void {
    if (this.#live(cb)) start(this.#core, true, offset, bytes, iov, flags, cb);
  }
  read(offset: number, buf: Uint8Array): Promise<void> {
    return new Promise((res, rej) => this.readv(offset, buf.length, [buf], 0, (e) => (e ? rej(e) : res())));
  }
  write(offset: number, buf: Uint8Array, flags = 0): Promise<void> {
    return new Promise((res, rej) => this.writev(offset, buf.length, [buf], flags, (e) => (e ? rej(e) : res())));
  }
  /** Flush, discard and write-zeroes go through the queue and the error policy like writes. */
  #op(op: ReqOp, offset: number, bytes: number, flags: number): Promise<void> {
    return new Promise((res, rej) => {
      const cb: IoCallback = (e) => (e ? rej(e) : res());
      if (this.#live(cb)) start(this.#core, true, offset, bytes, EMPTY_IOV, flags, cb, op);
    });
  }
  flush(): Promise<void> {
    return this.#op(ReqOp.FLUSH, 0, 0, 0);
  }
  discard(offset: number, bytes: number): Promise<void> {
    return this.#op(ReqOp.DISCARD, offset, bytes, 0);
  }
  writeZeroes(offset: number, bytes: number, mayUnmap: boolean): Promise<void> {
    return this.#op(ReqOp.ZEROES, offset, bytes, mayUnmap ? ReqFlags.MAY_UNMAP : 0);
  }
  getLength(): number {
    const r = this.#core.root;
    return r && !this.#revoked ? io.getLength(r) : 0;
  }
  isInserted(): boolean {
    return !this.#revoked && this.#core.root !== null;
  }
  isReadOnly(): boolean {
    const r = this.#core.root;
    return !r || r.node.readOnly || !(r.perm & 0x2);
  }
  isWriteCacheEnabled(): boolean {
    return this.#core.writeCache;
  }
  setWriteCache(on: boolean): void {
    this.#core.writeCache = on;
  }
  iostatus(): IoStatus {
    return this.#core.iostatus;
  }
  dropStopped(): number {
    if (this.#revoked) return 0;
    const n = this.#core.stopped.length;
    this.#core.stopped.length = 0;
    return n;
  }
}
