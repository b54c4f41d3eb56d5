// img bench: qemu-img bench's lines, and writes that land where qemu-img's do.
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ensureBuilt, ok, qemuImg, spindle, tempDir } from './helpers.js';

const t = tempDir();
beforeAll(ensureBuilt);
afterAll(t.cleanup);

function parse(out: string, count: number, kind: string, size: number, depth: number, start: number, step: number): number {
  const lines = out.split('\n');
  expect(lines[0]).toBe(`Sending ${count} ${kind} requests, ${size} bytes each, ${depth} in parallel (starting at offset ${start}, step size ${step})`);
  expect(lines[1]).toMatch(/^Run completed in \d+\.\d{3} seconds\.$/);
  const m = /^requests\/s: (\d+)$/.exec(lines[2]!);
  expect(m).not.toBeNull();
  return Number(m![1]);
}

describe('img bench', () => {
  it('reads, with the default flags and with -d/-s/-S/-o', () => {
    const img = join(t.dir, 'r.img');
    ok(spindle('img', 'create', img, '16M'));
    expect(parse(ok(spindle('img', 'bench', '-c', '3000', '-f', 'raw', img)).stdout, 3000, 'read', 4096, 64, 0, 4096)).toBeGreaterThan(0);
    const r = ok(spindle('img', 'bench', '-c', '500', '-d', '4', '-s', '8k', '-S', '64k', '-o', '1M', '-i', 'threads', '-f', 'raw', img));
    expect(parse(r.stdout, 500, 'read', 8192, 4, 1 << 20, 65536)).toBeGreaterThan(0);
    const n = ok(spindle('img', 'bench', '-c', '500', '-n', '-t', 'none', '-f', 'raw', img));
    expect(parse(n.stdout, 500, 'read', 4096, 64, 0, 4096)).toBeGreaterThan(0);
    const nul = ok(spindle('img', 'bench', '-c', '5000', 'json:{"driver":"null-co","size":1048576,"read-zeroes":false}'));
    expect(parse(nul.stdout, 5000, 'read', 4096, 64, 0, 4096)).toBeGreaterThan(0);
  });

  it('-w writes the pattern where qemu-img bench writes it', () => {
    const mine = join(t.dir, 'w-spindle.img');
    const theirs = join(t.dir, 'w-qemu.img');
    for (const f of [mine, theirs]) ok(spindle('img', 'create', f, '4M'));
    // 1500 requests of 2 KiB every 4 KiB from 512 wrap around the 4 MiB image once.
    const args = ['-w', '-c', '1500', '-d', '8', '-s', '2048', '-S', '4096', '-o', '512', '--pattern=0x5c', '-f', 'raw'];
    expect(parse(ok(spindle('img', 'bench', ...args, mine)).stdout, 1500, 'write', 2048, 8, 512, 4096)).toBeGreaterThan(0);
    ok(qemuImg('bench', ...args, theirs));
    const data = readFileSync(mine);
    expect(data.subarray(512, 512 + 2048).every((b) => b === 0x5c)).toBe(true);
    expect(data.subarray(512 + 2048, 4096 + 512).every((b) => b === 0)).toBe(true);
    expect(data.subarray(0, 512).every((b) => b === 0)).toBe(true);
    const r = qemuImg('compare', '-f', 'raw', '-F', 'raw', mine, theirs);
    expect(r.stdout).toBe('Images are identical.\n');
  });

  it('flushes every --flush-interval writes, draining or not', () => {
    const img = join(t.dir, 'f.img');
    ok(spindle('img', 'create', img, '1M'));
    for (const extra of [[], ['--no-drain']]) {
      const r = ok(spindle('img', 'bench', '-w', '-c', '300', '-d', '16', '--flush-interval=32', ...extra, '--pattern=7', '-f', 'raw', img));
      expect(parse(r.stdout, 300, 'write', 4096, 16, 0, 4096)).toBeGreaterThan(0);
    }
    expect(readFileSync(img).subarray(0, 300 * 4096 > 1 << 20 ? 1 << 20 : 300 * 4096).every((b) => b === 7)).toBe(true);
  });

  it('a request past the end fails the run', () => {
    const img = join(t.dir, 'e.img');
    ok(spindle('img', 'create', img, '1M'));
    const r = spindle('img', 'bench', '-c', '10', '-o', '2M', '-f', 'raw', img);
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/^spindle img: Failed request: .*past the end.*\n$/);
  });

  it('warns like qemu-img when a probed raw image is opened for writing', () => {
    const mine = join(t.dir, 'probe-spindle.img');
    const theirs = join(t.dir, 'probe-qemu.img');
    for (const f of [mine, theirs]) ok(spindle('img', 'create', f, '1M'));
    const r = ok(spindle('img', 'bench', '-w', '-c', '10', mine));
    const q = ok(qemuImg('bench', '-w', '-c', '10', theirs));
    expect(q.stderr).toMatch(/^WARNING: Image format was not specified/);
    expect(r.stderr).toBe(q.stderr.replaceAll(theirs, mine));
    expect(ok(spindle('img', 'bench', '-c', '10', mine)).stderr).toBe(''); // reads are not restricted: no warning
  });
});
