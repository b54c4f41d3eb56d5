/**
 * file: a host file or block device, on the native engine (io_uring, or a native thread
 * pool where io_uring is missing). Requests cross into native code in batches; pooled
 * request records carry each one, so the path allocates nothing per request.
 *
 * cache.direct opens with O_DIRECT: requests are aligned by the I/O layer (requestAlignment)
 * and buffers that are not from the engine's aligned slab are bounced through it.
 */
import { BlockError, ioError } from '../error.js';
import { stateOf, type BlockNode } from '../node.js';
import { Perm, ReqFlags, type BlockDriver, type IoCallback, type IoVec, type ReopenState } from '../types.js';
import {
  allocatedBytes, blockSizeHint, createEngine, EngineError, FALLOC, fileSize, ftruncate, getEngine,
  isBlockDevice, seekData, seekHole, type IoEngine,
} from '../../native/engine.js';
import { applyLocks, checkLocks } from './file-lock.js';

interface FileState {
  path: string;
  fd: number;
  engine: IoEngine;
  direct: boolean;
  noFlush: boolean;
  locking: boolean;
  blockDev: boolean;
  length: number;
  align: number;
  /** Locks applied now, and before a pending permission change. */
  lockPerm: number;
  lockShared: number;
  prevPerm: number;
  prevShared: number;
}

const engines = new Map<string, IoEngine>();
function engineFor(aio: unknown): IoEngine {
  if (aio === undefined || aio === 'auto') return getEngine();
  if (aio !== 'io_uring' && aio !== 'threads') {
    throw new BlockError('EINVAL', `Parameter 'aio' does not accept value '${String(aio)}' (threads, io_uring)`);
  }
  let e = engines.get(aio);
  if (!e) engines.set(aio, (e = createEngine({ kind: aio })));
  return e;
}

/**
 * io_uring runs buffered writes to one file one at a time (its workers hash them by inode),
 * so large ones, which copy for long, go to the thread pool, where they overlap.
 */
const BULK_WRITE = 128 * 1024;
function engineForRequest(s: FileState, write: boolean, bytes: number): IoEngine {
  if (!write || bytes < BULK_WRITE || s.direct || s.engine.kind !== 'io_uring') return s.engine;
  return engineFor('threads');
}

function openError(e: unknown, path: string): BlockError {
  if (e instanceof EngineError) return new BlockError((e.code as never) ?? 'EIO', e.message, { path }, e);
  return new BlockError('EIO', `Could not open '${path}': ${String(e)}`, { path }, e);
}

/** Per-request record; `done` is bound once and reused. */
class FileReq {
  node: BlockNode = null!;
  cb: IoCallback = null!;
  offset = 0;
  bytes = 0;
  write = false;
  iov: IoVec = null!;
  bounce: Buffer | null = null;
  /** FUA write: made stable (fdatasync) before it completes. */
  fua = false;
  /** Bytes already transferred by earlier parts of a short transfer. */
  progress = 0;
  /** The vector handed to the engine (the bounce buffer or the caller's). */
  vec: IoVec = null!;
  readonly done = (res: number): void => fileDone(this, res);
}
const pool: FileReq[] = [];

function copyIov(dst: Uint8Array, iov: IoVec, bytes: number, toIov: boolean): void {
  let off = 0;
  for (const seg of iov) {
    const n = Math.min(seg.length, bytes - off);
    if (toIov) seg.set(dst.subarray(off, off + n));
    else dst.set(seg.subarray(0, n), off);
    off += n;
    if (off >= bytes) break;
  }
}

function zeroTail(iov: IoVec, from: number, bytes: number): void {
  let pos = 0;
  for (const seg of iov) {
    const end = pos + seg.length;
    if (end > from) seg.fill(0, Math.max(0, from - pos), Math.min(seg.length, bytes - pos));
    pos = end;
    if (pos >= bytes) break;
  }
}

/** The part of `iov` after its first `skip` bytes (rare path: short transfers). */
function sliceIov(iov: IoVec, skip: number): Uint8Array[] {
  const out: Uint8Array[] = [];
  for (const seg of iov) {
    if (skip >= seg.length) skip -= seg.length;
    else {
      out.push(seg.subarray(skip));
      skip = 0;
    }
  }
  return out;
}

