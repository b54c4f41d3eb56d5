/**
 * The I/O API: requests on edges.
 *
 * Context: any AioContext. Nothing here changes the graph. A request is issued on a
 * BlockChild, so the edge's permissions are checked by construction (a write through an
 * edge without WRITE is refused with EPERM). Reads and writes are callback-based with
 * pooled request records: no closure, promise or copy per request on the aligned path.
 * The other operations are promise-based; they are not hot.
 */
import { enterIo, leaveIo } from './context.js';
import { drainWaiting, pollDrains } from './drain.js';
import { BlockError, ioError } from './error.js';
import { alignedReadv, alignedWritev, waitSerialising, waitWrites } from './io-align.js';
import type { BlockChild, BlockNode, TrackedRange } from './node.js';
import { Perm, ReqFlags, type BlockStatus, type IoCallback, type IoVec } from './types.js';

/** A pooled in-flight request; its bound completion functions are created once. */
class Req implements TrackedRange {
  offset = 0;
  end = 0;
  waiters: (() => void)[] | null = null;
  prev: TrackedRange | null = null;
  next: TrackedRange | null = null;
  node: BlockNode = null!;
  cb: IoCallback = null!;
  write = false;
  bytes = 0;
  readonly done: IoCallback = (err) => finish(this, err);
  readonly ok = (): void => finish(this, null);
  readonly fail = (e: unknown): void => finish(this, asBlockError(e, this));
}
const pool: Req[] = [];

function asBlockError(e: unknown, r: Req): BlockError {
  if (e instanceof BlockError) return e;
  return new BlockError('EIO', `${r.write ? 'write' : 'read'} on '${r.node.name}' failed: ${String(e)}`, { node: r.node.name }, e);
}

function finish(r: Req, err: BlockError | null): void {
  const node = r.node;
  const cb = r.cb;
  node.inFlight--;
  if (r.write) {
    node.writesInFlight--;
    if (r.prev) r.prev.next = r.next;
    else node.writeHead = r.next;
    if (r.next) r.next.prev = r.prev;
    r.prev = r.next = null;
    if (r.waiters) wake(r);
    if (err) node.stats.failedOps++;
    else { node.stats.wrOps++; node.stats.wrBytes += r.bytes; }
  } else if (err) node.stats.failedOps++;
  else { node.stats.rdOps++; node.stats.rdBytes += r.bytes; }
  r.node = null!;
  r.cb = null!;
  pool.push(r);
  enterIo();
  try {
    cb(err);
  } finally {
    leaveIo();
    if (drainWaiting) pollDrains();
  }
}

function wake(t: TrackedRange): void {
  const w = t.waiters!;
  t.waiters = null;
  for (const fn of w) fn();
}

function failLater(cb: IoCallback, err: BlockError): void {
  process.nextTick(cb, err);
}

/** Range check shared by every operation. Returns an error or null. */
/** Files grow when written past the end; so do filters right above them. */
export function isGrowable(node: BlockNode): boolean {
  if (node.driver.growable) return true;
  const f = node.driver.isFilter ? node.primary : undefined;
  return f !== undefined && isGrowable(f.node);
}

export function checkRange(node: BlockNode, offset: number, bytes: number, op: string): BlockError | null {
  if (isGrowable(node)) {
    return Number.isSafeInteger(offset) && Number.isSafeInteger(bytes) && offset >= 0 && bytes >= 0 ? null
      : new BlockError('EINVAL', `${op} on '${node.name}': invalid request offset ${offset}, length ${bytes}`, { node: node.name, offset, bytes, op });
  }
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(bytes) || offset < 0 || bytes < 0) {
    return new BlockError('EINVAL', `${op} on '${node.name}': invalid request offset ${offset}, length ${bytes}`, { node: node.name, offset, bytes, op });
  }
  const len = node.driver.getLength(node);
  if (offset + bytes > len) {
    return new BlockError('EINVAL', `${op} on '${node.name}': request [${offset}, ${offset + bytes}) is past the end of the ${len}-byte node`, { node: node.name, offset, bytes, op });
  }
  return null;
}

