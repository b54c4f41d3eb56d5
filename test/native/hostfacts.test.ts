// Synchronous host facts: sizes, truncation, alignment hints and OFD locks.
import { execFileSync } from 'node:child_process';
import { rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';
import {
  allocatedBytes, blockSizeHint, EngineError, fileSize, ftruncate, getEngine, isBlockDevice, lockBytes, testLock,
} from '../../src/native/engine.js';
import { kinds, tempDir } from './helpers.js';

const { dir, cleanup } = tempDir();
afterAll(cleanup);
const e = getEngine();

describe('host facts', () => {
  it('reports size, allocation and file type; truncates', () => {
    const path = join(dir, 'size.img');
    writeFileSync(path, Buffer.alloc(10000, 1));
    const fd = e.open(path, { write: true });
    expect(fileSize(fd)).toBe(10000);
    expect(isBlockDevice(fd)).toBe(false);
    expect(allocatedBytes(fd)).toBeGreaterThanOrEqual(8192);
    ftruncate(fd, 1 << 30); // sparse: size grows, allocation does not
    expect(fileSize(fd)).toBe(1 << 30);
    expect(allocatedBytes(fd)).toBeLessThan(1 << 20);
    ftruncate(fd, 0);
    expect(fileSize(fd)).toBe(0);
    e.close(fd);
    expect(() => fileSize(fd)).toThrow(EngineError);
  });

  it('gives a sane O_DIRECT alignment hint', () => {
    const path = join(dir, 'align.img');
    writeFileSync(path, Buffer.alloc(8192));
    const fd = e.open(path, { write: false });
    const { logical, physical } = blockSizeHint(fd);
    expect([512, 1024, 2048, 4096]).toContain(logical);
    expect(physical).toBeGreaterThanOrEqual(logical);
    e.close(fd);
  });

  it('takes OFD byte-range locks that conflict across open file descriptions', () => {
    const path = join(dir, 'lock.img');
    writeFileSync(path, Buffer.alloc(4096));
    const a = e.open(path, { write: true });
    const b = e.open(path, { write: true }); // same process, a second open file description
    lockBytes(a, 100, 1, 'read');
    expect(testLock(b, 100, 1, 'write')).toBe(true);
    expect(testLock(b, 100, 1, 'read')).toBe(false); // shared locks coexist
    expect(testLock(b, 200, 1, 'write')).toBe(false);
    expect(() => lockBytes(b, 100, 1, 'write')).toThrow(expect.objectContaining({ code: 'EAGAIN', errno: -11 }));
    lockBytes(b, 100, 1, 'read');
    lockBytes(b, 100, 1, 'unlock');
    lockBytes(a, 100, 1, 'unlock');
    expect(testLock(b, 100, 1, 'write')).toBe(false);
    lockBytes(b, 100, 1, 'write');
    expect(testLock(a, 100, 1, 'read')).toBe(true);
    e.close(b); // closing the description releases its locks
    expect(testLock(a, 100, 1, 'write')).toBe(false);
    e.close(a);
  });
});

describe.each(kinds)('%s engine process lifetime', (kind) => {
  it('lets the process exit by itself after I/O without destroy()', () => {
    const engineUrl = new URL('../../src/native/engine.ts', import.meta.url).href;
    const path = join(dir, `exit-${kind}.img`);
    // Node 20 cannot import .ts, so the child imports an esbuild bundle; it
    // must sit inside the package so the addon loader finds the package root.
    const bundle = fileURLToPath(new URL(`../../build/test-native/engine-${process.pid}-${kind}.mjs`, import.meta.url));
    execFileSync(new URL('../../node_modules/.bin/esbuild', import.meta.url).pathname,
      [new URL(engineUrl).pathname, '--bundle', '--platform=node', '--format=esm', `--outfile=${bundle}`, '--log-level=warning']);
    const script = `
      import { createEngine } from ${JSON.stringify(bundle)};
      const e = createEngine({ kind: ${JSON.stringify(kind)} });
      const fd = e.open(${JSON.stringify(path)}, { write: true, create: true });
      const b = e.allocBuffer(4096).fill(7);
      e.writev(fd, [b], 0, (r) => e.readv(fd, [b], 0, (r2) => console.log('done', r, r2)));
    `;
    const out = execFileSync(process.execPath, ['--input-type=module', '-e', script], { timeout: 10_000, encoding: 'utf8' });
    rmSync(bundle, { force: true });
    expect(out.trim()).toBe('done 4096 4096');
  });
});
