/**
 * `img bench`: qemu-img bench's flags, defaults and output, on Spindle's block layer.
 *
 * The hot path allocates nothing per request: each in-flight slot owns one slab buffer,
 * one iovec array and one completion function, all made before the clock starts, and
 * resubmits from its own completion. No promise or closure is created per request.
 */
import type { BackendIO } from '../../backend/io.js';
import type { BlockError } from '../../block/error.js';
import { getEngine } from '../../native/engine.js';
import { CliError, oneLine } from '../fail.js';
import { checkCacheMode, openImage } from './open.js';
import { parseCount } from './size.js';

export interface BenchOptions {
  c?: string;
  d?: string;
  f?: string;
  flushInterval?: string;
  i?: string;
  n?: boolean;
  drain?: boolean;
  o?: string;
  pattern?: string;
  q?: boolean;
  s?: string;
  S?: string;
  t?: string;
  w?: boolean;
  forceShare?: boolean;
}

/** The state of one run, shared by its slots. */
interface Run {
  io: BackendIO;
  write: boolean;
  bufSize: number;
  step: number;
  imageSize: number;
  /** Next offset to send, and how many requests are left to send / to complete. */
  offset: number;
  toSend: number;
  toComplete: number;
  flushInterval: number;
  drain: boolean;
  sinceFlush: number;
  /** Slots parked while a draining flush waits for the queue to empty. */
  parked: Slot[];
  flushing: boolean;
  inFlight: number;
  error: BlockError | null;
  finish: () => void;
}

class Slot {
  readonly iov: readonly Uint8Array[];
  /** Bound once: the completion of every request this slot sends. */
  readonly done: (err: BlockError | null) => void;

  constructor(readonly run: Run, readonly buf: Buffer) {
    this.iov = [buf];
    this.done = (err) => this.complete(err);
  }

  send(): void {
    const r = this.run;
    if (r.toSend === 0 || r.error) return;
    if (r.flushInterval > 0 && r.sinceFlush >= r.flushInterval) {
      if (!startFlush(r, this)) return;
    }
    const offset = r.offset;
    r.offset += r.step;
    // Wrap at the end as qemu-img does (modulo the image size), but never into a request
    // that would straddle the end: that one restarts at 0 where qemu-img would fail.
    if (r.offset + r.bufSize > r.imageSize) {
      r.offset %= r.imageSize || 1;
      if (r.offset + r.bufSize > r.imageSize) r.offset = 0;
    }
    r.toSend--;
    r.sinceFlush++;
    r.inFlight++;
    if (r.write) r.io.writev(offset, r.bufSize, this.iov, 0, this.done);
    else r.io.readv(offset, r.bufSize, this.iov, 0, this.done);
  }

  complete(err: BlockError | null): void {
    const r = this.run;
    r.inFlight--;
    if (err && !r.error) r.error = err;
    if (--r.toComplete === 0 || (r.error && r.inFlight === 0)) {
      r.finish();
      return;
    }
    if (r.parked.length && r.inFlight === 0 && !r.flushing) void flushParked(r);
    this.send();
  }
}

/**
 * Flush every --flush-interval requests. Draining (the default) stops sending until the
 * queue is empty and the flush is done; --no-drain flushes alongside the requests.
 * Returns whether the slot may send now. Runs once per interval, so a promise is fine.
 */
function startFlush(r: Run, slot: Slot): boolean {
  if (!r.drain) {
    r.sinceFlush = 0;
    r.io.flush().catch((e: BlockError) => (r.error ??= e));
    return true;
  }
  r.parked.push(slot);
  if (r.inFlight === 0 && !r.flushing) void flushParked(r);
  return false;
}

async function flushParked(r: Run): Promise<void> {
  r.flushing = true;
  try {
    await r.io.flush();
  } catch (e) {
    r.error ??= e as BlockError;
  }
  r.flushing = false;
  r.sinceFlush = 0;
  const slots = r.parked.splice(0);
  if (r.error) return r.finish();
  for (const s of slots) s.send();
}

function parsePattern(text: string | undefined): number {
  if (text === undefined) return 0;
  const n = /^\s*(0x[0-9a-f]+|\d+)\s*$/i.test(text) ? Number(text) : NaN;
  if (!(n >= 0 && n <= 255)) throw new CliError('Invalid pattern byte specified');
  return n;
}

export async function imgBench(filename: string, opts: BenchOptions): Promise<void> {
  const count = opts.c === undefined ? 75000 : parseCount(opts.c, 'request count');
  const depth = opts.d === undefined ? 64 : parseCount(opts.d, 'queue depth', 1);
  if (depth > 4096) throw new CliError(`Invalid queue depth specified: '${opts.d}' (at most 4096)`);
  const bufSize = opts.s === undefined ? 4096 : parseCount(opts.s, 'buffer size', 1);
  const step = opts.S === undefined ? bufSize : parseCount(opts.S, 'step size');
  const start = opts.o === undefined ? 0 : parseCount(opts.o, 'offset');
  const write = !!opts.w;
  const pattern = parsePattern(opts.pattern);
  const flushInterval = opts.flushInterval === undefined ? 0 : parseCount(opts.flushInterval, 'flush interval');
  const drain = opts.drain !== false;
  if (flushInterval && !write) throw new CliError('--flush-interval is only available in write tests');
  if (flushInterval && flushInterval < depth) throw new CliError("Flush interval can't be smaller than depth");
  if (!drain && !flushInterval) throw new CliError('--no-drain requires --flush-interval');
  const cache = checkCacheMode(opts.t ?? 'writeback');
  const aio = opts.n ? 'native' : opts.i;

  const img = await openImage({ filename, fmt: opts.f, cache, aio, readOnly: !write, forceShare: opts.forceShare });
  const engine = getEngine();
  const slots: Slot[] = [];
  try {
    if (!opts.q) {
      process.stdout.write(`Sending ${count} ${write ? 'write' : 'read'} requests, ${bufSize} bytes each, ${depth} in parallel ` +
        `(starting at offset ${start}, step size ${step})\n`);
    }
    let finish!: () => void;
    const finished = new Promise<void>((r) => (finish = r));
    const run: Run = {
      io: img.io, write, bufSize, step, imageSize: img.io.getLength(), offset: start, toSend: count, toComplete: count,
      flushInterval, drain, sinceFlush: 0, parked: [], flushing: false, inFlight: 0, error: null, finish,
    };
    for (let i = 0; i < Math.min(depth, count); i++) slots.push(new Slot(run, engine.allocBuffer(bufSize, 4096).fill(pattern)));

    const t0 = process.hrtime.bigint();
    if (count === 0) finish();
    for (const s of slots) s.send();
    await finished;
    const ns = Number(process.hrtime.bigint() - t0);
    if (run.error) throw new CliError(`Failed request: ${oneLine(run.error)}`);
    if (write) await img.io.flush(); // outside the clock: the data is there for whoever reads next
    if (!opts.q) {
      const secs = ns / 1e9;
      process.stdout.write(`Run completed in ${secs.toFixed(3)} seconds.\nrequests/s: ${secs > 0 ? Math.round(count / secs) : 0}\n`);
    }
  } finally {
    for (const s of slots) engine.freeBuffer(s.buf);
    img.close();
  }
}
