// img amend: Spindle amends one copy, qemu-img another; QEMU compares, checks and reads
// the resulting ImageInfo.
import { copyFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ensureBuilt, ok, qemuImg, qemuIo, spindle, tempDir } from './helpers.js';

const t = tempDir();
const p = (n: string): string => join(t.dir, n);

beforeAll(async () => {
  await ensureBuilt();
  const zeroes = ['write -P 7 0 256k', 'write -z 64k 64k', 'write -z -u 128k 64k', 'write -z 512k 64k', 'write -P 9 777777 3333'];
  ok(qemuImg('create', '-f', 'qcow2', p('z.qcow2'), '1M'));
  qemuIo('qcow2', p('z.qcow2'), ...zeroes);
  ok(qemuImg('create', '-f', 'qcow2', p('base.qcow2'), '2M'));
  qemuIo('qcow2', p('base.qcow2'), 'write -P 0x11 0 2M');
  ok(qemuImg('create', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', p('over.qcow2')));
  qemuIo('qcow2', p('over.qcow2'), ...zeroes, 'discard 1536k 128k');
  ok(qemuImg('create', '-f', 'qcow2', '-o', 'compat=0.10', p('v2.qcow2'), '1M'));
  qemuIo('qcow2', p('v2.qcow2'), 'write -P 5 1000 100000');
  ok(qemuImg('create', '-f', 'qcow2', '-o', 'extended_l2=on', p('ext.qcow2'), '1M'));
  ok(qemuImg('create', '-f', 'qcow2', '-o', 'refcount_bits=8', p('rc8.qcow2'), '1M'));
  ok(qemuImg('create', '-f', 'raw', p('r.raw'), '1M'));
});
afterAll(t.cleanup);

let n = 0;
function run(src: string, args: string[]): void {
  const a = p(`s${n}-${src}`);
  const b = p(`q${n++}-${src}`);
  copyFileSync(p(src), a);
  copyFileSync(p(src), b);
  const s = spindle('img', 'amend', ...args, a);
  const q = qemuImg('amend', ...args, b);
  expect(s.status).toBe(q.status);
  expect(s.stdout).toBe(q.stdout);
  if (q.status) expect(s.stderr.trim().split('. ')[0]).toBe(q.stderr.split('\n')[0]!.replace(/^qemu-img:/, 'spindle img:').split('. ')[0]);
  expect(qemuImg('check', a).stdout).toContain('No errors were found on the image.');
  expect(qemuImg('compare', a, b).stdout).toBe('Images are identical.\n');
  const info = (f: string): unknown => {
    const i = JSON.parse(qemuImg('info', '--output=json', f).stdout) as Record<string, unknown>;
    delete i['actual-size'];
    delete i['filename'];
    return i;
  };
  expect(info(a)).toEqual(info(b));
}

describe('img amend', () => {
  for (const [src, args] of [
    ['z.qcow2', ['-o', 'compat=0.10']],
    ['over.qcow2', ['-o', 'compat=0.10']],
    ['z.qcow2', ['-o', 'compat=v2']],
    ['z.qcow2', ['-o', 'lazy_refcounts=on']],
    ['v2.qcow2', ['-o', 'compat=1.1']],
    ['v2.qcow2', ['-o', 'compat=v3,lazy_refcounts=on']],
    ['z.qcow2', ['-o', 'size=2M']],
    ['over.qcow2', ['-o', 'backing_file=base.qcow2,backing_fmt=qcow2']],
    ['z.qcow2', ['-f', 'qcow2', '-o', 'lazy_refcounts=on', '-o', 'lazy_refcounts=off']],
  ] as const) {
    it(`${src} ${args.join(' ')}: as qemu-img`, () => run(src, [...args]));
  }

  for (const [src, args] of [
    ['z.qcow2', ['-o', 'cluster_size=4k']],
    ['z.qcow2', ['-o', 'bogus=1']],
    ['z.qcow2', []],
    ['ext.qcow2', ['-o', 'compat=0.10']],
    ['rc8.qcow2', ['-o', 'compat=0.10']],
    ['z.qcow2', ['-o', 'compat=0.10,lazy_refcounts=on']],
    ['v2.qcow2', ['-o', 'lazy_refcounts=on']],
    ['z.qcow2', ['-o', 'compat=1.2']],
    ['z.qcow2', ['-o', 'backing_fmt=qcow2']],
    ['over.qcow2', ['-o', 'backing_file=mid.qcow2']],
    ['z.qcow2', ['-o', 'lazy_refcounts=maybe']],
    ['z.qcow2', ['-o', 'size=1000001']],
  ] as const) {
    it(`${src} ${args.join(' ') || '(no -o)'}: refused with qemu-img's message, image unchanged`, () => run(src, [...args]));
  }

  it('refuses raw images like qemu-img', () => {
    const s = spindle('img', 'amend', '-f', 'raw', '-o', 'size=2M', p('r.raw'));
    expect(s.status).toBe(1);
    expect(s.stderr).toBe("spindle img: Format driver 'raw' does not support option amendment\n");
  });
});
