// img measure: the same numbers (human and JSON) as qemu-img measure, for sizes and images.
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ensureBuilt, ok, qemuImg, qemuIo, spindle, tempDir } from './helpers.js';

const t = tempDir();
const p = (n: string): string => join(t.dir, n);

beforeAll(async () => {
  await ensureBuilt();
  ok(qemuImg('create', '-f', 'qcow2', p('base.qcow2'), '4M'));
  qemuIo('qcow2', p('base.qcow2'), 'write -P 0x11 0 128k', 'write -P 0x22 1000k 3000', 'write -z 2M 64k');
  ok(qemuImg('create', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', p('top.qcow2'), '5M'));
  qemuIo('qcow2', p('top.qcow2'), 'write -P 0x44 3M 100k', 'discard 0 64k', 'write -P 1 4444444 1');
  ok(qemuImg('create', '-f', 'qcow2', '-o', 'compat=0.10', p('v2.qcow2'), '7M'));
  qemuIo('qcow2', p('v2.qcow2'), 'write -P 3 1M 1M');
  ok(qemuImg('create', '-f', 'raw', p('r.raw'), '3M'));
  qemuIo('raw', p('r.raw'), 'write -P 1 100k 5000', 'write -P 2 2M 1M');
});
afterAll(t.cleanup);

const cases: string[][] = [
  ['-O', 'qcow2', '--size', '1G'],
  ['-O', 'qcow2', '--size', '1000'],
  ['-O', 'qcow2', '--size', '0'],
  ['-O', 'raw', '--size', '1000'],
  ['--size', '5G'],
  ['-O', 'qcow2', '-o', 'cluster_size=1k', '--size', '1G'],
  ['-O', 'qcow2', '-o', 'extended_l2=on', '--size', '1G'],
  ['-O', 'qcow2', '-o', 'refcount_bits=1,cluster_size=2M', '--size', '100G'],
  ['-O', 'qcow2', '-o', 'preallocation=full', '--size', '1G'],
  ['-O', 'qcow2', '-o', 'preallocation=metadata', '--size', '1G'],
  ['-O', 'qcow2', '-o', 'compat=0.10', '--size', '1G'],
  ['-O', 'qcow2', 'top.qcow2'],
  ['-O', 'qcow2', '-o', 'cluster_size=4k', 'top.qcow2'],
  ['-O', 'qcow2', '-o', 'compat=0.10', 'top.qcow2'],
  ['-O', 'qcow2', '-o', 'preallocation=falloc', 'top.qcow2'],
  ['-O', 'qcow2', '-o', 'backing_file=x,backing_fmt=qcow2', 'top.qcow2'],
  ['-O', 'qcow2', 'v2.qcow2'],
  ['-O', 'qcow2', '-f', 'raw', 'r.raw'],
  ['-O', 'raw', 'top.qcow2'],
];

describe('img measure', () => {
  for (const args of cases) {
    const full = args.map((a) => (a.endsWith('.qcow2') || a.endsWith('.raw') ? p(a) : a));
    it(`${args.join(' ')}: as qemu-img (human and JSON)`, () => {
      expect(ok(spindle('img', 'measure', ...full)).stdout).toBe(ok(qemuImg('measure', ...full)).stdout);
      const s = ok(spindle('img', 'measure', '--output=json', ...full)).stdout;
      const q = ok(qemuImg('measure', '--output=json', ...full)).stdout;
      expect(JSON.parse(s)).toEqual(JSON.parse(q));
      expect(s).toBe(q);
    });
  }

  it('matches qemu-img errors', () => {
    for (const args of [
      ['-O', 'qcow2', '--size', '1G', p('top.qcow2')],
      ['-O', 'qcow2'],
      ['-O', 'qcow2', p('a'), p('b')],
      ['-O', 'xyz', '--size', '1G'],
      ['-O', 'qcow2', '-o', 'bogus=1', '--size', '1G'],
      ['-O', 'qcow2', '-o', 'cluster_size=3k', '--size', '1G'],
      ['-f', 'qcow2', '-O', 'qcow2', '--size', '1G'],
      ['-O', 'qcow2', '--size', '1G', '--output=xml'],
    ]) {
      const s = spindle('img', 'measure', ...args);
      const q = qemuImg('measure', ...args);
      expect(q.status).toBe(1);
      expect(s.status).toBe(1);
      expect(s.stderr).toBe(`spindle img: ${q.stderr.split('\n')[0]!.replace(/^qemu-img: /, '')}\n`);
    }
  });
});
