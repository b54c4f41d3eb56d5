// img info --backing-chain and img convert -B, checked against qemu-img on a 3-deep chain.
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ensureBuilt, ok, qcow2Chain, qemuImg, spindle, tempDir } from './helpers.js';

const t = tempDir();
const p = (n: string): string => join(t.dir, n);

beforeAll(async () => {
  await ensureBuilt();
  qcow2Chain(p, { top: ['write -P 0x45 12345 678'] });
  ok(qemuImg('create', '-f', 'raw', p('r.raw'), '4M'));
  ok(qemuImg('create', '-f', 'qcow2', '-b', 'r.raw', '-F', 'raw', p('onraw.qcow2')));
  ok(qemuImg('convert', '-O', 'raw', p('top.qcow2'), p('flat.raw')));
});
afterAll(t.cleanup);

describe('img info --backing-chain', () => {
  for (const img of ['top.qcow2', 'mid.qcow2', 'base.qcow2', 'onraw.qcow2']) {
    it(`${img}: JSON list and human blocks as qemu-img prints them`, () => {
      const s = ok(spindle('img', 'info', '--backing-chain', '--output=json', p(img))).stdout;
      const q = ok(qemuImg('info', '--backing-chain', '--output=json', p(img))).stdout;
      expect(JSON.parse(s)).toEqual(JSON.parse(q));
      expect(s).toBe(q);
      expect(ok(spindle('img', 'info', '--backing-chain', p(img))).stdout).toBe(ok(qemuImg('info', '--backing-chain', p(img))).stdout);
    });
  }

  it('fails with one line when a backing file is missing', () => {
    ok(qemuImg('create', '-f', 'qcow2', '-u', '-b', 'gone.qcow2', '-F', 'qcow2', p('orphan.qcow2'), '1M'));
    const s = spindle('img', 'info', '--backing-chain', p('orphan.qcow2'));
    expect(s.status).toBe(1);
    expect(s.stdout).toBe('');
    expect(s.stderr).toMatch(/^spindle img: Could not open '.*gone\.qcow2'.*\n$/);
  });
});

describe('img convert -B', () => {
  function check(out: string, backing: string): void {
    expect(qemuImg('check', out).status).toBe(0);
    expect(qemuImg('compare', out, p('top.qcow2')).stdout).toBe('Images are identical.\n');
    const info = JSON.parse(qemuImg('info', '--output=json', out).stdout) as Record<string, unknown>;
    expect(info['backing-filename']).toBe(backing);
    expect(info['backing-filename-format']).toBe('qcow2');
  }

  it('with the source\'s own backing file: reads the same as qemu-img\'s result and writes no more', () => {
    const a = p('cb-s.qcow2');
    const b = p('cb-q.qcow2');
    ok(spindle('img', 'convert', '-O', 'qcow2', '-B', 'mid.qcow2', '-F', 'qcow2', p('top.qcow2'), a));
    ok(qemuImg('convert', '-O', 'qcow2', '-B', 'mid.qcow2', '-F', 'qcow2', p('top.qcow2'), b));
    check(a, 'mid.qcow2');
    expect(qemuImg('compare', a, b).stdout).toBe('Images are identical.\n');
    const data = (f: string): number => (JSON.parse(qemuImg('map', '--output=json', f).stdout) as { depth: number; data: boolean; length: number }[])
      .filter((e) => e.depth === 0 && e.data).reduce((n, e) => n + e.length, 0);
    expect(data(a)).toBeLessThanOrEqual(data(b));
  });

  it('with another backing file: only what differs is written, and the result reads as the source', () => {
    for (const [src, fmt] of [[p('top.qcow2'), 'qcow2'], [p('flat.raw'), 'raw']] as const) {
      const a = p(`cb2-${fmt}.qcow2`);
      ok(spindle('img', 'convert', '-f', fmt, '-O', 'qcow2', '-B', 'base.qcow2', '-F', 'qcow2', src, a));
      check(a, 'base.qcow2');
      const map = JSON.parse(qemuImg('map', '--output=json', a).stdout) as { start: number; length: number; depth: number }[];
      // base's data at 1000k is the same in the source: that cluster stays in the backing file.
      const at = map.find((e) => e.start <= 1024000 && e.start + e.length > 1024000)!;
      expect(at.depth).toBe(1);
      expect(map.some((e) => e.depth === 0 && e.start < 1048576 && e.start + e.length > 983040)).toBe(false);
    }
  });

  it('refuses -B without -F and for raw targets, like qemu-img', () => {
    const s1 = spindle('img', 'convert', '-O', 'qcow2', '-B', 'base.qcow2', p('top.qcow2'), p('x.qcow2'));
    expect(s1.stderr).toBe('spindle img: Use of backing file requires explicit backing format\n');
    const s2 = spindle('img', 'convert', '-O', 'raw', '-B', 'base.qcow2', '-F', 'qcow2', p('top.qcow2'), p('x.raw'));
    expect(s2.stderr).toBe("spindle img: Backing file not supported for file format 'raw'\n");
  });
});