function checkWrite(e: BlockChild, op: string): BlockError | null {
  const node = e.node;
  if (node.readOnly) return new BlockError('EPERM', `${op} on '${node.name}': the node is read-only`, { node: node.name, op });
  if (!(e.perm & (Perm.WRITE | Perm.WRITE_UNCHANGED))) {
    return new BlockError('EPERM', `${op} on '${node.name}' through ${e.parent.describeUser()} (as '${e.name}'), which has no write permission`, { node: node.name, op });
  }
  return null;
}

function start(node: BlockNode, write: boolean, offset: number, bytes: number, cb: IoCallback): Req {
  const r = pool.pop() ?? new Req();
  r.node = node;
  r.cb = cb;
  r.write = write;
  r.bytes = bytes;
  node.inFlight++;
  if (write) {
    node.writesInFlight++;
    r.offset = offset;
    r.end = offset + bytes;
    r.next = node.writeHead;
    if (r.next) r.next.prev = r;
    node.writeHead = r;
  }
  return r;
}

/** Issues a driver read for an aligned request. Context: I/O layer. */
export function dispatchRead(node: BlockNode, offset: number, bytes: number, iov: IoVec, flags: number, cb: IoCallback): void {
  const r = start(node, false, offset, bytes, cb);
  const drv = node.driver;
  enterIo();
  try {
    if (drv.readv) drv.readv(node, offset, bytes, iov, flags, r.done);
    else if (drv.coReadv) drv.coReadv(node, offset, bytes, iov, flags).then(r.ok, r.fail);
    else r.fail(new BlockError('ENOTSUP', `Driver '${drv.format}' cannot read`, { node: node.name }));
  } catch (e) {
    r.fail(e);
  } finally {
    leaveIo();
  }
}

/** Issues a driver write for an aligned request. Context: I/O layer. */
export function dispatchWrite(node: BlockNode, offset: number, bytes: number, iov: IoVec, flags: number, cb: IoCallback): void {
  const r = start(node, true, offset, bytes, cb);
  const drv = node.driver;
  enterIo();
  try {
    if (drv.writev) drv.writev(node, offset, bytes, iov, flags, r.done);
    else if (drv.coWritev) drv.coWritev(node, offset, bytes, iov, flags).then(r.ok, r.fail);
    else r.fail(new BlockError('ENOTSUP', `Driver '${drv.format}' cannot write`, { node: node.name }));
  } catch (e) {
    r.fail(e);
  } finally {
    leaveIo();
  }
}

/** Vectored read of `bytes` at `offset` into `iov`. Context: any AioContext. */
export function readv(e: BlockChild, offset: number, bytes: number, iov: IoVec, flags: number, cb: IoCallback): void {
  const node = e.node;
  const bad = checkRange(node, offset, bytes, 'read');
  if (bad) return failLater(cb, bad);
  if (bytes === 0) return void process.nextTick(cb, null); // nothing to transfer (iov may be empty)
  const align = node.limits.requestAlignment;
  if (align > 1 && (offset % align !== 0 || bytes % align !== 0)) {
    alignedReadv(node, offset, bytes, iov, flags, cb);
    return;
  }
  dispatchRead(node, offset, bytes, iov, flags, cb);
}

