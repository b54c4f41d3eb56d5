// Conformance of both native engine kinds against real files: the same suite
// runs for io_uring and the thread pool.
import { closeSync, openSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import {
  createEngine, FALLOC, fileSize, seekData, seekHole, type IoEngine,
} from '../../src/native/engine.js';
import { fallocate, fsync, ioUringAvailable, kinds, pattern, read, tempDir, write } from './helpers.js';

const EBADF = -9;

it('io_uring is available on this host (set SPINDLE_NO_IO_URING=1 where it is not)', () => {
  if (process.env.SPINDLE_NO_IO_URING === '1') return;
  expect(ioUringAvailable(), 'io_uring_setup was refused').toBe(true);
});

describe.each(kinds)('%s engine', (kind) => {
  let e: IoEngine;
  let dir: string;
  let cleanup: () => void;
  beforeAll(() => {
    e = createEngine({ kind });
    ({ dir, cleanup } = tempDir());
  });
  afterAll(() => {
    e.destroy();
    cleanup();
  });

  it('reports its kind', () => {
    expect(e.kind).toBe(kind);
  });

  it('writes patterns with slab, non-slab and vectored buffers and reads them back', async () => {
    const path = join(dir, 'patterns.img');
    const fd = e.open(path, { write: true, create: true, truncate: true });
    const slab = e.allocBuffer(8192);
    pattern(1, 8192).copy(slab);
    expect(await write(e, fd, [slab], 0)).toBe(8192);
    const plain = pattern(2, 5000); // not from the slab: fallback path
    expect(await write(e, fd, [plain], 12345)).toBe(5000);
    const s1 = e.allocBuffer(4096), s2 = e.allocBuffer(4096);
    pattern(3, 4096).copy(s1);
    pattern(4, 4096).copy(s2);
    expect(await write(e, fd, [s1, s2], 1 << 20)).toBe(8192); // vectored slab segments
    const m = pattern(5, 100);
    expect(await write(e, fd, [s1.subarray(0, 512), m], 3 << 20)).toBe(612); // mixed
    await e.idle();
    const file = readFileSync(path);
    expect(file.subarray(0, 8192).equals(pattern(1, 8192))).toBe(true);
    expect(file.subarray(12345, 17345).equals(plain)).toBe(true);
    expect(file.subarray(1 << 20, (1 << 20) + 8192).equals(Buffer.concat([pattern(3, 4096), pattern(4, 4096)]))).toBe(true);
    expect(file.subarray(3 << 20, (3 << 20) + 612).equals(Buffer.concat([pattern(3, 512), m]))).toBe(true);

    const r1 = e.allocBuffer(4096), r2 = Buffer.alloc(4096), r3 = new Uint8Array(100);
    expect(await read(e, fd, [r1, r2], 0)).toBe(8192);
    expect(Buffer.concat([r1, r2]).equals(pattern(1, 8192))).toBe(true);
    expect(await read(e, fd, [r3], 12345)).toBe(100);
    expect(Buffer.from(r3).equals(plain.subarray(0, 100))).toBe(true);
    const v1 = e.allocBuffer(4096), v2 = e.allocBuffer(4096);
    expect(await read(e, fd, [v2, v1], 1 << 20)).toBe(8192);
    expect(v2.equals(pattern(3, 4096)) && v1.equals(pattern(4, 4096))).toBe(true);
    for (const b of [slab, s1, s2, r1, v1, v2]) e.freeBuffer(b);
    expect(e.stats().fallbackRequests).toBeGreaterThan(0);
    e.close(fd);
  });

  it('returns the byte count of a short read at EOF, and 0 past it', async () => {
    const path = join(dir, 'short.img');
    writeFileSync(path, pattern(6, 1000));
    const fd = e.open(path, { write: false });
    const b = e.allocBuffer(4096);
    expect(await read(e, fd, [b], 0)).toBe(1000);
    expect(b.subarray(0, 1000).equals(pattern(6, 1000))).toBe(true);
    expect(await read(e, fd, [b], 5000)).toBe(0);
    e.freeBuffer(b);
    e.close(fd);
  });

  it('reports errors as negative errno, not throws', async () => {
    const path = join(dir, 'wronly.img');
    const wfd = openSync(path, 'w');
    const b = e.allocBuffer(4096);
    expect(await read(e, wfd, [b], 0)).toBe(EBADF);
    closeSync(wfd);
    expect(await read(e, wfd, [b], 0)).toBe(EBADF);
    expect(await read(e, wfd, [Buffer.alloc(10)], 0)).toBe(EBADF);
    const rfd = e.open(path, { write: false });
    expect(await write(e, rfd, [b], 0)).toBe(EBADF);
    e.close(rfd);
    e.freeBuffer(b);
  });

  it('runs page-cache writes inline: results and data as queued writes, callbacks never inside the call', async () => {
    const path = join(dir, 'inline.img');
    const fd = e.open(path, { write: true, create: true, truncate: true });
    const slab = e.allocBuffer(8192);
    pattern(21, 8192).copy(slab);
    const heap = pattern(22, 3000);
    const parts = [e.allocBuffer(4096), Buffer.from(pattern(23, 100))];
    pattern(24, 4096).copy(parts[0]!);
    const before = e.stats().completed;
    const inlineBefore = e.stats().inlineWrites;
    const results: number[] = [];
    let inCall = true;
    const done = (res: number): void => {
      expect(inCall, 'a callback ran inside writev').toBe(false);
      results.push(res);
    };
    // One batch: a slab write, a heap (slow-path) write, a vectored one, and a queued one.
    e.writev(fd, [slab], 0, done, true);
    e.writev(fd, [heap], 8192, done, true);
    e.writev(fd, parts, 11192, done, true);
    e.writev(fd, [slab.subarray(0, 512)], 20000, done);
    inCall = false;
    await e.idle();
    expect(results.sort((a, b) => a - b)).toEqual([512, 3000, 4196, 8192]);
    expect(e.stats().completed - before).toBe(4);
    // The first ran inline for sure (the others too, unless it was slow enough to back off).
    expect(e.stats().inlineWrites - inlineBefore).toBeGreaterThanOrEqual(1);
    const want = Buffer.concat([pattern(21, 8192), heap, pattern(24, 4096), pattern(23, 100), Buffer.alloc(20000 - 15388), pattern(21, 512)]);
    expect(readFileSync(path).equals(want)).toBe(true);
    // Errors come back as results too, from the inline path as from the queue.
    const rfd = e.open(path, { write: false });
    expect(await new Promise((r) => e.writev(rfd, [slab], 0, r, true))).toBe(EBADF);
    expect(await new Promise((r) => e.writev(rfd, [heap], 0, r, true))).toBe(EBADF);
    e.close(rfd);
    e.close(fd);
    for (const b of [slab, parts[0]!]) e.freeBuffer(b);
  });

  it('throws EngineError with code, errno and a message naming the path', () => {
    const missing = join(dir, 'no', 'such.img');
    expect(() => e.open(missing, { write: false })).toThrow(
      expect.objectContaining({ code: 'ENOENT', errno: -2, message: `Could not open '${missing}': No such file or directory` }),
    );
    expect(() => e.open(dir, { write: true })).toThrow(expect.objectContaining({ code: 'EISDIR' }));
    expect(() => e.close(12345)).toThrow(expect.objectContaining({ code: 'EBADF' }));
  });

  it('survives 10,000 random 4 KiB reads and writes at depth 64 against a model', async () => {
    const BLOCKS = 256, BS = 4096;
    const path = join(dir, 'random.img');
    const fd = e.open(path, { write: true, create: true, truncate: true });
    const model = Buffer.alloc(BLOCKS * BS);
    const locked = new Uint8Array(BLOCKS); // one request per block at a time keeps the model exact
    let seed = 12345;
    const rnd = (n: number): number => {
      seed = (Math.imul(seed, 1103515245) + 12345) >>> 0;
      return (seed >>> 8) % n;
    };
    let issued = 0, mismatches = 0, errors = 0;
    await new Promise<void>((resolve) => {
      let live = 0;
      const next = (buf: Buffer): void => {
        if (issued === 10_000) {
          if (--live === 0) resolve();
          return;
        }
        issued++;
        let blk = rnd(BLOCKS);
        while (locked[blk]) blk = (blk + 1) % BLOCKS;
        locked[blk] = 1;
        if (rnd(2) === 0) {
          buf.fill(0).writeUInt32LE(issued, 0);
          buf.writeUInt32LE(blk, 8);
          e.writev(fd, [buf], blk * BS, (res) => {
            if (res !== BS) errors++;
            buf.copy(model, blk * BS);
            locked[blk] = 0;
            next(buf);
          });
        } else {
          e.readv(fd, [buf], blk * BS, (res) => {
            if (res < 0) errors++;
            const want = model.subarray(blk * BS, blk * BS + BS);
            // A never-written tail block past EOF reads short; the model has zeroes there.
            if (!buf.subarray(0, res).equals(want.subarray(0, res)) || want.subarray(res).some((x) => x !== 0)) mismatches++;
            locked[blk] = 0;
            next(buf);
          });
        }
      };
      for (let i = 0; i < 64; i++) {
        live++;
        next(i % 2 ? e.allocBuffer(BS) : Buffer.alloc(BS)); // hot slab path and fallback mixed
      }
    });
    expect({ mismatches, errors }).toEqual({ mismatches: 0, errors: 0 });
    expect(e.inFlight()).toBe(0);
    const file = readFileSync(path);
    expect(file.equals(model.subarray(0, file.length))).toBe(true);
    e.close(fd);
  });

  it('fsyncs and fdatasyncs', async () => {
    const fd = e.open(join(dir, 'sync.img'), { write: true, create: true });
    expect(await write(e, fd, [Buffer.from('hello')], 0)).toBe(5);
    expect(await fsync(e, fd, false)).toBe(0);
    expect(await fsync(e, fd, true)).toBe(0);
    e.close(fd);
  });

  it('punches holes that seekData/seekHole see and that read back as zeroes', async () => {
    const fd = e.open(join(dir, 'sparse.img'), { write: true, create: true, truncate: true });
    const MiB = 1 << 20;
    const b = e.allocBuffer(MiB);
    b.fill(0xab);
    for (let i = 0; i < 4; i++) expect(await write(e, fd, [b], i * MiB)).toBe(MiB);
    expect(await fsync(e, fd, true)).toBe(0);
    expect(await fallocate(e, fd, FALLOC.PUNCH_HOLE | FALLOC.KEEP_SIZE, MiB, MiB)).toBe(0);
    expect(fileSize(fd)).toBe(4 * MiB);
    expect(seekHole(fd, 0)).toBe(MiB);
    expect(seekData(fd, MiB)).toBe(2 * MiB);
    expect(seekHole(fd, 2 * MiB)).toBe(4 * MiB); // EOF is a hole
    expect(seekData(fd, 4 * MiB)).toBe(-1);
    expect(await read(e, fd, [b], MiB)).toBe(MiB);
    expect(b.every((x) => x === 0)).toBe(true);
    expect(await read(e, fd, [b], 3 * MiB)).toBe(MiB);
    expect(b.every((x) => x === 0xab)).toBe(true);
    e.freeBuffer(b);
    e.close(fd);
  });

  it('zeroes a range with ZERO_RANGE and extends with fallocate', async () => {
    const fd = e.open(join(dir, 'zero.img'), { write: true, create: true, truncate: true });
    const b = e.allocBuffer(65536);
    b.fill(0x5a);
    expect(await write(e, fd, [b], 0)).toBe(65536);
    expect(await fallocate(e, fd, FALLOC.ZERO_RANGE, 4096, 8192)).toBe(0);
    expect(await read(e, fd, [b], 0)).toBe(65536);
    expect(b.subarray(0, 4096).every((x) => x === 0x5a)).toBe(true);
    expect(b.subarray(4096, 12288).every((x) => x === 0)).toBe(true);
    expect(b.subarray(12288).every((x) => x === 0x5a)).toBe(true);
    expect(await fallocate(e, fd, 0, 65536, 65536)).toBe(0);
    expect(fileSize(fd)).toBe(131072);
    e.freeBuffer(b);
    e.close(fd);
  });

  it('does O_DIRECT reads and writes with aligned slab buffers', async () => {
    const fd = e.open(join(dir, 'direct.img'), { write: true, create: true, direct: true });
    const b = e.allocBuffer(8192, 4096);
    expect(e.isAligned([b], 4096)).toBe(true);
    expect(e.isAligned([Buffer.alloc(4096)], 512)).toBe(false);
    pattern(9, 8192).copy(b);
    expect(await write(e, fd, [b], 8192)).toBe(8192);
    b.fill(0);
    expect(await read(e, fd, [b], 8192)).toBe(8192);
    expect(b.equals(pattern(9, 8192))).toBe(true);
    e.freeBuffer(b);
    e.close(fd);
  });

  it('keeps requests beyond the ring in JS and completes them all', async () => {
    const small = createEngine({ kind, entries: 64 });
    const fd = small.open(join(dir, 'overflow.img'), { write: true, create: true, truncate: true });
    const bufs = Array.from({ length: 2000 }, (_, i) => {
      const b = small.allocBuffer(512);
      b.fill(i & 0xff);
      return b;
    });
    const results: number[] = [];
    for (let i = 0; i < 2000; i++) small.writev(fd, [bufs[i]!], i * 512, (r) => results.push(r));
    expect(small.inFlight()).toBe(2000);
    await small.idle();
    expect(results.length).toBe(2000);
    expect(results.every((r) => r === 512)).toBe(true);
    const file = readFileSync(join(dir, 'overflow.img'));
    for (let i = 0; i < 2000; i += 97) expect(file[i * 512 + 100]).toBe(i & 0xff);
    const st = small.stats();
    expect(st.submitted).toBe(2000);
    expect(st.completed).toBe(2000);
    expect(st.batches).toBeLessThan(2000);
    for (const b of bufs) small.freeBuffer(b);
    small.close(fd);
    small.destroy();
  });

  it('delivers in-flight completions after destroy and cancels later requests', async () => {
    const tmp = createEngine({ kind, entries: 4 });
    const fd = tmp.open(join(dir, 'destroy.img'), { write: true, create: true });
    const results: number[] = [];
    for (let i = 0; i < 10; i++) tmp.writev(fd, [Buffer.alloc(16)], i * 16, (r) => results.push(r));
    tmp.destroy();
    tmp.readv(fd, [Buffer.alloc(16)], 0, (r) => results.push(r));
    await tmp.idle();
    await new Promise((r) => setImmediate(r));
    expect(results.length).toBe(11);
    expect(results.filter((r) => r === 16).length).toBe(4);
    expect(results.filter((r) => r === -125).length).toBe(7); // ECANCELED
    tmp.close(fd);
  });
});

it('rejects a non-Uint8Array segment synchronously without leaking a request slot', async () => {
  const e = createEngine({ kind: kinds[0]!, entries: 2 });
  const bad = new DataView(new ArrayBuffer(8)) as unknown as Uint8Array;
  expect(() => e.readv(0, [bad, Buffer.alloc(1)], 0, () => {})).toThrow(/Uint8Array|typed array/);
  expect(e.inFlight()).toBe(0);
  await e.idle();
  e.destroy();
});
