/**
 * NbdConn: one client connection, from greeting to close.
 *
 *   socket 'data' ─> ByteQueue ─> pump ─┬─ handshake: option header + data ─> handleOption
 *                                       └─ transmission: 28-byte request header
 *                                            ├─ WRITE: wait for the payload, hand its chunks
 *                                            │   to the backend as an iovec (no copy)
 *                                            └─ dispatch (commands.ts) ─> BackendIO / export
 *   completion ─> reply: small ones packed into the ReplySlab (one socket write per tick),
 *                 read data straight from the pooled buffer it was read into
 *
 * Requests run concurrently and reply in completion order (cookies match them up). The
 * connection stops reading while too many requests or bytes are held (MAX_REQS, MAX_HELD) or
 * the socket's output backs up, and reads on once below. A closed socket never stops
 * requests already issued: they finish, their replies are dropped, and only then does the
 * export hear that the client is gone.
 *
 * Context: main loop.
 */
import type { Socket } from 'node:net';
import type { BlockError } from '../../block/error.js';
import type { IoCallback } from '../../block/types.js';
import { ByteQueue, putReplyBuffer } from './buffers.js';
import { dispatch } from './commands.js';
import type { ExportClient, NbdExport } from './export.js';
import { handleOption, type Negotiator } from './handshake.js';
import * as P from './protocol.js';
import { ReplyWriter } from './replies.js';
import { SendfileQueue } from './sendfile.js';

/** Requests in flight per connection before it stops reading. */
export const MAX_REQS = 256;
/** Bytes (write payloads, read buffers, queued output) held per connection before it stops reading. */
export const MAX_HELD = 64 << 20;

const enum St { FLAGS, OPT_HDR, OPT_DATA, REQ_HDR, WRITE_DATA, SKIP, DONE }

/** What a connection needs of its server. */
export interface ConnHost {
  findExport(name: string): NbdExport | undefined;
  listExports(): NbdExport[];
  readonly shuttingDown: boolean;
  /** A client still negotiating after this long is dropped (0: never). */
  readonly handshakeMs: number;
  connGone(c: NbdConn): void;
}

/** A request in flight; pooled, its completions bound once. */
export class Req {
  conn: NbdConn = null!;
  exp: NbdExport = null!;
  cookieHi = 0;
  cookieLo = 0;
  type = 0;
  flags = 0;
  /** -1 when the 64-bit offset is beyond any export. */
  offset = 0;
  length = 0;
  /** Pooled read buffer (data at DATA_HEADROOM). */
  buf: Buffer | null = null;
  /** Bytes this request holds (payload or read buffer). */
  held = 0;
  readonly iov: Uint8Array[] = [];
  readonly rwDone: IoCallback = (err) => this.conn.rwDone(this, err);
  readonly opOk = (): void => this.conn.opDone(this, null);
  readonly opFail = (e: unknown): void => this.conn.opDone(this, e);
}
const reqPool: Req[] = [];

const noop = (): void => undefined;

export class NbdConn implements Negotiator, ExportClient {
  fixedNewstyle = false;
  noZeroes = false;
  structured = false;
  metaExport: string | null = null;
  metaBase = false;
  metaDepth = false;
  inFlight = 0;
  held = 0;
  /** Alignment the client agreed to (NBD_INFO_BLOCK_SIZE in GO); 1 = none enforced. */
  align = 1;
  exp: NbdExport | null = null;
  closed = false;
  #st = St.FLAGS;
  readonly #q = new ByteQueue();
  readonly #scratch = Buffer.allocUnsafe(P.REQUEST_HEADER);
  #opt = 0;
  #optLen = 0;
  #cur: Req | null = null;
  #skipLeft = 0;
  #ending = false;
  #paused = false;
  #gone = false;
  readonly out: ReplyWriter;
  readonly sendq = new SendfileQueue(this);
  #handshakeTimer: NodeJS.Timeout | null = null;

  constructor(readonly socket: Socket, readonly host: ConnHost) {
    this.out = new ReplyWriter(this);
    socket.setNoDelay(true);
    socket.on('data', this.#onData);
    socket.on('error', noop);
    socket.on('close', this.#onClose);
    socket.on('drain', this.#onDrain);
    const hello = Buffer.alloc(18);
    hello.writeBigUInt64BE(P.NBDMAGIC, 0);
    hello.writeBigUInt64BE(P.IHAVEOPT, 8);
    hello.writeUInt16BE(P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES, 16);
    socket.write(hello);
    if (host.handshakeMs > 0) {
      this.#handshakeTimer = setTimeout(this.#handshakeExpired, host.handshakeMs);
      this.#handshakeTimer.unref();
    }
  }

  readonly #handshakeExpired = (): void => {
    this.#handshakeTimer = null;
    if (this.exp === null) this.abort();
  };

  readonly #onData = (chunk: Buffer): void => {
    this.#q.push(chunk);
    this.#safePump();
  };

  #safePump(): void {
    try {
      this.#pump();
    } catch (e) {
      // A bug must cost this client, never the server.
      process.emitWarning(`nbd: dropping a client after an internal error: ${e instanceof Error ? e.stack : String(e)}`);
      this.abort();
    }
  }

