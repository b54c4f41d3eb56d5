/**
 * Read replies sent from the page cache. For an export whose node is a plain host file
 * (host-file.ts), a large read whose pages are all cached goes out as its reply header and a
 * sendfile from the file: no copy into a reply buffer and back out, which is most of what a
 * read costs the server (see bench/nbd-bench.mjs).
 *
 * A reply must not interleave with one Node is still writing, so a connection sends this way
 * only while nothing of its own is queued in Node's socket. When the kernel's socket buffer
 * fills, the part of the reply it did not take is read into a buffer and queued in Node, and
 * the reads that come meanwhile wait here, in order, for that write to finish; so only the tail
 * of one reply per full buffer is copied. Whatever cannot be sent this way takes the plain path
 * (a read into a reply buffer).
 *
 * Context: main loop.
 */
import { readSync } from 'node:fs';
import { Acct, acctNow } from '../../backend/stats.js';
import { sendFileRange } from '../../native/unix-fd.js';
import type { NbdConn, Req } from './conn.js';
import * as P from './protocol.js';

/** Reads smaller than this take the plain path: the syscalls cost more than the copy saves. */
export const SENDFILE_MIN = 64 << 10;

const ENOSYS = 38;
const EAGAIN = 11;
/** False once the kernel said it cannot tell what is cached (before Linux 6.5). */
let kernelCanTell = true;
const head = Buffer.alloc(P.CHUNK_HEADER + 8);

/** What this path did, process-wide (tests and debugging): replies sent, of those the ones
 * whose tail went through Node, reads that waited for a tail, reads handed to the plain path. */
export const sendfileCounts = { replies: 0, tails: 0, waited: 0, plain: 0 };

/** Node's handle of a socket: its fd and libuv's queued bytes (not a public API). */
interface StreamHandle {
  fd?: number;
  writeQueueSize?: number;
}

/** One connection's sendfile state. */
export class SendfileQueue {
  /** Reads waiting for a reply's queued rest to be written. */
  readonly #waiting: Req[] = [];
  /** A reply's rest is queued in Node's socket. */
  #blocked = false;
  #plain: (r: Req) => void = () => undefined;

  constructor(private readonly c: NbdConn) {}

  /** Takes READ `r` (sent now, or waiting its turn); false when it must take `plain`. */
  read(r: Req, plain: (r: Req) => void): boolean {
    const fd = kernelCanTell ? r.exp.sendFileFd() : -1;
    if (fd < 0) return false;
    this.#plain = plain;
    if (this.#blocked) {
      sendfileCounts.waited++;
      this.#waiting.push(r);
      return true;
    }
    return this.#send(r, fd);
  }

  /** The connection closed: the waiting reads are answered nowhere. */
  drop(): void {
    for (const r of this.#waiting.splice(0)) this.c.finish(r);
  }

  /** Sends r's reply from file `fd` (-1: not now), all or its head; false when nothing was sent. */
  #send(r: Req, fd: number): boolean {
    const c = this.c;
    const sock = c.socket;
    const h = (sock as unknown as { _handle?: StreamHandle })._handle;
    const sfd = h?.fd;
    if (fd < 0 || typeof sfd !== 'number' || sfd < 0 || h!.writeQueueSize !== 0 || sock.writableLength !== 0 || sock.writableCorked) return false;
    const n = writeHeader(c, r);
    const start = acctNow();
    let sent = sendFileRange(sfd, head.subarray(0, n), fd, r.offset, r.length);
    if (sent === -EAGAIN) sent = 0; // the socket is full: all of it waits in Node
    if (sent < 0) {
      if (sent === -ENOSYS) kernelCanTell = false;
      return false;
    }
    let failed = false;
    sendfileCounts.replies++;
    if (sent < n + r.length) {
      sendfileCounts.tails++;
      failed = !this.#queueRest(r, fd, n, sent);
      this.#blocked = !failed;
    }
    r.exp.backend.stats.done(Acct.READ, r.offset, r.length, start, failed);
    c.finish(r);
    return true;
  }

  /**
   * Queues the part of the reply the socket did not take: the rest of the header and of the
   * data, read now (it was all cached a moment ago). Past the end of a file that shrank
   * meanwhile it reads as zeroes, as the file driver's reads do. A read error cannot be
   * reported once the reply has begun: the connection is dropped, and false returned.
   */
  #queueRest(r: Req, fd: number, n: number, sent: number): boolean {
    const rest = Buffer.allocUnsafe(n + r.length - sent);
    const headLeft = Math.max(0, n - sent);
    if (headLeft) head.copy(rest, 0, sent, n);
    const from = r.offset + Math.max(0, sent - n);
    let at = headLeft;
    try {
      while (at < rest.length) {
        const k = readSync(fd, rest, at, rest.length - at, from + at - headLeft);
        if (k === 0) break;
        at += k;
      }
    } catch {
      this.c.abort();
      return false;
    }
    rest.fill(0, at);
    this.c.socket.write(rest, this.#restWritten);
    return true;
  }

  /** The rest is in the kernel (or the socket failed): the waiting reads go, in order. */
  readonly #restWritten = (): void => {
    this.#blocked = false;
    while (this.#waiting.length && !this.#blocked) {
      const r = this.#waiting.shift()!;
      if (this.c.closed) this.c.finish(r);
      else if (!this.#send(r, r.exp.sendFileFd())) {
        sendfileCounts.plain++;
        this.#plain(r);
      }
    }
  };
}

/** The reply header for r in `head`; its length. */
function writeHeader(c: NbdConn, r: Req): number {
  if (c.structured) {
    c.out.chunkHeader(head, 0, r, P.REPLY_FLAG_DONE, P.REPLY_TYPE_OFFSET_DATA, 8 + r.length);
    head.writeUInt32BE(Math.floor(r.offset / 0x100000000), 20);
    head.writeUInt32BE(r.offset >>> 0, 24);
    return P.CHUNK_HEADER + 8;
  }
  head.writeUInt32BE(P.SIMPLE_REPLY_MAGIC, 0);
  head.writeUInt32BE(0, 4);
  head.writeUInt32BE(r.cookieHi, 8);
  head.writeUInt32BE(r.cookieLo, 12);
  return P.SIMPLE_REPLY_HEADER;
}
