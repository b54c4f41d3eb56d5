// Registered (fixed) slab buffers on io_uring: used for single-segment slab
// requests, shared by every engine (slabs allocated later included), and a
// forced fallback (option or SPINDLE_NO_FIXED_BUFFERS=1) gives identical data.
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createEngine, engineFeatures, type IoEngine } from '../../src/native/engine.js';
import { kinds, pattern, read, tempDir, write } from './helpers.js';

const uring = kinds.includes('io_uring');
// Where the kernel refuses the table (before 5.13) everything must still work;
// this host is expected to have it unless told otherwise.
const expectFixed = uring && process.env.SPINDLE_NO_FIXED_BUFFERS !== '1' && process.env.SPINDLE_EXPECT_NO_FIXED !== '1';

describe.skipIf(!uring)('io_uring fixed buffers', () => {
  let fixed: IoEngine;
  let plain: IoEngine;
  let dir: string;
  let cleanup: () => void;
  beforeAll(() => {
    fixed = createEngine({ kind: 'io_uring', fixedBuffers: true });
    plain = createEngine({ kind: 'io_uring', fixedBuffers: false });
    ({ dir, cleanup } = tempDir());
  });
  afterAll(() => {
    fixed.destroy();
    plain.destroy();
    cleanup();
  });

  it('registers a buffer table unless disabled', () => {
    if (expectFixed) expect(engineFeatures(fixed).fixedSlots).toBeGreaterThan(0);
    expect(engineFeatures(plain).fixedSlots).toBe(0);
  });

  it('uses READ_FIXED/WRITE_FIXED for single slab segments only, with the same data as the fallback', async () => {
    const path = join(dir, 'same.img');
    const fd = fixed.open(path, { write: true, create: true, truncate: true });
    const fd2 = plain.open(path, { write: true });
    const a = fixed.allocBuffer(65536), b = plain.allocBuffer(65536);
    const f0 = fixed.stats().fixedRequests;
    pattern(21, 65536).copy(a);
    expect(await write(fixed, fd, [a], 0)).toBe(65536); // fixed write
    pattern(22, 65536).copy(b);
    expect(await write(plain, fd2, [b], 65536)).toBe(65536); // plain write
    if (expectFixed) expect(fixed.stats().fixedRequests).toBe(f0 + 1);
    expect(plain.stats().fixedRequests).toBe(0);

    // Cross-read: each engine reads what the other wrote, at odd offsets and lengths.
    a.fill(0);
    b.fill(0);
    expect(await read(fixed, fd, [a.subarray(512, 512 + 40000)], 65536 + 123)).toBe(40000);
    expect(await read(plain, fd2, [b.subarray(512, 512 + 40000)], 123)).toBe(40000);
    expect(a.subarray(512, 40512).equals(pattern(22, 65536).subarray(123, 40123))).toBe(true);
    expect(b.subarray(512, 40512).equals(pattern(21, 65536).subarray(123, 40123))).toBe(true);

    // Vectored and non-slab requests never take the fixed path.
    const before = fixed.stats().fixedRequests;
    expect(await read(fixed, fd, [a.subarray(0, 4096), a.subarray(8192, 12288)], 0)).toBe(8192);
    expect(await read(fixed, fd, [Buffer.alloc(4096)], 0)).toBe(4096);
    expect(fixed.stats().fixedRequests).toBe(before);

    const file = readFileSync(path);
    expect(file.equals(Buffer.concat([pattern(21, 65536), pattern(22, 65536)]))).toBe(true);
    fixed.freeBuffer(a);
    plain.freeBuffer(b);
    fixed.close(fd);
    plain.close(fd2);
  });

  it('registers slabs allocated after the engine was created, in every engine', async () => {
    const later = createEngine({ kind: 'io_uring', entries: 8 });
    const fd = fixed.open(join(dir, 'late.img'), { write: true, create: true, truncate: true });
    // Bigger than the default slab: forces a new slab after both engines exist.
    const big = fixed.allocBuffer(40 << 20);
    pattern(23, 1 << 20).copy(big, 39 << 20);
    const f1 = fixed.stats().fixedRequests, l1 = later.stats().fixedRequests;
    expect(await write(fixed, fd, [big.subarray(39 << 20)], 0)).toBe(1 << 20);
    const small = big.subarray(0, 1 << 20);
    expect(await read(later, fd, [small], 0)).toBe(1 << 20);
    expect(small.equals(pattern(23, 1 << 20))).toBe(true);
    if (expectFixed) {
      expect(fixed.stats().fixedRequests).toBe(f1 + 1);
      expect(later.stats().fixedRequests).toBe(l1 + 1);
    }
    fixed.freeBuffer(big);
    fixed.close(fd);
    later.destroy();
    expect(later.stats().fixedRequests).toBe(expectFixed ? l1 + 1 : 0); // kept after destroy
  });

  it('does O_DIRECT on fixed buffers', async () => {
    const fd = fixed.open(join(dir, 'direct.img'), { write: true, create: true, direct: true });
    const b = fixed.allocBuffer(16384);
    pattern(24, 16384).copy(b);
    expect(await write(fixed, fd, [b], 4096)).toBe(16384);
    b.fill(0);
    expect(await read(fixed, fd, [b], 4096)).toBe(16384);
    expect(b.equals(pattern(24, 16384))).toBe(true);
    fixed.freeBuffer(b);
    fixed.close(fd);
  });

  it('SPINDLE_NO_FIXED_BUFFERS=1 forces the plain path', async () => {
    const saved = process.env.SPINDLE_NO_FIXED_BUFFERS;
    process.env.SPINDLE_NO_FIXED_BUFFERS = '1';
    let e: IoEngine;
    try {
      e = createEngine({ kind: 'io_uring' });
    } finally {
      if (saved === undefined) delete process.env.SPINDLE_NO_FIXED_BUFFERS;
      else process.env.SPINDLE_NO_FIXED_BUFFERS = saved;
    }
    expect(engineFeatures(e).fixedSlots).toBe(0);
    const fd = e.open(join(dir, 'env.img'), { write: true, create: true, truncate: true });
    const b = e.allocBuffer(4096);
    pattern(25, 4096).copy(b);
    expect(await write(e, fd, [b], 0)).toBe(4096);
    b.fill(0);
    expect(await read(e, fd, [b], 0)).toBe(4096);
    expect(b.equals(pattern(25, 4096))).toBe(true);
    expect(e.stats().fixedRequests).toBe(0);
    e.freeBuffer(b);
    e.close(fd);
    e.destroy();
  });
});

it('the thread pool reports no fixed buffers', () => {
  const e = createEngine({ kind: 'threads' });
  expect(engineFeatures(e)).toEqual({ setupFlags: 0, fixedSlots: 0 });
  expect(e.stats().fixedRequests).toBe(0);
  e.destroy();
});