function fileDone(r: FileReq, res: number): void {
  const s = stateOf<FileState>(r.node);
  let err: BlockError | null = null;
  if (res > 0 && r.progress + res < r.bytes && (r.write || r.offset + r.progress + res < s.length)) {
    // A short transfer inside the file (a signal, a busy device): go on with the rest.
    r.progress += res;
    const rest = sliceIov(r.vec, r.progress);
    const eng = engineForRequest(s, r.write, r.bytes);
    if (r.write) eng.writev(s.fd, rest, r.offset + r.progress, r.done);
    else eng.readv(s.fd, rest, r.offset + r.progress, r.done);
    return;
  }
  if (res >= 0) res += r.progress;
  if (res < 0) {
    err = ioError(res, r.write ? 'write' : 'read', { node: r.node.name, path: s.path, offset: r.offset });
  } else if (res < r.bytes) {
    if (r.write) {
      err = new BlockError('ENOSPC', `write on '${r.node.name}' at offset ${r.offset} was short (${res} of ${r.bytes} bytes)`, { node: r.node.name, offset: r.offset });
    } else {
      // Past the end of the file: the rest reads as zeroes.
      zeroTail(r.bounce ? [r.bounce] : r.iov, res, r.bytes);
    }
  }
  if (r.write && !err && r.offset + r.bytes > s.length) s.length = r.offset + r.bytes;
  if (r.bounce) {
    if (!r.write && !err) copyIov(r.bounce, r.iov, r.bytes, true);
    s.engine.freeBuffer(r.bounce);
  }
  const cb = r.cb;
  const node = r.node;
  const fua = r.fua && !err && !s.noFlush;
  const offset = r.offset;
  r.node = null!;
  r.cb = null!;
  r.iov = null!;
  r.bounce = null;
  r.vec = null!;
  r.progress = 0;
  r.fua = false;
  pool.push(r);
  if (fua) {
    s.engine.fsync(s.fd, true, (res) => cb(res < 0 ? ioError(res, 'write', { node: node.name, path: s.path, offset }) : null));
    return;
  }
  cb(err);
}

function submit(node: BlockNode, write: boolean, offset: number, bytes: number, iov: IoVec, cb: IoCallback, fua = false): void {
  const s = stateOf<FileState>(node);
  const r = pool.pop() ?? new FileReq();
  r.fua = fua;
  r.node = node;
  r.cb = cb;
  r.offset = offset;
  r.bytes = bytes;
  r.write = write;
  r.iov = iov;
  let vec = iov;
  if (s.direct && !s.engine.isAligned(iov, s.align)) {
    r.bounce = s.engine.allocBuffer(bytes, 4096);
    if (write) copyIov(r.bounce, iov, bytes, false);
    vec = [r.bounce];
  }
  r.vec = vec;
  const eng = engineForRequest(s, write, bytes);
  // A small write into the page cache runs inline (the engine backs off if one is slow).
  if (write) eng.writev(s.fd, vec, offset, r.done, !s.direct && bytes < BULK_WRITE);
  else eng.readv(s.fd, vec, offset, r.done, !s.direct);
}

function asyncOp(s: FileState, fn: (done: (res: number) => void) => void, op: string, node: BlockNode, offset?: number): Promise<void> {
  return new Promise((resolve, reject) =>
    fn((res) => (res < 0 ? reject(ioError(res, op, { node: node.name, path: s.path, offset })) : resolve())),
  );
}

