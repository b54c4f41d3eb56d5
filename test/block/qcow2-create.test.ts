// qcow2 creation (createQcow2), checked with the reference peer: qemu-img check/info/map and
// qemu-io must accept every image and agree on its geometry.
import { spawnSync } from 'node:child_process';
import { readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { attachRoot, detachRoot, openNode, settleCloses, unref } from '../../src/block/graph.js';
import { BlockError } from '../../src/block/error.js';
import { createQcow2, measureQcow2, planQcow2, type Qcow2CreateOptions } from '../../src/block/drivers/qcow2/create.js';
import { getRefcount, parseHeader, setRefcount } from '../../src/block/drivers/qcow2/format.js';
import { qcow2FormatSpecific } from '../../src/block/drivers/qcow2/info.js';
import * as io from '../../src/block/io.js';
import { Perm } from '../../src/block/types.js';
import { scratchDir } from '../helpers/tmp.js';

const dir = scratchDir('spindle-qcow2-create-');
let seq = 0;

function run(cmd: string, args: string[]): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync(cmd, args, { encoding: 'utf8', timeout: 120_000 });
  if (r.error) throw new Error(`${cmd} is needed by these tests (Debian qemu-utils): ${r.error.message}`);
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

/** Creates an image with createQcow2 through a file node, as `img create` does. */
async function create(opts: Qcow2CreateOptions, name = `img${seq++}.qcow2`): Promise<string> {
  const path = join(dir, name);
  writeFileSync(path, '');
  const node = await openNode({ driver: 'file', filename: path });
  const edge = attachRoot({ parentKind: 'job', describeUser: () => 'test' }, node, 'root', {
    perm: Perm.CONSISTENT_READ | Perm.WRITE | Perm.RESIZE,
    shared: Perm.CONSISTENT_READ,
  });
  try {
    await createQcow2(edge, opts);
  } finally {
    detachRoot(edge);
    unref(node);
    await settleCloses();
  }
  return path;
}

function check(path: string): void {
  const r = run('qemu-img', ['check', path]);
  expect(r.stderr).toBe('');
  expect(r.stdout).toMatch(/No errors were found on the image\./);
  expect(r.status).toBe(0);
}

function info(path: string): Record<string, any> {
  const r = run('qemu-img', ['info', '-U', '--output=json', path]);
  expect(r.status, r.stderr).toBe(0);
  return JSON.parse(r.stdout);
}

/** Writes and reads back a pattern with qemu-io, then checks the image again. */
function usable(path: string, at = 0): void {
  const r = run('qemu-io', ['-f', 'qcow2', '-c', `write -P 0xab ${at} 64k`, '-c', `read -P 0xab ${at} 64k`, path]);
  expect(r.status, r.stdout + r.stderr).toBe(0);
  expect(r.stdout).not.toMatch(/fail|error|Pattern verification/i);
  check(path);
}

function headerOf(path: string) {
  return parseHeader(readFileSync(path).subarray(0, 2 << 20));
}

describe('getRefcount/setRefcount', () => {
  it('round-trip every width, packed as the spec says', () => {
    for (const bits of [1, 2, 4, 8, 16, 32, 64]) {
      const block = Buffer.alloc(512);
      const n = (512 * 8) / bits;
      const max = bits >= 53 ? Number.MAX_SAFE_INTEGER : 2 ** bits - 1;
      const value = (i: number) => (i * 2654435761) % (max + 1);
      for (let i = 0; i < n; i++) setRefcount(block, i, bits, value(i));
      for (let i = 0; i < n; i++) expect(getRefcount(block, i, bits)).toBe(value(i));
      // Neighbours stay untouched when one entry changes.
      setRefcount(block, 5, bits, 1);
      expect(getRefcount(block, 4, bits)).toBe(value(4));
      expect(getRefcount(block, 6, bits)).toBe(value(6));
      expect(() => setRefcount(block, 0, bits, max + 1)).toThrow(RangeError);
    }
  });

  it('sub-byte entries start at the least significant bits; wider ones are big-endian', () => {
    const b = Buffer.alloc(8);
    setRefcount(b, 1, 1, 1);
    expect(b[0]).toBe(0b10);
    setRefcount(b, 1, 4, 0xa);
    expect(b[0]).toBe(0xa2);
    setRefcount(b, 1, 16, 0x1234);
    expect(b.subarray(2, 4)).toEqual(Buffer.from([0x12, 0x34]));
    setRefcount(b, 0, 64, 2 ** 40 + 3);
    expect(b.readBigUInt64BE(0)).toBe(2n ** 40n + 3n);
  });
});

describe('createQcow2', () => {
  it('makes the same layout as qemu-img for the default options', async () => {
    const mine = await create({ size: 1 << 30 });
    const theirs = join(dir, 'qemu-default.qcow2');
    expect(run('qemu-img', ['create', '-q', '-f', 'qcow2', theirs, '1G']).status).toBe(0);
    // Byte for byte: header, extensions, refcount structures and L1 in the same places.
    expect(readFileSync(mine).equals(readFileSync(theirs))).toBe(true);
    check(mine);
    usable(mine);
  });

  const matrix: [string, Qcow2CreateOptions][] = [];
  for (const clusterSize of [512, 4096, 65536, 2 << 20]) {
    for (const compat of ['0.10', '1.1'] as const) matrix.push([`cluster_size=${clusterSize},compat=${compat}`, { size: 64 << 20, clusterSize, compat }]);
  }
  for (const refcountBits of [1, 2, 4, 8, 16, 32, 64]) matrix.push([`refcount_bits=${refcountBits}`, { size: 64 << 20, refcountBits, clusterSize: 4096 }]);
  matrix.push(['lazy_refcounts=on', { size: 64 << 20, lazyRefcounts: true }]);
  matrix.push(['extended_l2=on', { size: 64 << 20, extendedL2: true }]);
  matrix.push(['extended_l2=on,cluster_size=16k', { size: 64 << 20, extendedL2: true, clusterSize: 16384 }]);
  matrix.push(['size=0', { size: 0 }]);
  matrix.push(['size=1', { size: 1 }]);
  matrix.push(['compat=v2', { size: 64 << 20, compat: 'v2' }]);

  /** qemu-img's -o string for the same options. */
  function qemuOpts(o: Qcow2CreateOptions): string {
    const parts: string[] = [];
    if (o.clusterSize) parts.push(`cluster_size=${o.clusterSize}`);
    if (o.compat) parts.push(`compat=${o.compat}`);
    if (o.refcountBits) parts.push(`refcount_bits=${o.refcountBits}`);
    if (o.lazyRefcounts) parts.push('lazy_refcounts=on');
    if (o.extendedL2) parts.push('extended_l2=on');
    if (o.preallocation) parts.push(`preallocation=${o.preallocation}`);
    return parts.join(',') || 'cluster_size=65536';
  }

  for (const [name, o] of matrix) {
    it(`${name}: qemu-img checks, reads and writes it, and agrees on the geometry`, async () => {
      const path = await create(o);
      check(path);
      const i = info(path);
      const v3 = o.compat !== '0.10' && o.compat !== 'v2';
      expect(i['virtual-size']).toBe(Math.ceil(o.size! / 512) * 512);
      expect(i['cluster-size']).toBe(o.clusterSize ?? 65536);
      expect(i['format']).toBe('qcow2');
      expect(i['format-specific']).toEqual(qcow2FormatSpecific(headerOf(path)));
      expect(i['format-specific'].data).toEqual(v3
        ? { compat: '1.1', 'compression-type': 'zlib', 'lazy-refcounts': !!o.lazyRefcounts, 'refcount-bits': o.refcountBits ?? 16, corrupt: false, 'extended-l2': !!o.extendedL2 }
        : { compat: '0.10', 'compression-type': 'zlib', 'refcount-bits': 16 });
      // Same L1 and refcount table sizes, in the same places, as qemu-img's image.
      const theirs = join(dir, `qemu-${seq++}.qcow2`);
      const q = run('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', qemuOpts(o), theirs, String(o.size)]);
      expect(q.status, q.stderr).toBe(0);
      const [a, b] = [headerOf(path), headerOf(theirs)];
      for (const k of ['version', 'clusterBits', 'size', 'l1Size', 'l1TableOffset', 'refcountTableOffset', 'refcountTableClusters', 'refcountOrder', 'incompatible', 'compatible', 'headerLength'] as const) {
        expect(a[k], k).toEqual(b[k]);
      }
      expect(a.extensions).toEqual(b.extensions);
      expect(statSync(path).size).toBe(statSync(theirs).size);
      if (o.size! >= 64 << 10) usable(path, o.size! - (64 << 10));
    });
  }

  for (const preallocation of ['metadata', 'falloc', 'full'] as const) {
    it(`preallocation=${preallocation}: every cluster mapped, image checks and is usable`, async () => {
      const o: Qcow2CreateOptions = { size: 3 << 20, clusterSize: 4096, preallocation };
      const path = await create(o);
      check(path);
      const theirs = join(dir, `qemu-prealloc-${preallocation}.qcow2`);
      expect(run('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', `cluster_size=4096,preallocation=${preallocation}`, theirs, '3M']).status).toBe(0);
      expect(statSync(path).size).toBe(statSync(theirs).size);
      const map = JSON.parse(run('qemu-img', ['map', '--output=json', path]).stdout);
      // One extent per L2 table (each is followed by its data clusters), all data.
      expect(map.every((e: any) => e.data && e.present && e.depth === 0)).toBe(true);
      expect(map.reduce((n: number, e: any) => n + e.length, 0)).toBe(3 << 20);
      if (preallocation === 'metadata') {
        // Byte for byte what qemu-img writes: L2 tables interleaved with their data.
        expect(readFileSync(path).equals(readFileSync(theirs))).toBe(true);
      } else {
        expect(statSync(path).blocks * 512).toBeGreaterThanOrEqual(3 << 20);
      }
      usable(path, 1 << 20);
    });
  }

  it('preallocation with extended L2 entries leaves subclusters unallocated over a backing file', async () => {
    const base = join(dir, 'prealloc-base.raw');
    writeFileSync(base, Buffer.alloc(1 << 20, 0x5a));
    const path = await create({ size: 1 << 20, extendedL2: true, preallocation: 'metadata', backingFile: 'prealloc-base.raw', backingFormat: 'raw' });
    check(path);
    const r = run('qemu-io', ['-f', 'qcow2', '-c', 'read -P 0x5a 0 1M', path]);
    expect(r.stdout).not.toMatch(/fail|Pattern verification/i);
    expect(r.status).toBe(0);
    usable(path);
  });

  it('backing file with a format: stored as given, qemu-img reports and reads through it', async () => {
    const base = join(dir, 'base.qcow2');
    expect(run('qemu-img', ['create', '-q', '-f', 'qcow2', base, '2M']).status).toBe(0);
    expect(run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x11 0 1M', base]).status).toBe(0);
    const path = await create({ size: 2 << 20, backingFile: 'base.qcow2', backingFormat: 'qcow2' });
    check(path);
    const i = info(path);
    expect(i['backing-filename']).toBe('base.qcow2');
    expect(i['full-backing-filename']).toBe(join(dir, 'base.qcow2'));
    expect(i['backing-filename-format']).toBe('qcow2');
    const r = run('qemu-io', ['-f', 'qcow2', '-c', 'read -P 0x11 0 1M', '-c', 'write -P 0xab 64k 64k', '-c', 'read -P 0x11 0 64k', '-c', 'read -P 0xab 64k 64k', path]);
    expect(r.stdout).not.toMatch(/fail|Pattern verification/i);
    check(path);
  });

  it('backing file without a format, and with 512-byte clusters (no room for the feature table)', async () => {
    const a = await create({ size: 2 << 20, backingFile: 'base.qcow2' });
    check(a);
    const i = info(a);
    expect(i['backing-filename']).toBe('base.qcow2');
    expect('backing-filename-format' in i).toBe(false);
    writeFileSync(join(dir, 'x'.repeat(200)), Buffer.alloc(2 << 20));
    const b = await create({ size: 2 << 20, clusterSize: 512, backingFile: 'x'.repeat(200), backingFormat: 'raw' });
    expect(headerOf(b).backingFile).toBe('x'.repeat(200));
    check(b);
  });

  it('large virtual sizes: 4 TiB with 64k clusters, 100 GiB with 512-byte clusters', async () => {
    const a = await create({ size: 4 * 2 ** 40 });
    check(a);
    expect(headerOf(a).l1Size).toBe(8192);
    usable(a, 4 * 2 ** 40 - (64 << 10));
    // 3.2 million L1 entries and 201 refcount blocks: the refcount structure covers them all.
    const b = await create({ size: 100 * 2 ** 30, clusterSize: 512 }, 'big512.qcow2');
    check(b);
    const h = headerOf(b);
    expect(h.l1Size).toBe(3276800);
    expect(info(b)['virtual-size']).toBe(100 * 2 ** 30);
  }, 120_000);

  it('metadata preallocation that needs many refcount blocks', async () => {
    const path = await create({ size: 64 << 20, clusterSize: 512, refcountBits: 64, preallocation: 'metadata' });
    const p = planQcow2({ size: 64 << 20, clusterSize: 512, refcountBits: 64, preallocation: 'metadata' });
    expect(p.rbCount).toBeGreaterThan(2000);
    expect(p.rtClusters).toBeGreaterThan(1);
    check(path);
    usable(path, 32 << 20);
  }, 120_000);

  it("Spindle's own qcow2 driver opens, writes and reads them (and qemu-img still checks them)", async () => {
    const variants: Qcow2CreateOptions[] = [
      { size: 8 << 20 },
      { size: 8 << 20, compat: '0.10', clusterSize: 4096 },
      { size: 8 << 20, clusterSize: 512, refcountBits: 1 },
      { size: 8 << 20, refcountBits: 64, lazyRefcounts: true },
      { size: 8 << 20, extendedL2: true, preallocation: 'metadata' },
      { size: 8 << 20, clusterSize: 4096, preallocation: 'falloc' },
    ];
    for (const o of variants) {
      const path = await create(o);
      const node = await openNode({ driver: 'qcow2', file: { driver: 'file', filename: path } });
      const edge = attachRoot({ parentKind: 'job', describeUser: () => 'test' }, node, 'root', { perm: Perm.CONSISTENT_READ | Perm.WRITE, shared: Perm.CONSISTENT_READ });
      try {
        expect(node.length).toBe(8 << 20);
        const data = Buffer.alloc(192 << 10, 0xcd);
        await io.write(edge, (3 << 20) - 4096, data);
        const back = Buffer.alloc(data.length);
        await io.read(edge, (3 << 20) - 4096, back);
        expect(back.equals(data), JSON.stringify(o)).toBe(true);
        const zero = Buffer.alloc(4096, 1);
        await io.read(edge, 0, zero);
        expect(zero.every((b) => b === 0)).toBe(true);
        await io.flush(edge);
      } finally {
        detachRoot(edge);
        unref(node);
        await settleCloses();
      }
      check(path);
      const r = run('qemu-io', ['-f', 'qcow2', '-c', `read -P 0xcd ${(3 << 20) - 4096} 192k`, path]);
      expect(r.stdout, JSON.stringify(o)).not.toMatch(/fail|Pattern verification/i);
    }
  });

  it('refuses what qemu-img refuses, with its messages', () => {
    const bad: [Qcow2CreateOptions, string][] = [
      [{}, 'Image creation needs a size parameter'],
      [{ size: 1 << 20, clusterSize: 1000 }, 'Cluster size must be a power of two between 512 and 2048k'],
      [{ size: 1 << 20, clusterSize: 4 << 20 }, 'Cluster size must be a power of two between 512 and 2048k'],
      [{ size: 1 << 20, refcountBits: 3 }, 'Refcount width must be a power of two and may not exceed 64 bits'],
      [{ size: 1 << 20, refcountBits: 128 }, 'Refcount width must be a power of two and may not exceed 64 bits'],
      [{ size: 1 << 20, compat: '0.10', refcountBits: 8 }, 'Different refcount widths than 16 bits require compatibility level 1.1 or above (use version=v3 or greater)'],
      [{ size: 1 << 20, compat: '0.10', lazyRefcounts: true }, 'Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)'],
      [{ size: 1 << 20, compat: '0.10', extendedL2: true }, 'Extended L2 entries are only supported with compatibility level 1.1 and above (use version=v3 or greater)'],
      [{ size: 1 << 20, extendedL2: true, clusterSize: 8192 }, 'Extended L2 entries are only supported with cluster sizes of at least 16384 bytes'],
      [{ size: 1 << 20, backingFormat: 'raw' }, 'Backing format cannot be used without backing file'],
      [{ size: 1 << 20, backingFile: 'b', preallocation: 'metadata' }, 'Backing file and preallocation can only be used at the same time if extended_l2 is on'],
      [{ size: 1 << 20, compat: '1.2' }, "Parameter 'version' does not accept value '1.2'"],
      [{ size: 1 << 20, preallocation: 'bogus' }, "Parameter 'preallocation' does not accept value 'bogus'"],
      [{ size: 4 * 2 ** 40, clusterSize: 512 }, "The image size is too large for file format 'qcow2' (try using a larger cluster size)"],
    ];
    for (const [o, msg] of bad) {
      let err: unknown;
      try {
        planQcow2(o);
      } catch (e) {
        err = e;
      }
      expect(err, msg).toBeInstanceOf(BlockError);
      expect((err as Error).message).toBe(msg);
    }
  });

  it('measureQcow2 matches qemu-img measure', () => {
    const cases: [string[], Qcow2CreateOptions][] = [
      [['--size', '1G'], { size: 1 << 30 }],
      [['--size', '0'], { size: 0 }],
      [['--size', '100G', '-o', 'cluster_size=512'], { size: 100 * 2 ** 30, clusterSize: 512 }],
      [['--size', '10G', '-o', 'cluster_size=2M,extended_l2=on,refcount_bits=1'], { size: 10 * 2 ** 30, clusterSize: 2 << 20, extendedL2: true, refcountBits: 1 }],
      [['--size', '1T'], { size: 2 ** 40 }],
      [['--size', '12345k', '-o', 'cluster_size=4k,refcount_bits=64'], { size: 12345 * 1024, clusterSize: 4096, refcountBits: 64 }],
    ];
    for (const [args, o] of cases) {
      const q = JSON.parse(run('qemu-img', ['measure', '-O', 'qcow2', '--output=json', ...args]).stdout);
      expect(measureQcow2(o), args.join(' ')).toEqual({ required: q.required, fullyAllocated: q['fully-allocated'] });
    }
  });
});
