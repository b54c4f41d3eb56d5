// img convert to and from qcow2, compressed or not: QEMU checks and compares the results.
import { closeSync, openSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ensureBuilt, ok, qemuImg, spindle, tempDir } from './helpers.js';

const t = tempDir();
const MiB = 1 << 20;
const src = join(t.dir, 'src.img');

function det(n: number, seed: number): Buffer {
  const b = Buffer.alloc(n);
  let x = seed;
  for (let i = 0; i < n; i++) b[i] = (x = (x * 1103515245 + 12345) >>> 0) >>> 24;
  return b;
}

beforeAll(async () => {
  await ensureBuilt();
  ok(spindle('img', 'create', src, String(16 * MiB)));
  const fd = openSync(src, 'r+');
  writeSync(fd, det(MiB, 1), 0, MiB, 0); // incompressible
  writeSync(fd, Buffer.alloc(2 * MiB, 0x5a), 0, 2 * MiB, 4 * MiB + 4096); // compressible, unaligned
  writeSync(fd, det(1000, 2), 0, 1000, 16 * MiB - 1000); // a partial last cluster
  closeSync(fd);
});
afterAll(t.cleanup);

function clean(img: string): string {
  const r = qemuImg('check', img);
  expect(r.status, r.stdout + r.stderr).toBe(0);
  expect(r.stdout).toContain('No errors were found on the image.');
  return r.stdout;
}
function identical(a: string, b: string): void {
  const r = qemuImg('compare', a, b);
  expect(r.stdout + r.stderr).toBe('Images are identical.\n');
}

describe('img convert with qcow2', () => {
  it('raw to qcow2 with -o options, then back to raw', () => {
    const q = join(t.dir, 'a.qcow2');
    ok(spindle('img', 'convert', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=4096,refcount_bits=64', src, q));
    clean(q);
    const info = JSON.parse(qemuImg('info', '--output=json', q).stdout) as { 'cluster-size': number; 'format-specific': { data: { 'refcount-bits': number } } };
    expect(info['cluster-size']).toBe(4096);
    expect(info['format-specific'].data['refcount-bits']).toBe(64);
    identical(src, q);
    const back = join(t.dir, 'a.raw');
    ok(spindle('img', 'convert', '-f', 'qcow2', '-O', 'raw', q, back));
    identical(src, back);
  });

  it('-c stores compressed clusters that QEMU reads, and leaves incompressible data plain', () => {
    const q = join(t.dir, 'c.qcow2');
    ok(spindle('img', 'convert', '-c', '-f', 'raw', '-O', 'qcow2', src, q));
    const out = clean(q);
    const compressed = Number(/([\d.]+)% compressed clusters/.exec(out)![1]);
    expect(compressed).toBeGreaterThan(0);
    identical(src, q);
    // The 2 MiB of 0x5a shrank: the image is far smaller than its data.
    const plain = join(t.dir, 'p.qcow2');
    ok(spindle('img', 'convert', '-f', 'raw', '-O', 'qcow2', src, plain));
    const size = (f: string) => (JSON.parse(qemuImg('info', '--output=json', f).stdout) as { 'actual-size': number })['actual-size'];
    expect(size(q)).toBeLessThan(size(plain) - MiB);
  });

  it('qcow2 written by qemu-img -c converts back exactly', () => {
    const q = join(t.dir, 'qc.qcow2');
    expect(qemuImg('convert', '-c', '-f', 'raw', '-O', 'qcow2', src, q).status).toBe(0);
    const out = join(t.dir, 'qc.raw');
    ok(spindle('img', 'convert', '-O', 'raw', q, out));
    identical(src, out);
  });

  it('--target-is-zero skips zeroing an existing target, and needs -n', () => {
    const q = join(t.dir, 'tz.qcow2');
    expect(qemuImg('create', '-f', 'qcow2', q, String(16 * MiB)).status).toBe(0);
    ok(spindle('img', 'convert', '-n', '--target-is-zero', '-f', 'raw', '-O', 'qcow2', src, q));
    clean(q);
    identical(src, q);
    // Nothing was written for the source's zero ranges: they stay unallocated.
    const map = JSON.parse(qemuImg('map', '--output=json', q).stdout) as { start: number; length: number; present: boolean }[];
    expect(map.some((e) => !e.present && e.start <= 2 * MiB && e.start + e.length >= 3 * MiB)).toBe(true);
    const r = spindle('img', 'convert', '--target-is-zero', '-f', 'raw', '-O', 'qcow2', src, join(t.dir, 'no.qcow2'));
    expect(r.status).toBe(1);
    expect(r.stderr).toBe('spindle img: --target-is-zero requires use of -n flag\n');
  });
});
