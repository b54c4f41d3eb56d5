// img convert's fast paths (block status per extent, multi-run qcow2 reads issued at once,
// pipelined in-order writes into raw targets, zero blocks inside qcow2 clusters written as
// data) on images that take every branch: clusters scattered in the file, zero and
// discarded clusters, a backing chain, compressed clusters, extended L2. No timing here:
// bench/qcow2-bench.mjs measures; this checks that the results are exact.
import { closeSync, openSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { allocated, ensureBuilt, ok, qemuImg, qemuIo, spindle, tempDir } from './helpers.js';

const t = tempDir();
const MiB = 1 << 20;
const p = (name: string) => join(t.dir, name);

function identical(a: string, fa: string, b: string, fb: string): void {
  const r = qemuImg('compare', '-f', fa, '-F', fb, a, b);
  expect(r.stdout + r.stderr).toBe('Images are identical.\n');
}
function clean(img: string): void {
  const r = qemuImg('check', img);
  expect(r.stdout + r.stderr).toContain('No errors were found on the image.');
}

beforeAll(async () => {
  await ensureBuilt();
  // Clusters scattered in the file: 2 MiB pieces written out of guest order.
  ok(qemuImg('create', '-q', '-f', 'qcow2', p('frag.qcow2'), '64M'));
  qemuIo('qcow2', p('frag.qcow2'), ...[31, 3, 17, 9, 0, 25, 12, 6, 28, 1].map((i) => `write -P ${i + 1} ${i * 2}M 2M`),
    'write -P 7 100k 50k', 'write -z 4M 1M', 'discard 8M 512k', 'write -z -u 30M 2M');
  // A chain: base (raw data) <- mid <- top, the top longer than the base.
  const raw = p('base.raw');
  const fd = openSync(raw, 'w');
  writeSync(fd, Buffer.alloc(3 * MiB, 0x5a), 0, 3 * MiB, 5 * MiB + 12345);
  writeSync(fd, Buffer.alloc(MiB, 0x33), 0, MiB, 40 * MiB);
  closeSync(fd);
  ok(qemuImg('convert', '-q', '-f', 'raw', '-O', 'qcow2', raw, p('base.qcow2')));
  ok(qemuImg('resize', '-q', '-f', 'qcow2', p('base.qcow2'), '48M'));
  ok(qemuImg('create', '-q', '-f', 'qcow2', '-b', p('base.qcow2'), '-F', 'qcow2', p('mid.qcow2')));
  qemuIo('qcow2', p('mid.qcow2'), 'write -P 0xaa 1M 3M', 'write -z 6M 1M');
  ok(qemuImg('create', '-q', '-f', 'qcow2', '-b', p('mid.qcow2'), '-F', 'qcow2', p('top.qcow2'), '64M'));
  qemuIo('qcow2', p('top.qcow2'), 'write -P 0xcc 2M 100k', 'write -P 0xdd 60M 1M', 'discard 40M 512k');
});
afterAll(t.cleanup);

describe('img convert fast paths', () => {
  it('a fragmented qcow2 with zero and discarded clusters, to raw and to qcow2', () => {
    ok(spindle('img', 'convert', '-f', 'qcow2', '-O', 'raw', p('frag.qcow2'), p('frag.raw')));
    identical(p('frag.qcow2'), 'qcow2', p('frag.raw'), 'raw');
    ok(spindle('img', 'convert', '-W', '-m', '3', '-f', 'qcow2', '-O', 'raw', p('frag.qcow2'), p('frag-w.raw')));
    identical(p('frag.qcow2'), 'qcow2', p('frag-w.raw'), 'raw');
    ok(spindle('img', 'convert', '-f', 'qcow2', '-O', 'qcow2', p('frag.qcow2'), p('frag2.qcow2')));
    clean(p('frag2.qcow2'));
    identical(p('frag.qcow2'), 'qcow2', p('frag2.qcow2'), 'qcow2');
    // The zero and discarded ranges stayed holes.
    expect(allocated(p('frag.raw'))).toBeLessThan(allocated(p('frag-w.raw')) + MiB);
    expect(allocated(p('frag.raw'))).toBeLessThan(60 * MiB);
  });

  it('a backing chain, flattened and onto a new backing file', () => {
    ok(spindle('img', 'convert', '-f', 'qcow2', '-O', 'raw', p('top.qcow2'), p('top.raw')));
    identical(p('top.qcow2'), 'qcow2', p('top.raw'), 'raw');
    ok(spindle('img', 'convert', '-f', 'qcow2', '-O', 'qcow2', '-B', p('base.qcow2'), '-F', 'qcow2', p('top.qcow2'), p('topB.qcow2')));
    clean(p('topB.qcow2'));
    identical(p('top.qcow2'), 'qcow2', p('topB.qcow2'), 'qcow2');
  });

  it('compressed clusters and extended L2 subclusters read back exactly', () => {
    ok(qemuImg('convert', '-q', '-c', '-f', 'qcow2', '-O', 'qcow2', p('frag.qcow2'), p('comp.qcow2')));
    ok(spindle('img', 'convert', '-f', 'qcow2', '-O', 'raw', p('comp.qcow2'), p('comp.raw')));
    identical(p('frag.qcow2'), 'qcow2', p('comp.raw'), 'raw');
    ok(qemuImg('create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on', '-b', p('base.qcow2'), '-F', 'qcow2', p('ext.qcow2')));
    qemuIo('qcow2', p('ext.qcow2'), 'write -P 0x11 4k 8k', 'write -P 0x12 5M 200k', 'write -z 6M 6k', 'write -P 0x13 40M 1M');
    ok(spindle('img', 'convert', '-f', 'qcow2', '-O', 'raw', p('ext.qcow2'), p('ext.raw')));
    identical(p('ext.qcow2'), 'qcow2', p('ext.raw'), 'raw');
  });

  it('zero blocks inside a qcow2 target cluster are written as data; whole zero clusters stay unallocated', () => {
    const raw = p('blocks.raw');
    const fd = openSync(raw, 'w');
    // A 64 KiB cluster with data, a zero 4 KiB block, data; then a whole zero cluster, then data.
    writeSync(fd, Buffer.alloc(4096, 1), 0, 4096, 0);
    writeSync(fd, Buffer.alloc(4096, 0), 0, 4096, 4096);
    writeSync(fd, Buffer.alloc(56 * 1024, 2), 0, 56 * 1024, 8192);
    writeSync(fd, Buffer.alloc(64 * 1024, 0), 0, 64 * 1024, 64 * 1024);
    writeSync(fd, Buffer.alloc(64 * 1024, 3), 0, 64 * 1024, 128 * 1024);
    closeSync(fd);
    ok(spindle('img', 'convert', '-f', 'raw', '-O', 'qcow2', raw, p('blocks.qcow2')));
    clean(p('blocks.qcow2'));
    identical(raw, 'raw', p('blocks.qcow2'), 'qcow2');
    const map = JSON.parse(qemuImg('map', '--output=json', p('blocks.qcow2')).stdout) as { start: number; length: number; data: boolean }[];
    const data = map.filter((e) => e.data).map((e) => [e.start, e.start + e.length]);
    expect(data).toEqual([[0, 64 * 1024], [128 * 1024, 192 * 1024]]);
  });
});
