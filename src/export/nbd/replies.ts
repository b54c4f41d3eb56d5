/**
 * ReplyWriter: how a connection's replies reach its socket ("Simple reply message",
 * "Structured reply chunk message" in specs/nbd-proto.md).
 *
 * Small complete replies (simple replies, NONE and ERROR chunks) are packed into a ReplySlab
 * and go out as one socket write per tick; read data goes out from the pooled buffer it was
 * read into, its header written in the headroom in front of it. The socket is corked from
 * the first reply of a tick to its end, so a tick's replies leave in one writev.
 *
 * Context: main loop.
 */
import type { Socket } from 'node:net';
import { BlockError } from '../../block/error.js';
import { DATA_HEADROOM, putReplyBuffer, ReplySlab } from './buffers.js';
import * as P from './protocol.js';

/** What the writer needs of the request it answers. */
export interface ReplyTo {
  type: number;
  cookieHi: number;
  cookieLo: number;
}

/** What the writer needs of its connection. */
export interface ReplyConn {
  readonly socket: Socket;
  readonly structured: boolean;
  readonly closed: boolean;
}

/** A read buffer on its way out; returns it to the pool when the socket is done (pooled, no closure). */
class Outgoing {
  buf: Buffer | null = null;
  readonly done = (): void => {
    putReplyBuffer(this.buf!);
    this.buf = null;
    outPool.push(this);
  };
}
const outPool: Outgoing[] = [];

export class ReplyWriter {
  #corked = false;
  readonly #slab = new ReplySlab();

  constructor(private readonly c: ReplyConn) {}

  schedule(): void {
    if (this.#corked) return;
    this.#corked = true;
    this.c.socket.cork();
    process.nextTick(this.#flushTick);
  }
  readonly #flushTick = (): void => {
    this.#corked = false;
    const run = this.#slab.take();
    if (run && !this.c.closed) this.c.socket.write(run);
    this.c.socket.uncork();
  };
  readonly #writeRun = (run: Buffer): void => void this.c.socket.write(run);

  /** Where the last #stage reserved its bytes. */
  #at = 0;
  /** Space for a small complete reply of `n` bytes in the slab; write at `#at`. */
  #stage(n: number): Buffer {
    this.schedule();
    const b = this.#slab.reserve(n, this.#writeRun);
    this.#at = this.#slab.pos;
    this.#slab.commit(n);
    return b;
  }

  /** Writes a structured chunk header at b[o..o+20). */
  chunkHeader(b: Buffer, o: number, r: ReplyTo, flags: number, type: number, len: number): void {
    b.writeUInt32BE(P.STRUCTURED_REPLY_MAGIC, o);
    b.writeUInt16BE(flags, o + 4);
    b.writeUInt16BE(type, o + 6);
    b.writeUInt32BE(r.cookieHi, o + 8);
    b.writeUInt32BE(r.cookieLo, o + 12);
    b.writeUInt32BE(len, o + 16);
  }

  /** Success without payload: a simple reply, or NONE for a structured read. */
  replyOk(r: ReplyTo): void {
    if (this.c.structured && r.type === P.CMD_READ) {
      const b = this.#stage(P.CHUNK_HEADER);
      const o = this.#at;
      return this.chunkHeader(b, o, r, P.REPLY_FLAG_DONE, P.REPLY_TYPE_NONE, 0);
    }
    const b = this.#stage(P.SIMPLE_REPLY_HEADER);
    const o = this.#at;
    b.writeUInt32BE(P.SIMPLE_REPLY_MAGIC, o);
    b.writeUInt32BE(0, o + 4);
    b.writeUInt32BE(r.cookieHi, o + 8);
    b.writeUInt32BE(r.cookieLo, o + 12);
  }

  /** An error: a structured ERROR chunk with a message when negotiated, else a simple reply. */
  replyError(r: ReplyTo, errno: number, msg: string): void {
    if (this.c.closed) return;
    if (!this.c.structured) {
      const b = this.#stage(P.SIMPLE_REPLY_HEADER);
      const o = this.#at;
      b.writeUInt32BE(P.SIMPLE_REPLY_MAGIC, o);
      b.writeUInt32BE(errno, o + 4);
      b.writeUInt32BE(r.cookieHi, o + 8);
      b.writeUInt32BE(r.cookieLo, o + 12);
      return;
    }
    const text = Buffer.from(msg.slice(0, 1024), 'utf8');
    const b = this.#stage(P.CHUNK_HEADER + 6 + text.length);
    const o = this.#at;
    this.chunkHeader(b, o, r, P.REPLY_FLAG_DONE, P.REPLY_TYPE_ERROR, 6 + text.length);
    b.writeUInt32BE(errno, o + 20);
    b.writeUInt16BE(text.length, o + 24);
    text.copy(b, o + 26);
  }

  replyBlockError(r: ReplyTo, e: unknown): void {
    if (e instanceof BlockError) this.replyError(r, P.nbdErrno(e.code), e.message);
    else this.replyError(r, P.NBD_EIO, e instanceof Error ? e.message : String(e));
  }

  /**
   * Sends `len` bytes of read data that sit at buf[DATA_HEADROOM..] as one reply (a simple
   * reply, or an OFFSET_DATA chunk), header written in place in front of the data. The
   * buffer returns to the pool once the socket is done with it.
   */
  sendData(r: ReplyTo, buf: Buffer, offset: number, len: number, done: boolean): void {
    this.schedule();
    let start: number;
    if (this.c.structured) {
      start = 0;
      this.chunkHeader(buf, 0, r, done ? P.REPLY_FLAG_DONE : 0, P.REPLY_TYPE_OFFSET_DATA, 8 + len);
      buf.writeUInt32BE(Math.floor(offset / 0x100000000), 20);
      buf.writeUInt32BE(offset >>> 0, 24);
    } else {
      start = DATA_HEADROOM - P.SIMPLE_REPLY_HEADER;
      buf.writeUInt32BE(P.SIMPLE_REPLY_MAGIC, start);
      buf.writeUInt32BE(0, start + 4);
      buf.writeUInt32BE(r.cookieHi, start + 8);
      buf.writeUInt32BE(r.cookieLo, start + 12);
    }
    const flushed = this.#slab.take(); // keep earlier staged replies ahead of this one
    if (flushed) this.c.socket.write(flushed);
    const out = outPool.pop() ?? new Outgoing();
    out.buf = buf;
    this.c.socket.write(buf.subarray(start, DATA_HEADROOM + len), out.done);
  }

  /** Writes an already framed reply (block status, sparse read chunks). */
  sendFramed(b: Uint8Array, cb?: () => void): void {
    if (this.c.closed) return;
    this.schedule();
    const flushed = this.#slab.take();
    if (flushed) this.c.socket.write(flushed);
    this.c.socket.write(b, cb);
  }
}
