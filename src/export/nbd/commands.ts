/**
 * Transmission commands: checks every request once ("Request types", "Error values" in
 * specs/nbd-proto.md), then issues it.
 *
 *   READ   simple reply, or structured: one status query; all data -> one OFFSET_DATA chunk
 *          from the buffer the read landed in, or from the page cache (sendfile.ts);
 *          zeroes/unallocated ranges -> OFFSET_HOLE chunks (DF: always one OFFSET_DATA chunk)
 *   WRITE  BackendIO.writev on the payload's own chunks (FUA -> ReqFlags.FUA)
 *   FLUSH, TRIM, WRITE_ZEROES (NO_HOLE: no unmap; FAST_ZERO: the block layer's NO_FALLBACK),
 *   CACHE (a read whose data is dropped), BLOCK_STATUS (one chunk per selected context)
 *
 * Context: main loop.
 */
import { ReqFlags } from '../../block/types.js';
import { DATA_HEADROOM, getReplyBuffer, putReplyBuffer } from './buffers.js';
import type { NbdConn, Req } from './conn.js';
import { CONTEXT_BASE, CONTEXT_DEPTH } from './handshake.js';
import { SENDFILE_MIN } from './sendfile.js';
import * as P from './protocol.js';

/** Extents per block-status chunk (the spec allows 2^20; this bounds the reply and the work). */
const MAX_EXTENTS = 4096;
/** Status segments a sparse read is split into at most; the rest is read as data. */
const MAX_READ_SEGMENTS = 64;
/** How far past a read its status query looks. */
const STATUS_AHEAD = 64 << 20;

export function dispatch(c: NbdConn, r: Req): void {
  const exp = r.exp;
  const t = r.type;
  if (c.host.shuttingDown) return fail(c, r, P.NBD_ESHUTDOWN, 'server is shutting down');
  if (t >= P.VALID_FLAGS.length) return fail(c, r, P.NBD_EINVAL, `unknown command ${t}`);
  if (r.flags & ~P.VALID_FLAGS[t]!) return fail(c, r, P.NBD_EINVAL, `invalid flags 0x${r.flags.toString(16)} for command ${t}`);
  if (r.flags & P.CMD_FLAG_DF && !c.structured) return fail(c, r, P.NBD_EINVAL, 'DF without structured replies');
  const writes = t === P.CMD_WRITE || t === P.CMD_TRIM || t === P.CMD_WRITE_ZEROES;
  if (writes && !exp.writable) return fail(c, r, P.NBD_EPERM, `export '${exp.name}' is read-only`);
  if (t !== P.CMD_FLUSH) {
    const size = exp.size;
    if (r.offset < 0 || r.offset + r.length > size) {
      return fail(c, r, writes && t !== P.CMD_TRIM ? P.NBD_ENOSPC : P.NBD_EINVAL, `request [${r.offset}, +${r.length}) is past the end of the ${size}-byte export`);
    }
    if (c.align > 1 && t !== P.CMD_BLOCK_STATUS && (r.offset % c.align || r.length % c.align)) {
      return fail(c, r, P.NBD_EINVAL, `request [${r.offset}, +${r.length}) is not aligned to ${c.align} bytes`);
    }
  }
  const fua = (r.flags & P.CMD_FLAG_FUA) !== 0;
  switch (t) {
    case P.CMD_READ:
      if (r.length > P.MAX_PAYLOAD) return fail(c, r, c.structured ? P.NBD_EOVERFLOW : P.NBD_EINVAL, `read of ${r.length} bytes exceeds the maximum payload of ${P.MAX_PAYLOAD}`);
      if (r.length === 0) return ok(c, r);
      // A range last seen as data skips the status query (reading data is never wrong).
      if (c.structured && !(r.flags & P.CMD_FLAG_DF) && !exp.knownData(r.offset, r.length)) return void sparseRead(c, r);
      if (r.length >= SENDFILE_MIN && c.sendq.read(r, plainRead)) return;
      return plainRead(r);
    case P.CMD_WRITE:
      return exp.io.writev(r.offset, r.length, r.iov, fua ? ReqFlags.FUA : 0, r.rwDone);
    case P.CMD_FLUSH:
      return void exp.io.flush().then(r.opOk, r.opFail);
    case P.CMD_TRIM: {
      const p = exp.io.discard(r.offset, r.length);
      return void (fua ? p.then(() => exp.io.flush()) : p).then(r.opOk, r.opFail);
    }
    case P.CMD_WRITE_ZEROES: {
      const unmap = !(r.flags & P.CMD_FLAG_NO_HOLE);
      const p = r.flags & P.CMD_FLAG_FAST_ZERO ? exp.fastZeroes(r.offset, r.length, unmap) : exp.io.writeZeroes(r.offset, r.length, unmap);
      return void (fua ? p.then(() => exp.io.flush()) : p).then(r.opOk, r.opFail);
    }
    case P.CMD_CACHE:
      // Advisory: warm the first MAX_PAYLOAD bytes (page cache, format metadata).
      r.length = Math.min(r.length, P.MAX_PAYLOAD);
      if (r.length === 0) return ok(c, r);
      return plainRead(r);
    case P.CMD_BLOCK_STATUS:
      if (!c.structured || !(c.metaBase || c.metaDepth)) return fail(c, r, P.NBD_EINVAL, 'no metadata context was selected');
      if (r.length === 0) return fail(c, r, P.NBD_EINVAL, 'block status of 0 bytes');
      return exp.whenUndrained(() => void blockStatus(c, r));
    default:
      return fail(c, r, P.NBD_EINVAL, `unknown command ${t}`);
  }
}

