/**
 * `img convert`: copy an image into a new (or, with -n, an existing) one.
 *
 * Block status is asked once per homogeneous extent of the source (up to 1 GiB at a time)
 * and the extent is cut locally into chunks: data chunks of up to 2 MiB ending on 2 MiB
 * boundaries (so whole target clusters), zero chunks as long as the extent. Up to -m chunks
 * are in flight. Ranges that read as zeroes (holes, or data blocks of -S bytes that are all
 * zero) are not written to a fresh target, which already reads as zeroes and so stays
 * sparse; with -n the target's old contents must go, so they become write-zeroes (punching
 * holes where the file system can). A qcow2 target gets zero blocks inside a cluster that
 * has data as data, so its writes stay whole clusters. Without -W, writes start in source
 * order, as qemu-img's do, while reads and the zero scan overlap them. As in qemu-img, the
 * target's cache mode defaults to unsafe (no flush at the end) and the source is read
 * through the thread pool.
 */
import { blockStatus } from '../../block/io.js';
import { getEngine } from '../../native/engine.js';
import { CliError } from '../fail.js';
import { ReqFlags } from '../../block/types.js';
import { checkCreatableFormat, createRawFile } from './create.js';
import { imgCreateQcow2 } from './create-qcow2.js';
import { checkCacheMode, openImage, type OpenImage } from './open.js';
import { Progress } from './progress.js';
import { parseCount } from './size.js';

export interface ConvertOptions {
  f?: string;
  O?: string;
  p?: boolean;
  q?: boolean;
  t?: string;
  T?: string;
  S?: string;
  n?: boolean;
  m?: string;
  W?: boolean;
  targetIsZero?: boolean;
  c?: boolean;
  o?: string[];
  forceShare?: boolean;
  /** -B: the new image's backing file (qcow2 targets); -F its format. */
  B?: string;
  F?: string;
}

/** Bytes copied per read and write (qemu-img's buffer size). */
const CHUNK = 2 << 20;
/** In-order writes in flight at once into a raw target in the page cache. */
const WRITE_DEPTH = 4;
/** The largest -S. */
const MAX_SPARSE = 2 << 20;
/**
 * Block status is asked for this much at once and split into chunks locally: one status
 * round trip per homogeneous extent, not one per chunk.
 */
const STATUS_SPAN = 1 << 30;
/** A chunk that reads as zeroes has nothing to read, so it may be this long. */
const ZERO_SPAN = 1 << 30;
const ZEROES = Buffer.alloc(CHUNK);


/** One unit of work: a range that is either data to copy or zeroes. */
interface Chunk {
  seq: number;
  offset: number;
  bytes: number;
  zero: boolean;
}

class Copier {
  #cursor = 0;
  #seq = 0;
  /** The source extent [#cursor, #extentEnd) that block status described, and whether it reads as zeroes. */
  #extentEnd = 0;
  #extentZero = false;
  /** A block status query in flight; other workers wait for it rather than ask again. */
  #fetching: Promise<void> | null = null;
  /** Every chunk before #nextStart has started writing, every one before #nextWrite is written. */
  #nextStart = 0;
  #nextWrite = 0;
  /** Chunks written while an earlier one was still in flight (write depth > 1). */
  #written = new Set<number>();
  #writeWaiters = new Map<number, () => void>();
  done = 0;
  /** The first failure; the other workers stop at their next step. */
  error: unknown = null;
  readonly zeroBlock: Buffer;

  constructor(
    readonly src: OpenImage,
    readonly dst: OpenImage,
    readonly size: number,
    readonly sparse: number,
    readonly targetIsZero: boolean,
    readonly ordered: boolean,
    readonly progress: Progress,
    /** Cluster size when writing compressed, else 0. */
    readonly compressUnit = 0,
    /** The target has a backing file: write only what differs from what it reads already. */
    readonly againstBacking = false,
    /**
     * The target's allocation unit (qcow2 clusters), else 0. Zero blocks that do not cover
     * whole units are written as data: the unit is allocated anyway, and the data writes
     * stay whole-cluster (the target's multi-cluster allocation path, no copy-on-write).
     */
    readonly targetUnit = 0,
    /** In-order writes that may be in flight at once (see imgConvert). */
    readonly writeDepth = 1,
  ) {
    this.zeroBlock = Buffer.alloc(Math.max(sparse, 1));
  }