export const fileDriver: BlockDriver = {
  format: 'file',
  protocol: true,
  growable: true,
  optionKeys: ['filename', 'aio', 'locking', 'x-engine'],

  async open(node, o) {
    const path = o['filename'];
    if (typeof path !== 'string' || !path) throw new BlockError('EINVAL', "Parameter 'filename' is missing or empty for driver 'file'");
    const locking = o['locking'] ?? 'auto';
    if (locking !== 'auto' && locking !== 'on' && locking !== 'off') {
      throw new BlockError('EINVAL', `Parameter 'locking' does not accept value '${String(locking)}' (auto, on, off)`);
    }
    const engine = engineFor(o['aio']);
    const direct = o.cache?.direct === true;
    let fd: number;
    try {
      fd = engine.open(path, { write: !node.readOnly, direct });
    } catch (e) {
      throw openError(e, path);
    }
    const blockDev = isBlockDevice(fd);
    const align = direct ? Math.max(512, blockSizeHint(fd).logical) : 1;
    node.opaque = {
      path, fd, engine, direct, blockDev, align,
      noFlush: o.cache?.['no-flush'] === true,
      locking: locking !== 'off',
      length: fileSize(fd),
      lockPerm: 0, lockShared: Perm.ALL, prevPerm: 0, prevShared: Perm.ALL,
    } satisfies FileState;
  },
  close(node) {
    const s = stateOf<FileState>(node);
    // In-flight requests are drained by the graph before the last reference goes.
    s.engine.close(s.fd);
  },
  refreshLimits(node) {
    const s = stateOf<FileState>(node);
    return { requestAlignment: s.align, memAlignment: s.direct ? 4096 : 1, discardAlignment: 4096 };
  },
  getLength: (node) => stateOf<FileState>(node).length,
  childPerms: () => ({ perm: 0, shared: Perm.ALL }),

  readv(node, offset, bytes, iov, _flags, cb) {
    submit(node, false, offset, bytes, iov, cb);
  },
  writev(node, offset, bytes, iov, flags, cb) {
    submit(node, true, offset, bytes, iov, cb, (flags & ReqFlags.FUA) !== 0);
  },
  async flush(node) {
    const s = stateOf<FileState>(node);
    if (s.noFlush) return;
    await asyncOp(s, (d) => s.engine.fsync(s.fd, true, d), 'flush', node);
  },
  async discard(node, offset, bytes) {
    const s = stateOf<FileState>(node);
    if (s.blockDev) throw new BlockError('ENOTSUP', 'discard on block devices is not supported yet', { node: node.name });
    const end = Math.min(offset + bytes, s.length);
    if (end <= offset) return;
    await asyncOp(s, (d) => s.engine.fallocate(s.fd, FALLOC.PUNCH_HOLE | FALLOC.KEEP_SIZE, offset, end - offset, d), 'discard', node, offset).catch(notSupported);
  },
  async writeZeroes(node, offset, bytes, flags) {
    const s = stateOf<FileState>(node);
    const grow = offset + bytes > s.length;
    if (flags & ReqFlags.MAY_UNMAP && !grow) {
      try {
        await asyncOp(s, (d) => s.engine.fallocate(s.fd, FALLOC.PUNCH_HOLE | FALLOC.KEEP_SIZE, offset, bytes, d), 'write-zeroes', node, offset);
        return;
      } catch {
        // Fall through to a zero range.
      }
    }
    await asyncOp(s, (d) => s.engine.fallocate(s.fd, FALLOC.ZERO_RANGE, offset, bytes, d), 'write-zeroes', node, offset).catch(notSupported);
    if (grow) s.length = offset + bytes;
  },
  async blockStatus(node, offset, bytes) {
    const s = stateOf<FileState>(node);
    if (offset >= s.length) return { bytes, data: false, zero: true, allocated: true, node };
    const end = Math.min(offset + bytes, s.length);
    let data: number;
    try {
      data = seekData(s.fd, offset);
    } catch {
      return { bytes: end - offset, data: true, zero: false, allocated: true, offset, node };
    }
    if (data < 0 || data > offset) {
      const holeEnd = data < 0 ? end : Math.min(data, end);
      return { bytes: holeEnd - offset, data: false, zero: true, allocated: true, offset, node };
    }
    const hole = seekHole(s.fd, offset);
    return { bytes: Math.min(hole, end) - offset, data: true, zero: false, allocated: true, offset, node };
  },
  async truncate(node, length) {
    const s = stateOf<FileState>(node);
    if (s.blockDev) {
      if (length > s.length) throw new BlockError('EINVAL', `Cannot grow device '${s.path}' to ${length} bytes (it has ${s.length})`);
      return;
    }
    try {
      ftruncate(s.fd, length);
    } catch (e) {
      throw openError(e, s.path);
    }
    s.length = length;
  },

  checkPerm(node, perm, shared) {
    const s = stateOf<FileState>(node);
    if (!s.locking) return;
    s.prevPerm = s.lockPerm;
    s.prevShared = s.lockShared;
    // Take the union first so no other process can slip in between check and apply.
    applyLocks(s.fd, perm | s.lockPerm, shared & s.lockShared);
    try {
      checkLocks(s.fd, s.path, perm, shared);
    } catch (e) {
      applyLocks(s.fd, s.prevPerm, s.prevShared);
      throw e;
    }
  },
  setPerm(node, perm, shared) {
    const s = stateOf<FileState>(node);
    s.lockPerm = perm;
    s.lockShared = shared;
    if (s.locking) applyLocks(s.fd, perm, shared);
  },
  abortPerm(node) {
    const s = stateOf<FileState>(node);
    if (s.locking) applyLocks(s.fd, s.prevPerm, s.prevShared);
  },

  reopen: {
    prepare(st: ReopenState) {
      const s = stateOf<FileState>(st.node);
      if (st.readOnly === st.node.readOnly) return;
      try {
        st.opaque = s.engine.open(s.path, { write: !st.readOnly, direct: s.direct });
      } catch (e) {
        throw openError(e, s.path);
      }
    },
    commit(st: ReopenState) {
      if (st.opaque === undefined) return;
      const s = stateOf<FileState>(st.node);
      const old = s.fd;
      s.fd = st.opaque as number;
      if (s.locking) applyLocks(s.fd, s.lockPerm, s.lockShared);
      s.engine.close(old);
    },
    abort(st: ReopenState) {
      if (st.opaque !== undefined) stateOf<FileState>(st.node).engine.close(st.opaque as number);
    },
  },
  describe(node) {
    const s = stateOf<FileState>(node);
    const aio = node.options['aio'];
    return { filename: s.path, ...(aio !== undefined ? { aio } : {}), ...(s.locking ? {} : { locking: 'off' }) };
  },
  info(node) {
    return { 'engine': stateOf<FileState>(node).engine.kind };
  },
  allocatedSize: (node) => allocatedBytes(stateOf<FileState>(node).fd),
};

function notSupported(e: unknown): never {
  if (e instanceof BlockError && (e.code === 'ENOTSUP' || e.code === 'EINVAL')) {
    throw new BlockError('ENOTSUP', e.message, e.context, e);
  }
  throw e;
}

/** The host path of a file node (for `img info`). */
export function filePath(node: BlockNode): string {
  return stateOf<FileState>(node).path;
}