function fail(c: NbdConn, r: Req, errno: number, msg: string): void {
  c.out.replyError(r, errno, msg);
  c.finish(r);
}
function ok(c: NbdConn, r: Req): void {
  if (!c.closed) c.out.replyOk(r);
  c.finish(r);
}

/** One read into a pooled buffer, answered from it in place. */
function plainRead(r: Req): void {
  const c = r.conn;
  const buf = getReplyBuffer(r.length);
  r.buf = buf;
  r.held = r.length;
  c.held += r.length;
  r.iov.push(buf.subarray(DATA_HEADROOM, DATA_HEADROOM + r.length));
  r.exp.io.readv(r.offset, r.length, r.iov, 0, r.rwDone);
}

interface Segment {
  offset: number;
  bytes: number;
  hole: boolean;
}

/** A structured read that sends ranges reading as zeroes as OFFSET_HOLE chunks. */
async function sparseRead(c: NbdConn, r: Req): Promise<void> {
  const exp = r.exp;
  const end = r.offset + r.length;
  const segs: Segment[] = [];
  try {
    for (let pos = r.offset; pos < end; ) {
      if (segs.length === MAX_READ_SEGMENTS) {
        segs.push({ offset: pos, bytes: end - pos, hole: false });
        break;
      }
      // Ask past the request (up to STATUS_AHEAD) so later reads in the same data run skip it.
      const st = exp.drained ? null : await exp.blockStatus(pos, Math.min(exp.size, Math.max(end, pos + STATUS_AHEAD)) - pos);
      const n = st ? Math.min(st.bytes, end - pos) : end - pos;
      if (n <= 0) throw new Error('no progress');
      const hole = st !== null && st.zero;
      if (st && !hole) exp.sawData(pos, st.bytes);
      const last = segs[segs.length - 1];
      if (last && last.hole === hole) last.bytes += n;
      else segs.push({ offset: pos, bytes: n, hole });
      pos += n;
      if (!st) break;
    }
  } catch {
    // Status is an optimisation: read it all.
    segs.length = 0;
    segs.push({ offset: r.offset, bytes: r.length, hole: false });
  }
  if (segs.length === 1 && !segs[0]!.hole) return plainRead(r);
  if (c.closed) return ok(c, r);

  const buf = getReplyBuffer(r.length);
  r.held = r.length;
  c.held += r.length;
  let pending = 1;
  let err: unknown = null;
  const step = (e: unknown): void => {
    if (e && !err) err = e;
    if (--pending > 0) return;
    if (c.closed) return finishSparse(c, r, buf);
    if (err) {
      c.out.replyBlockError(r, err);
      return finishSparse(c, r, buf);
    }
    sendSegments(c, r, segs, buf);
  };
  for (const s of segs) {
    if (s.hole) continue;
    pending++;
    const at = DATA_HEADROOM + s.offset - r.offset;
    exp.io.readv(s.offset, s.bytes, [buf.subarray(at, at + s.bytes)], 0, step);
  }
  step(null);
}