/** Vectored write of `bytes` at `offset` from `iov`. Context: any AioContext. */
export function writev(e: BlockChild, offset: number, bytes: number, iov: IoVec, flags: number, cb: IoCallback): void {
  const node = e.node;
  const bad = checkWrite(e, 'write') ?? checkRange(node, offset, bytes, 'write');
  if (bad) return failLater(cb, bad);
  if (bytes === 0) return void process.nextTick(cb, null); // nothing to transfer (iov may be empty)
  if (node.detectZeroes !== 'off' && !(flags & ReqFlags.SERIALISED) && isZeroIov(iov, bytes)) {
    const zf = node.detectZeroes === 'unmap' ? ReqFlags.MAY_UNMAP : 0;
    writeZeroes(e, offset, bytes, zf).then(() => cb(null), (err: BlockError) => cb(err));
    return;
  }
  const align = node.limits.requestAlignment;
  if (align > 1 && (offset % align !== 0 || bytes % align !== 0)) {
    alignedWritev(node, offset, bytes, iov, flags, cb);
    return;
  }
  if (node.serialising.length && !(flags & ReqFlags.SERIALISED)) {
    // The write is in flight while it waits (a drain must wait for it too).
    node.inFlight++;
    waitSerialising(node, offset, offset + bytes).then(() => {
      node.inFlight--;
      dispatchWrite(node, offset, bytes, iov, flags, cb);
    });
    return;
  }
  dispatchWrite(node, offset, bytes, iov, flags, cb);
}

export function isZeroIov(iov: IoVec, bytes: number): boolean {
  let left = bytes;
  for (const seg of iov) {
    const n = Math.min(seg.length, left);
    for (let i = 0; i < n; i++) if (seg[i] !== 0) return false;
    left -= n;
    if (!left) break;
  }
  return true;
}

function promised(fn: (cb: IoCallback) => void): Promise<void> {
  return new Promise((resolve, reject) => fn((err) => (err ? reject(err) : resolve())));
}

/** Promise form of readv for one buffer. Context: any AioContext. */
export function read(e: BlockChild, offset: number, buf: Uint8Array, flags = 0): Promise<void> {
  return promised((cb) => readv(e, offset, buf.length, [buf], flags, cb));
}
/** Promise form of writev for one buffer. Context: any AioContext. */
export function write(e: BlockChild, offset: number, buf: Uint8Array, flags = 0): Promise<void> {
  return promised((cb) => writev(e, offset, buf.length, [buf], flags, cb));
}

/** Runs a promise-based operation as a tracked request. */
async function tracked<T>(node: BlockNode, write: boolean, fn: () => Promise<T>): Promise<T> {
  node.inFlight++;
  if (write) node.writesInFlight++;
  try {
    // I/O context only around the synchronous part: the main loop runs during the await.
    enterIo();
    let p: Promise<T>;
    try {
      p = fn();
    } finally {
      leaveIo();
    }
    return await p;
  } finally {
    node.inFlight--;
    if (write) node.writesInFlight--;
    if (drainWaiting) pollDrains();
  }
}

/** Flushes the node and then every child it may have written. Context: any AioContext. */
export async function flush(e: BlockChild): Promise<void> {
  const node = e.node;
  await tracked(node, false, async () => {
    node.stats.flushOps++;
    if (node.driver.flush) await node.driver.flush(node);
    for (const c of node.children) {
      if (c.perm & (Perm.WRITE | Perm.WRITE_UNCHANGED)) await flush(c);
    }
  });
}

/**
 * Runs a driver write-zeroes or discard over [offset, end) serialised against overlapping
 * writes: it waits for those in flight, and writes arriving meanwhile wait for it. A format
 * may then free or remap clusters without a write still landing in them.
 */
async function asTrackedWrite(node: BlockNode, offset: number, end: number, fn: () => Promise<void>): Promise<void> {
  const me: TrackedRange = { offset, end, waiters: null, prev: null, next: null };
  node.serialising.push(me);
  try {
    await waitSerialising(node, offset, end, me);
    await waitWrites(node, offset, end);
    await fn();
  } finally {
    node.serialising.splice(node.serialising.indexOf(me), 1);
    if (me.waiters) wake(me);
  }
}