  /** The next chunk. Only a worker that needs fresh block status waits for it. */
  async next(): Promise<Chunk | null> {
    for (;;) {
      while (this.#fetching) await this.#fetching;
      if (this.#cursor >= this.size || this.error) return null;
      if (this.#cursor < this.#extentEnd) return this.#cut();
      const p = this.#fetchStatus();
      this.#fetching = p;
      try {
        await p;
      } finally {
        this.#fetching = null;
      }
    }
  }

  async #fetchStatus(): Promise<void> {
    const offset = this.#cursor;
    if (this.sparse === 0 || this.compressUnit) {
      this.#extentEnd = this.size;
      this.#extentZero = false;
      return;
    }
    const st = await blockStatus(this.src.backend.root!, offset, Math.min(STATUS_SPAN, this.size - offset));
    // A driver that answers nothing useful: copy a chunk as data.
    const ok = st.bytes > 0;
    this.#extentEnd = Math.min(this.size, offset + (ok ? st.bytes : CHUNK));
    this.#extentZero = ok && st.zero;
  }

  /** Cuts the next chunk from the current extent; data chunks end on CHUNK boundaries. */
  #cut(): Chunk {
    const offset = this.#cursor;
    const zero = this.#extentZero;
    const end = zero && !this.againstBacking
      ? Math.min(this.#extentEnd, offset + ZERO_SPAN)
      : Math.min(this.#extentEnd, (Math.floor(offset / CHUNK) + 1) * CHUNK);
    this.#cursor = end;
    return { seq: this.#seq++, offset, bytes: end - offset, zero };
  }

  /**
   * Resolves when the chunk may be written (only without -W): writes start in source order,
   * each once the writes of all but the last `writeDepth - 1` chunks before it are done
   * (with a depth of 1, as qemu-img: once every chunk before it is written).
   */
  async turn(seq: number): Promise<void> {
    if (!this.ordered || this.error) return;
    if (!this.#mayStart(seq)) await new Promise<void>((r) => this.#writeWaiters.set(seq, r));
    if (this.error) return;
    this.#nextStart = seq + 1;
    this.#wakeNext();
  }

  #mayStart(seq: number): boolean {
    return seq === this.#nextStart && seq < this.#nextWrite + this.writeDepth;
  }

  #wakeNext(): void {
    const w = this.#writeWaiters.get(this.#nextStart);
    if (w && this.#mayStart(this.#nextStart)) {
      this.#writeWaiters.delete(this.#nextStart);
      w();
    }
  }

  written(c: Chunk): void {
    this.done += c.bytes;
    this.progress.update(this.done, this.size);
    if (!this.ordered) return;
    this.#written.add(c.seq);
    while (this.#written.delete(this.#nextWrite)) this.#nextWrite++;
    this.#wakeNext();
  }

  async zeroes(offset: number, bytes: number): Promise<void> {
    if (!this.targetIsZero) await this.dst.io.writeZeroes(offset, bytes, true);
  }

  /**
   * Splits buf[0, bytes) (guest bytes at `offset`) into runs of data and of all-zero blocks
   * of `sparse` bytes, as a flat list of [start, end, zero] triples. Done before the chunk's
   * turn to write, so in-order writes follow each other without a scan in between.
   */
  runs(buf: Buffer, offset: number, bytes: number): number[] {
    const S = this.sparse;
    if (S === 0) return [0, bytes, 0];
    const out: number[] = [];
    const zb = this.zeroBlock;
    for (let pos = 0; pos < bytes; pos += S) {
      const n = Math.min(S, bytes - pos);
      // A first or last byte that is not zero settles most data blocks without a memcmp.
      const zero = buf[pos] === 0 && buf[pos + n - 1] === 0 && buf.compare(zb, 0, n, pos, pos + n) === 0 ? 1 : 0;
      const k = out.length;
      if (k && out[k - 1] === zero) out[k - 2] = pos + n;
      else out.push(pos, pos + n, zero);
    }
    const T = this.targetUnit;
    if (T <= S || out.length === 3) return out;
    // Zero runs keep only the whole target units they cover; the rest joins the data.
    const merged: number[] = [];
    const push = (a: number, b: number, zero: number): void => {
      if (b <= a) return;
      const k = merged.length;
      if (k && merged[k - 1] === zero && merged[k - 2] === a) merged[k - 2] = b;
      else merged.push(a, b, zero);
    };
    for (let i = 0; i < out.length; i += 3) {
      const a = out[i]!, b = out[i + 1]!;
      if (!out[i + 2]) {
        push(a, b, 0);
        continue;
      }
      const za = Math.min(b, Math.ceil((offset + a) / T) * T - offset);
      const zbEnd = Math.max(za, Math.floor((offset + b) / T) * T - offset);
      push(a, za, 0);
      push(za, zbEnd, 1);
      push(zbEnd, b, 0);
    }
    return merged;
  }

  /** Writes the runs of buf: data as data, zero runs as zeroes (nothing on a fresh target). */
  async writeRuns(buf: Buffer, offset: number, runs: number[]): Promise<void> {
    for (let i = 0; i < runs.length; i += 3) {
      const a = runs[i]!, b = runs[i + 1]!;
      if (runs[i + 2]) await this.zeroes(offset + a, b - a);
      else await this.dst.io.write(offset + a, buf.subarray(a, b));
    }
  }

  /** Whole target clusters, compressed; all-zero clusters are left out. */
  async writeCompressed(buf: Buffer, offset: number, bytes: number): Promise<void> {
    const unit = this.compressUnit;
    const zero = Buffer.alloc(unit);
    for (let pos = 0; pos < bytes; pos += unit) {
      const n = Math.min(unit, bytes - pos);
      if (buf.compare(zero, 0, n, pos, pos + n) === 0) {
        if (!this.targetIsZero) await this.zeroes(offset + pos, n);
        continue;
      }
      const piece = buf.subarray(pos, pos + n);
      await new Promise<void>((resolve, reject) =>
        this.dst.io.writev(offset + pos, n, [piece], ReqFlags.COMPRESSED, (e) => (e ? reject(e) : resolve())),
      );
    }
  }

  /**
   * Writes the 512-byte sectors of the chunk that differ from what the target reads now
   * (its backing file's data): data as data, zero runs as write-zeroes.
   */
  async writeDiff(c: Chunk, buf: Buffer, cur: Buffer): Promise<void> {
    if (c.zero) buf.fill(0, 0, c.bytes);
    await this.dst.io.read(c.offset, cur.subarray(0, c.bytes));
    let run = -1;
    for (let s = 0; s <= c.bytes; s += 512) {
      const e = Math.min(c.bytes, s + 512);
      const differs = s < c.bytes && buf.compare(cur, s, e, s, e) !== 0;
      if (differs && run < 0) run = s;
      if (differs || run < 0) continue;
      const piece = buf.subarray(run, s);
      if (piece.compare(ZEROES, 0, piece.length) === 0) {
        await this.dst.io.writeZeroes(c.offset + run, piece.length, false);
      } else {
        await this.dst.io.write(c.offset + run, piece);
      }
      run = -1;
    }
  }

  async worker(buf: Buffer, cur?: Buffer): Promise<void> {
    try {
      for (let c = await this.next(); c && !this.error; c = await this.next()) {
        let runs: number[] | null = null;
        if (!c.zero) {
          await this.src.io.read(c.offset, buf.subarray(0, c.bytes));
          if (!this.againstBacking && !this.compressUnit) runs = this.runs(buf, c.offset, c.bytes);
        }
        await this.turn(c.seq);
        if (this.error) return;
        if (this.againstBacking) await this.writeDiff(c, buf, cur!);
        else if (c.zero) await this.zeroes(c.offset, c.bytes);
        else if (this.compressUnit) await this.writeCompressed(buf, c.offset, c.bytes);
        else await this.writeRuns(buf, c.offset, runs!);
        this.written(c);
      }
    } catch (e) {
      this.abort(e);
    }
  }

  /** Records the first error and releases workers waiting for their turn to write. */
  abort(e: unknown): void {
    this.error ??= e;
    for (const w of this.#writeWaiters.values()) w();
    this.#writeWaiters.clear();
  }
}

export async function imgConvert(srcName: string, dstName: string, opts: ConvertOptions): Promise<void> {
  const outFmt = opts.O ?? 'raw';
  const parallel = opts.m === undefined ? 8 : parseCount(opts.m, 'number of coroutines', 1);
  if (parallel > 16) throw new CliError('Invalid number of coroutines. Allowed number of coroutines is between 1 and 16');
  const sparse = opts.S === undefined ? 4096 : parseCount(opts.S, 'buffer size for sparse output');
  if (sparse > MAX_SPARSE) throw new CliError(`Invalid buffer size for sparse output specified (at most ${MAX_SPARSE})`);
  // qemu-img convert's target cache defaults to unsafe: no flush at the end.
  const dstCache = checkCacheMode(opts.t ?? 'unsafe');
  const srcCache = checkCacheMode(opts.T ?? 'writeback');
  if (opts.targetIsZero && !opts.n) throw new CliError('--target-is-zero requires use of -n flag');
  if (!opts.n) checkCreatableFormat(outFmt);

  // The source's reads go to the thread pool, as qemu-img's do (aio=threads): io_uring copies
  // page-cached buffered reads inline, on the event loop that has to keep the writes going.
  const src = await openImage({ filename: srcName, fmt: opts.f, cache: srcCache, readOnly: true, forceShare: opts.forceShare, aio: 'threads' });
  let dst: OpenImage | undefined;
  const buffers: Buffer[] = [];
  try {
    const size = src.io.getLength();
    if (opts.c && outFmt !== 'qcow2') throw new CliError(`Compression not supported for format '${outFmt}'`);
    if (opts.B !== undefined) {
      if (outFmt !== 'qcow2') throw new CliError(`Backing file not supported for file format '${outFmt}'`);
      if (opts.F === undefined) throw new CliError('Use of backing file requires explicit backing format');
      if (opts.n) throw new CliError('-B cannot be used with -n (the target is not created) in Spindle');
      if (opts.c) throw new CliError('-B cannot be used with -c in Spindle yet');
    }
    if (!opts.n && outFmt === 'qcow2') await imgCreateQcow2(dstName, String(size), { o: opts.o, q: true, b: opts.B, F: opts.F });
    else if (!opts.n) {
      if (opts.o?.length) throw new CliError(`Invalid options for format '${outFmt}': ${opts.o.join(',')}`);
      createRawFile(dstName, size);
    }
    dst = await openImage({ filename: dstName, fmt: outFmt, cache: dstCache, readOnly: false, discardUnmap: true });
    const dstSize = dst.io.getLength();
    if (opts.n && dstSize < size) {
      throw new CliError(`Output file '${dstName}' is smaller than the input (${dstSize} < ${size} bytes)`);
    }
    const progress = new Progress(!!opts.p && !opts.q);
    const unit = opts.c ? Number(dst.backend.root!.node.driver.info?.(dst.backend.root!.node)['cluster-size'] ?? 65536) : 0;
    const backed = dst.backend.root!.node.backing !== undefined;
    if (backed && opts.c) throw new CliError('Compressing into an image with a backing file is not supported by Spindle yet');
    const dstNode = dst.backend.root!.node;
    const targetUnit = outFmt === 'qcow2' && !opts.c ? Number(dstNode.driver.info?.(dstNode)['cluster-size'] ?? 0) : 0;
    // In-order writes into the page cache (a raw target, not -t none/directsync) may overlap:
    // the file system places the data when it writes the pages back, not in write() order,
    // and one 2 MiB write at a time leaves the copy waiting on each write's latency. A qcow2
    // target allocates its clusters as the writes arrive, so there order is kept strictly,
    // as qemu-img keeps it everywhere (one write in flight).
    const buffered = dstCache !== 'none' && dstCache !== 'directsync';
    const depth = buffered && !targetUnit && !unit && !backed ? WRITE_DEPTH : 1;
    const copier = new Copier(src, dst, size, sparse, (!opts.n || !!opts.targetIsZero) && !backed, !opts.W, progress, unit, backed, targetUnit, depth);
    // Aligned slab buffers, one per worker: O_DIRECT (-t/-T none) needs no bounce copies.
    for (let i = 0; i < parallel * (backed ? 2 : 1); i++) buffers.push(getEngine().allocBuffer(CHUNK, 4096));
    // Every worker ends (none is left in flight) before the images close.
    await Promise.all(buffers.slice(0, parallel).map((b, i) => copier.worker(b, buffers[parallel + i])));
    if (copier.error) throw copier.error;
    await dst.io.flush();
    progress.finish();
  } finally {
    for (const b of buffers) getEngine().freeBuffer(b);
    dst?.close();
    src.close();
  }
}