function finishSparse(c: NbdConn, r: Req, buf: Buffer): void {
  putReplyBuffer(buf);
  c.finish(r);
}

/** Sends the chunks in offset order, DONE on the last. */
function sendSegments(c: NbdConn, r: Req, segs: Segment[], buf: Buffer): void {
  const n = segs.length;
  let lastData = -1;
  for (let i = 0; i < n; i++) if (!segs[i]!.hole) lastData = i;
  for (let i = 0; i < n; i++) {
    const s = segs[i]!;
    const flags = i === n - 1 ? P.REPLY_FLAG_DONE : 0;
    const h = Buffer.allocUnsafe(s.hole ? 32 : 28);
    c.out.chunkHeader(h, 0, r, flags, s.hole ? P.REPLY_TYPE_OFFSET_HOLE : P.REPLY_TYPE_OFFSET_DATA, s.hole ? 12 : 8 + s.bytes);
    h.writeUInt32BE(Math.floor(s.offset / 0x100000000), 20);
    h.writeUInt32BE(s.offset >>> 0, 24);
    if (s.hole) {
      h.writeUInt32BE(s.bytes, 28);
      c.out.sendFramed(h);
    } else {
      c.out.sendFramed(h);
      const at = DATA_HEADROOM + s.offset - r.offset;
      // The buffer goes back to the pool once its last piece is written.
      c.out.sendFramed(buf.subarray(at, at + s.bytes), i === lastData ? () => putReplyBuffer(buf) : undefined);
    }
  }
  if (lastData < 0) putReplyBuffer(buf);
  c.finish(r);
}

/** Extents of one context over the request, as a BLOCK_STATUS chunk payload after the header. */
async function extents(r: Req, context: number, reqOne: boolean): Promise<number[]> {
  const exp = r.exp;
  const out: number[] = [];
  const end = r.offset + r.length;
  for (let pos = r.offset; pos < end && out.length < 2 * MAX_EXTENTS; ) {
    let n: number;
    let flags: number;
    if (context === CONTEXT_BASE) {
      const st = await exp.blockStatus(pos, end - pos);
      n = st.bytes;
      flags = (st.data ? 0 : P.STATE_HOLE) | (st.zero ? P.STATE_ZERO : 0);
      // The client will read what it was told is data: those reads need no query of their own.
      if (st.data && !st.zero) exp.sawData(pos, n);
    } else {
      const d = await exp.depth(pos, end - pos);
      n = d.bytes;
      flags = d.depth;
    }
    n = Math.min(n, end - pos);
    if (n <= 0) break;
    if (out.length && out[out.length - 1] === flags) out[out.length - 2]! += n;
    else out.push(n, flags);
    pos += n;
    if (reqOne) break;
  }
  return out;
}

async function blockStatus(c: NbdConn, r: Req): Promise<void> {
  const reqOne = (r.flags & P.CMD_FLAG_REQ_ONE) !== 0;
  const contexts: number[] = [];
  if (c.metaBase) contexts.push(CONTEXT_BASE);
  if (c.metaDepth) contexts.push(CONTEXT_DEPTH);
  try {
    const lists: number[][] = [];
    for (const ctx of contexts) lists.push(await extents(r, ctx, reqOne));
    if (c.closed) return c.finish(r);
    let size = 0;
    for (const l of lists) size += P.CHUNK_HEADER + 4 + 4 * l.length;
    const b = Buffer.allocUnsafe(size);
    let o = 0;
    lists.forEach((l, i) => {
      const len = 4 + 4 * l.length;
      c.out.chunkHeader(b, o, r, i === lists.length - 1 ? P.REPLY_FLAG_DONE : 0, P.REPLY_TYPE_BLOCK_STATUS, len);
      b.writeUInt32BE(contexts[i]!, o + 20);
      for (let k = 0; k < l.length; k++) b.writeUInt32BE(l[k]!, o + 24 + 4 * k);
      o += P.CHUNK_HEADER + len;
    });
    c.out.sendFramed(b);
  } catch (e) {
    c.out.replyBlockError(r, e);
  }
  c.finish(r);
}
