/**
 * `img convert`: copy an image into a new (or, with -n, an existing) one.
 *
 * The source is walked in chunks of up to 2 MiB that block status says are homogeneous;
 * up to -m chunks are in flight. Ranges that read as zeroes (holes, or data blocks of -S
 * bytes that are all zero) are not written to a fresh target, which already reads as
 * zeroes and so stays sparse; with -n the target's old contents must go, so they become
 * write-zeroes (punching holes where the file system can). Without -W, writes land in
 * source order, as qemu-img does, while reads still overlap.
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
  c?: boolean;
  o?: string[];
  forceShare?: boolean;
  /** -B: the new image's backing file (qcow2 targets); -F its format. */
  B?: string;
  F?: string;
}

const CHUNK = 2 << 20;
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
  #nextWrite = 0;
  #writeWaiters = new Map<number, () => void>();
  #claim: Promise<unknown> = Promise.resolve();
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
  ) {
    this.zeroBlock = Buffer.alloc(Math.max(sparse, 1));
  }

  /** The next chunk; claims are serialised because block status is asynchronous. */
  next(): Promise<Chunk | null> {
    const p = this.#claim.then(async (): Promise<Chunk | null> => {
      if (this.#cursor >= this.size) return null;
      const offset = this.#cursor;
      let bytes = Math.min(CHUNK, this.size - offset);
      let zero = false;
      if (this.sparse > 0 && !this.compressUnit) {
        const st = await blockStatus(this.src.backend.root!, offset, bytes);
        bytes = Math.min(bytes, st.bytes);
        zero = st.zero;
      }
      this.#cursor += bytes;
      return { seq: this.#seq++, offset, bytes, zero };
    });
    this.#claim = p.catch(() => undefined);
    return p;
  }

  /** Resolves when every chunk before `seq` has been written (only without -W). */
  async turn(seq: number): Promise<void> {
    if (!this.ordered || seq === this.#nextWrite || this.error) return;
    await new Promise<void>((r) => this.#writeWaiters.set(seq, r));
  }

  written(c: Chunk): void {
    this.done += c.bytes;
    this.progress.update(this.done, this.size);
    if (!this.ordered) return;
    this.#nextWrite = c.seq + 1;
    const w = this.#writeWaiters.get(this.#nextWrite);
    if (w) {
      this.#writeWaiters.delete(this.#nextWrite);
      w();
    }
  }

  async zeroes(offset: number, bytes: number): Promise<void> {
    if (!this.targetIsZero) await this.dst.io.writeZeroes(offset, bytes, true);
  }

  /** Writes buf[0, bytes) at `offset`, leaving out all-zero blocks of `sparse` bytes. */
  async writeSparse(buf: Buffer, offset: number, bytes: number): Promise<void> {
    if (this.compressUnit) return this.writeCompressed(buf, offset, bytes);
    const S = this.sparse;
    if (S === 0) return this.dst.io.write(offset, buf.subarray(0, bytes));
    let runStart = 0;
    let runZero = false;
    const flush = async (end: number): Promise<void> => {
      if (end === runStart) return;
      if (runZero) await this.zeroes(offset + runStart, end - runStart);
      else await this.dst.io.write(offset + runStart, buf.subarray(runStart, end));
    };
    for (let pos = 0; pos < bytes; pos += S) {
      const n = Math.min(S, bytes - pos);
      // Buffer.compare is a memcmp: far faster than a JS loop over the bytes.
      const isZero = buf.compare(this.zeroBlock, 0, n, pos, pos + n) === 0;
      if (pos === 0) runZero = isZero;
      else if (isZero !== runZero) {
        await flush(pos);
        runStart = pos;
        runZero = isZero;
      }
    }
    await flush(bytes);
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
        if (!c.zero) await this.src.io.read(c.offset, buf.subarray(0, c.bytes));
        await this.turn(c.seq);
        if (this.error) return;
        if (this.againstBacking) await this.writeDiff(c, buf, cur!);
        else if (c.zero) await this.zeroes(c.offset, c.bytes);
        else await this.writeSparse(buf, c.offset, c.bytes);
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
  if (sparse > CHUNK) throw new CliError(`Invalid buffer size for sparse output specified (at most ${CHUNK})`);
  const dstCache = checkCacheMode(opts.t ?? 'writeback');
  const srcCache = checkCacheMode(opts.T ?? 'writeback');
  if (!opts.n) checkCreatableFormat(outFmt);

  const src = await openImage({ filename: srcName, fmt: opts.f, cache: srcCache, readOnly: true, forceShare: opts.forceShare });
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
    const copier = new Copier(src, dst, size, sparse, !opts.n && !backed, !opts.W, progress, unit, backed);
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