  readonly #onDrain = (): void => this.#maybeResume();

  readonly #onClose = (): void => {
    this.closed = true;
    if (this.#handshakeTimer) clearTimeout(this.#handshakeTimer);
    this.#st = St.DONE;
    this.#q.clear();
    const cur = this.#cur;
    this.#cur = null;
    if (cur) this.finish(cur); // a write whose payload never came
    this.sendq.drop();
    this.#maybeGone();
  };

  // ---- Negotiator -------------------------------------------------------------------------
  findExport(name: string): NbdExport | undefined {
    return this.host.findExport(name);
  }
  listExports(): NbdExport[] {
    return this.host.listExports();
  }
  shuttingDown(): boolean {
    return this.host.shuttingDown;
  }
  optReply(opt: number, type: number, payload?: Buffer): void {
    const len = payload ? payload.length : 0;
    const b = Buffer.allocUnsafe(20 + len);
    b.writeUInt32BE(P.REP_MAGIC_HI, 0);
    b.writeUInt32BE(P.REP_MAGIC_LO, 4);
    b.writeUInt32BE(opt, 8);
    b.writeUInt32BE(type >>> 0, 12);
    b.writeUInt32BE(len, 16);
    if (payload) payload.copy(b, 20);
    this.socket.write(b);
  }
  sendRaw(b: Buffer): void {
    this.socket.write(b);
  }
  enterTransmission(exp: NbdExport, align: number): void {
    this.exp = exp;
    this.align = align;
    if (this.#handshakeTimer) clearTimeout(this.#handshakeTimer);
    this.#handshakeTimer = null;
    if (this.metaExport !== exp.name) this.metaBase = this.metaDepth = false;
    exp.clients.add(this);
    this.#st = St.REQ_HDR;
  }
  endSession(hard: boolean): void {
    this.#st = St.DONE;
    if (hard) this.socket.destroy();
    else this.socket.end();
  }

  // ---- ExportClient -----------------------------------------------------------------------
  /** Hard disconnect: in-flight requests finish, their replies go nowhere. */
  abort(): void {
    this.socket.destroy();
  }

  /**
   * Server shutdown: no new requests; a write still waiting for its payload fails with
   * ESHUTDOWN, and the socket ends once the requests in flight are answered.
   */
  shutdown(): void {
    if (this.exp === null || this.closed) return this.abort();
    this.#ending = true;
    this.socket.pause();
    const cur = this.#cur;
    this.#cur = null;
    if (cur) {
      this.out.replyError(cur, P.NBD_ESHUTDOWN, 'server is shutting down');
      this.finish(cur);
    }
    this.#maybeEnd();
  }

  // ---- input ------------------------------------------------------------------------------
  #pump(): void {
    const q = this.#q;
    for (;;) {
      if (this.closed || this.#ending) return;
      switch (this.#st) {
        case St.FLAGS: {
          if (q.avail < 4) return;
          const b = q.take(4, this.#scratch);
          const flags = b.readUInt32BE(q.at);
          // "the server MUST drop the TCP connection if the client sets an unknown flag"
          if (flags & ~(P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES)) return this.endSession(true);
          this.fixedNewstyle = (flags & P.FLAG_C_FIXED_NEWSTYLE) !== 0;
          this.noZeroes = (flags & P.FLAG_C_NO_ZEROES) !== 0;
          this.#st = St.OPT_HDR;
          break;
        }
        case St.OPT_HDR: {
          if (q.avail < 16) return;
          const b = q.take(16, this.#scratch);
          const o = q.at;
          if (b.readUInt32BE(o) !== P.IHAVEOPT_HI || b.readUInt32BE(o + 4) !== P.IHAVEOPT_LO) return this.endSession(true);
          this.#opt = b.readUInt32BE(o + 8);
          this.#optLen = b.readUInt32BE(o + 12);
          if (this.#optLen > P.MAX_OPTION_DATA) return this.endSession(true);
          this.#st = St.OPT_DATA;
          break;
        }
        case St.OPT_DATA: {
          if (q.avail < this.#optLen) return;
          const data = Buffer.allocUnsafe(this.#optLen);
          q.copyOut(data, this.#optLen);
          this.#st = St.OPT_HDR;
          handleOption(this, this.#opt, data);
          break;
        }
        case St.REQ_HDR:
          if (this.#overLimit()) return this.#pause();
          if (q.avail < P.REQUEST_HEADER) return;
          this.#header();
          break;
        case St.WRITE_DATA: {
          const r = this.#cur!;
          if (q.avail < r.length) return;
          q.segments(r.length, r.iov);
          this.#cur = null;
          this.#st = St.REQ_HDR;
          dispatch(this, r);
          break;
        }
        case St.SKIP:
          this.#skipLeft -= q.skip(this.#skipLeft);
          if (this.#skipLeft > 0) return;
          this.#st = St.REQ_HDR;
          break;
        case St.DONE:
          return;
      }
    }
  }

  #header(): void {
    const q = this.#q;
    const b = q.take(P.REQUEST_HEADER, this.#scratch);
    const o = q.at;
    // Garbage: nothing after it can be framed again.
    if (b.readUInt32BE(o) !== P.REQUEST_MAGIC) return this.endSession(true);
    const r = reqPool.pop() ?? new Req();
    r.conn = this;
    r.exp = this.exp!;
    r.flags = b.readUInt16BE(o + 4);
    r.type = b.readUInt16BE(o + 6);
    r.cookieHi = b.readUInt32BE(o + 8);
    r.cookieLo = b.readUInt32BE(o + 12);
    const hi = b.readUInt32BE(o + 16);
    r.offset = hi < 0x200000 ? hi * 0x100000000 + b.readUInt32BE(o + 20) : -1;
    r.length = b.readUInt32BE(o + 24);
    r.held = 0;
    this.inFlight++;
    if (r.type === P.CMD_DISC) {
      this.finish(r);
      this.#ending = true;
      this.socket.pause();
      this.#maybeEnd();
      return;
    }
    if (r.type !== P.CMD_WRITE) return dispatch(this, r);
    if (r.length > P.MAX_PAYLOAD) {
      // Answer now and skip the payload without holding it: the stream stays framed.
      this.out.replyError(r, P.NBD_EINVAL, `write of ${r.length} bytes exceeds the maximum payload of ${P.MAX_PAYLOAD}`);
      this.#skipLeft = r.length;
      this.#st = St.SKIP;
      return this.finish(r);
    }
    r.held = r.length;
    this.held += r.length;
    this.#cur = r;
    this.#st = St.WRITE_DATA;
  }

  #overLimit(): boolean {
    return this.inFlight >= MAX_REQS || this.held >= MAX_HELD || this.socket.writableLength >= MAX_HELD;
  }
  #pause(): void {
    if (this.#paused) return;
    this.#paused = true;
    this.socket.pause();
  }
  #maybeResume(): void {
    if (!this.#paused || this.closed || this.#ending || this.#overLimit()) return;
    this.#paused = false;
    this.socket.resume();
    this.#safePump();
  }

  // ---- completion -------------------------------------------------------------------------
  /** Completion of a READ, CACHE or WRITE issued through the BackendIO. */
  rwDone(r: Req, err: BlockError | null): void {
    if (r.type === P.CMD_WRITE) r.iov.length = 0;
    if (this.closed) return this.finish(r);
    if (err) {
      this.out.replyBlockError(r, err);
      return this.finish(r);
    }
    if (r.type !== P.CMD_READ) {
      this.out.replyOk(r);
      return this.finish(r);
    }
    this.out.sendData(r, r.buf!, r.offset, r.length, true);
    r.buf = null; // the socket holds it now; it returns to the pool once written
    this.finish(r);
  }

  /** Completion of a promise-based operation. */
  opDone(r: Req, e: unknown): void {
    if (!this.closed) {
      if (e) this.out.replyBlockError(r, e);
      else this.out.replyOk(r);
    }
    this.finish(r);
  }

  /** The request is answered (or its answer dropped): release what it holds. */
  finish(r: Req): void {
    this.inFlight--;
    this.held -= r.held;
    if (r.buf) putReplyBuffer(r.buf);
    r.buf = null;
    r.iov.length = 0;
    r.conn = null!;
    r.exp = null!;
    reqPool.push(r);
    if (this.closed) return this.#maybeGone();
    if (this.#ending) return this.#maybeEnd();
    if (this.#paused) this.#maybeResume();
  }

  #maybeEnd(): void {
    if (this.inFlight > 0 || this.closed || this.#st === St.DONE) return;
    this.#st = St.DONE;
    this.out.schedule();
    process.nextTick(this.#endNow); // after the staged replies' flush
  }
  readonly #endNow = (): void => void this.socket.end();

  #maybeGone(): void {
    if (this.#gone || this.inFlight > 0) return;
    this.#gone = true;
    this.exp?.clientGone(this);
    this.host.connGone(this);
  }
}
