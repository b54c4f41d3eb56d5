// img convert: contents equal per qemu-img compare, holes stay holes.
import { closeSync, openSync, writeSync, statSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { allocated, ensureBuilt, ok, qemuImg, spindle, tempDir } from './helpers.js';

const t = tempDir();
const MiB = 1 << 20;
const SIZE = 256 * MiB;
const src = join(t.dir, 'src.img');
/** Data islands, some unaligned, one of them with an all-zero block inside. */
const islands: [number, number][] = [[0, MiB], [5 * MiB + 12345, 300_000], [100 * MiB, 3 * MiB], [SIZE - 4096, 4096]];

beforeAll(async () => {
  await ensureBuilt();
  ok(spindle('img', 'create', src, String(SIZE)));
  const fd = openSync(src, 'r+');
  for (const [off, n] of islands) writeSync(fd, randomBytes(n), 0, n, off);
  writeSync(fd, Buffer.alloc(256 * 1024), 0, 256 * 1024, 101 * MiB); // zeroes written as data
  closeSync(fd);
});
afterAll(t.cleanup);

function identical(a: string, b: string): void {
  const r = qemuImg('compare', '-f', 'raw', '-F', 'raw', a, b);
  expect(r.stdout).toBe('Images are identical.\n');
  expect(r.status).toBe(0);
}

describe('img convert', () => {
  it('copies a sparse image into a sparse target', () => {
    const dst = join(t.dir, 'dst.img');
    const r = ok(spindle('img', 'convert', '-p', '-f', 'raw', '-O', 'raw', src, dst));
    expect(r.stdout).toMatch(/^ {4}\(0\.00\/100%\)\r.*\(100\.00\/100%\)\r\n$/s);
    identical(src, dst);
    expect(statSync(dst).size).toBe(SIZE);
    const data = islands.reduce((s, [, n]) => s + n, 0);
    expect(allocated(dst)).toBeLessThan(SIZE / 20);
    // The written-zero block inside an island is skipped too (-S 4k default).
    expect(allocated(dst)).toBeLessThan(allocated(src));
    expect(allocated(dst)).toBeGreaterThanOrEqual(data - 256 * 1024);
  });

  it('-S 0 allocates everything; -W, -m and -t/-T none still copy exactly', () => {
    const full = join(t.dir, 'full.img');
    ok(spindle('img', 'convert', '-S', '0', src, full));
    identical(src, full);
    expect(allocated(full)).toBeGreaterThanOrEqual(SIZE);
    const direct = join(t.dir, 'direct.img');
    ok(spindle('img', 'convert', '-W', '-m', '3', '-t', 'none', '-T', 'none', src, direct));
    identical(src, direct);
    expect(allocated(direct)).toBeLessThan(SIZE / 20);
  });

  it('-n writes zeroes over the holes of an existing dirty target', () => {
    const dirty = join(t.dir, 'dirty.img');
    const fd = openSync(dirty, 'w');
    const junk = Buffer.alloc(MiB, 0xee);
    for (let off = 0; off < SIZE; off += MiB) writeSync(fd, junk, 0, MiB, off);
    closeSync(fd);
    ok(spindle('img', 'convert', '-n', '-f', 'raw', '-O', 'raw', src, dirty));
    identical(src, dirty);
  });

  it('-n refuses a target smaller than the source', () => {
    const small = join(t.dir, 'small.img');
    ok(spindle('img', 'create', small, '1M'));
    const r = spindle('img', 'convert', '-n', src, small);
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/^spindle img: .*smaller.*\n$/);
  });

  it('refuses to convert an image onto itself instead of wiping it', () => {
    const self = join(t.dir, 'self.img');
    ok(spindle('img', 'convert', src, self));
    const r = spindle('img', 'convert', '-f', 'raw', '-O', 'raw', self, self);
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/^spindle img: .*lock.*\n$/);
    identical(src, self);
  });
});
