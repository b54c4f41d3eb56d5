/**
 * Buffers of the NBD server: the input queue a connection parses from, the pooled read-reply
 * buffers, and the staging slab small replies are packed into.
 *
 * - ByteQueue keeps the socket's chunks as they came; headers are read in place (or copied
 *   into a scratch buffer when split across chunks), write payloads are handed to the block
 *   layer as subarrays of those chunks (an iovec, no copy).
 * - Reply buffers come in power-of-two size classes with room for a reply header in front,
 *   so a read lands where it is sent from: header and data go out in one socket write.
 * - ReplySlab packs small complete replies (16-byte simple replies, error chunks) one after
 *   another; the owner writes the packed run once per tick.
 */

export class ByteQueue {
  readonly chunks: Buffer[] = [];
  /** Offset of the first unread byte in chunks[0]. */
  first = 0;
  avail = 0;

  push(b: Buffer): void {
    if (b.length === 0) return;
    this.chunks.push(b);
    this.avail += b.length;
  }

  /**
   * Returns a buffer holding the next `n` bytes at the returned offset `pos` (set on the
   * queue as `at`): chunks[0] itself when it has them, else `scratch` after a copy. Consumes.
   */
  at = 0;
  take(n: number, scratch: Buffer): Buffer {
    const c = this.chunks[0]!;
    if (c.length - this.first >= n) {
      this.at = this.first;
      this.#consume(n);
      return c;
    }
    this.copyOut(scratch, n);
    this.at = 0;
    return scratch;
  }

  /** Copies and consumes `n` bytes into dst[0..n). */
  copyOut(dst: Buffer, n: number): void {
    let done = 0;
    while (done < n) {
      const c = this.chunks[0]!;
      const k = Math.min(n - done, c.length - this.first);
      c.copy(dst, done, this.first, this.first + k);
      done += k;
      this.#consume(k);
    }
  }

  /** Consumes `n` bytes as subarrays of the received chunks, appended to `out` (no copy). */
  segments(n: number, out: Uint8Array[]): void {
    while (n > 0) {
      const c = this.chunks[0]!;
      const k = Math.min(n, c.length - this.first);
      out.push(this.first === 0 && k === c.length ? c : c.subarray(this.first, this.first + k));
      n -= k;
      this.#consume(k);
    }
  }

  /** Consumes up to `n` bytes; returns how many. */
  skip(n: number): number {
    let done = 0;
    while (done < n && this.avail > 0) {
      const c = this.chunks[0]!;
      const k = Math.min(n - done, c.length - this.first);
      done += k;
      this.#consume(k);
    }
    return done;
  }

  clear(): void {
    this.chunks.length = 0;
    this.first = 0;
    this.avail = 0;
  }

  #consume(k: number): void {
    this.first += k;
    this.avail -= k;
    if (this.first === this.chunks[0]!.length) {
      this.chunks.shift();
      this.first = 0;
    }
  }
}

/** Bytes in front of read data: a structured OFFSET_DATA chunk header (20 + 8 offset). */
export const DATA_HEADROOM = 28;
const MIN_CLASS = 12; // 4 KiB
const MAX_CLASS = 25; // 32 MiB
/** Bytes kept per size class once returned (the rest goes to the garbage collector). */
const KEEP_PER_CLASS = 32 << 20;
const free: Buffer[][] = [];
for (let k = 0; k <= MAX_CLASS; k++) free.push([]);

function classOf(bytes: number): number {
  let k = MIN_CLASS;
  while (1 << k < bytes) k++;
  return k;
}

/** A buffer with DATA_HEADROOM + `bytes` usable bytes, from the pool when one is free. */
export function getReplyBuffer(bytes: number): Buffer {
  const k = classOf(bytes);
  if (k > MAX_CLASS) return Buffer.allocUnsafe(DATA_HEADROOM + bytes);
  return free[k]!.pop() ?? Buffer.allocUnsafe(DATA_HEADROOM + (1 << k));
}

/** Returns a buffer from getReplyBuffer once nothing refers to it (its socket write is done). */
export function putReplyBuffer(b: Buffer): void {
  const size = b.length - DATA_HEADROOM;
  if (size & (size - 1) || size < 1 << MIN_CLASS || size > 1 << MAX_CLASS) return;
  const k = classOf(size);
  const list = free[k]!;
  if ((list.length + 1) * size <= Math.max(KEEP_PER_CLASS, 4 * size)) list.push(b);
}

const SLAB = 64 << 10;

/** Packs small replies; `flush` hands out the packed run for one socket write. */
export class ReplySlab {
  #buf = Buffer.allocUnsafe(SLAB);
  #start = 0;
  #pos = 0;

  /** Space for `n` more bytes; returns the buffer to write into at `pos`. */
  reserve(n: number, flush: (run: Buffer) => void): Buffer {
    if (this.#pos + n > this.#buf.length) {
      if (this.#pos > this.#start) flush(this.take()!);
      this.#buf = Buffer.allocUnsafe(Math.max(SLAB, n));
      this.#start = this.#pos = 0;
    }
    return this.#buf;
  }
  get pos(): number {
    return this.#pos;
  }
  commit(n: number): void {
    this.#pos += n;
  }
  /** The packed run since the last take (null if none); the slab never reuses those bytes. */
  take(): Buffer | null {
    if (this.#pos === this.#start) return null;
    const run = this.#buf.subarray(this.#start, this.#pos);
    this.#start = this.#pos;
    return run;
  }
}