/** Discards (unmaps) a range; a no-op unless the node has discard=unmap. Context: any AioContext. */
export async function discard(e: BlockChild, offset: number, bytes: number): Promise<void> {
  const node = e.node;
  const bad = checkWrite(e, 'discard') ?? checkRange(node, offset, bytes, 'discard');
  if (bad) throw bad;
  if (!node.discardUnmap || !node.driver.discard || bytes === 0) return;
  await tracked(node, true, async () => {
    node.stats.discardOps++;
    try {
      await asTrackedWrite(node, offset, offset + bytes, () => node.driver.discard!(node, offset, bytes));
    } catch (err) {
      if (!(err instanceof BlockError && err.code === 'ENOTSUP')) throw err;
    }
  });
}

const ZERO_CHUNK = 1 << 20;
let zeroBuf: Uint8Array | null = null;

/** Writes zeroes, deallocating if MAY_UNMAP and the node allows; falls back to zero buffers. */
export async function writeZeroes(e: BlockChild, offset: number, bytes: number, flags: number): Promise<void> {
  const node = e.node;
  const bad = checkWrite(e, 'write-zeroes') ?? checkRange(node, offset, bytes, 'write-zeroes');
  if (bad) throw bad;
  if (bytes === 0) return;
  if (!node.discardUnmap) flags &= ~ReqFlags.MAY_UNMAP;
  await tracked(node, true, async () => {
    if (node.driver.writeZeroes) {
      try {
        const drv = node.driver;
        await asTrackedWrite(node, offset, offset + bytes, () => drv.writeZeroes!(node, offset, bytes, flags));
        return;
      } catch (err) {
        if (!(err instanceof BlockError && err.code === 'ENOTSUP') || flags & ReqFlags.NO_FALLBACK) throw err;
      }
    } else if (flags & ReqFlags.NO_FALLBACK) {
      throw new BlockError('ENOTSUP', `write-zeroes on '${node.name}' cannot be done without writing`, { node: node.name });
    }
    zeroBuf ??= new Uint8Array(ZERO_CHUNK);
    for (let pos = offset; pos < offset + bytes; ) {
      const n = Math.min(ZERO_CHUNK, offset + bytes - pos);
      await promised((cb) => writev(e, pos, n, [zeroBuf!.subarray(0, n)], flags & ~ReqFlags.MAY_UNMAP, cb));
      pos += n;
    }
  });
}

/** Allocation status of [offset, offset+bytes). Context: any AioContext. */
export async function blockStatus(e: BlockChild, offset: number, bytes: number): Promise<BlockStatus> {
  const node = e.node;
  const bad = checkRange(node, offset, bytes, 'block-status');
  if (bad) throw bad;
  if (bytes === 0) return { bytes: 0, data: false, zero: false, allocated: false };
  return tracked(node, false, async () => {
    if (node.driver.blockStatus) return node.driver.blockStatus(node, offset, bytes);
    const f = node.driver.isFilter ? node.primary : undefined;
    if (f) return blockStatus(f, offset, bytes);
    return { bytes, data: true, zero: false, allocated: true, node };
  });
}

/** Resizes the node; the edge needs RESIZE. Context: any AioContext. */
export async function truncate(e: BlockChild, length: number, exact = true): Promise<void> {
  const node = e.node;
  if (!Number.isSafeInteger(length) || length < 0) throw new BlockError('EINVAL', `Invalid length ${length} for '${node.name}'`, { node: node.name });
  if (node.readOnly) throw new BlockError('EPERM', `Cannot resize '${node.name}': the node is read-only`, { node: node.name });
  if (!(e.perm & Perm.RESIZE)) {
    throw new BlockError('EPERM', `Cannot resize '${node.name}' through ${e.parent.describeUser()}, which has no resize permission`, { node: node.name });
  }
  if (!node.driver.truncate) throw new BlockError('ENOTSUP', `Driver '${node.driver.format}' of '${node.name}' cannot resize`, { node: node.name });
  await tracked(node, true, () => node.driver.truncate!(node, length, exact));
  for (const p of node.parents) p.parent.childResized?.(p);
}

export function getLength(e: BlockChild): number {
  return e.node.driver.getLength(e.node);
}

export { ioError };
