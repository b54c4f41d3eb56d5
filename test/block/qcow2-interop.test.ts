// qcow2 read interop: images that qemu-img/qemu-io wrote must read back through Spindle
// byte for byte as `qemu-img convert -O raw` reads them.
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { attachRoot, detachRoot, openNode, settleCloses, unref } from '../../src/block/graph.js';
import * as io from '../../src/block/io.js';
import type { BlockChild, BlockNode, BlockParent } from '../../src/block/node.js';
import { Perm, ReqFlags, type NodeOptions } from '../../src/block/types.js';
import { compressedImage, createImage, expectClean, expectEqual, qemuInfo, qemuIo, qemuRaw, sha256 } from '../helpers/qemu.js';
import { pattern, scratchDir } from '../helpers/tmp.js';
import { rng } from './conformance.js';

const dir = scratchDir('spindle-qcow2-interop-');
const MiB = 1 << 20;
const user: BlockParent = { parentKind: 'job', describeUser: () => 'the qcow2 interop test' };
let seq = 0;
const path = (name: string): string => join(dir, `${seq++}-${name}`);

const open: { node: BlockNode; e: BlockChild }[] = [];
async function closeAll(): Promise<void> {
  for (const { node, e } of open.splice(0)) {
    if (node.parents.includes(e)) detachRoot(e);
    if (!node.deleted) unref(node);
  }
  await settleCloses();
}
afterEach(closeAll);

async function openRo(filename: string, extra: Partial<NodeOptions> = {}, rw = false): Promise<{ node: BlockNode; e: BlockChild }> {
  const node = await openNode({ driver: 'qcow2', 'read-only': !rw, file: { driver: 'file', filename }, ...extra });
  const e = attachRoot(user, node, 'root', { perm: Perm.CONSISTENT_READ | (rw ? Perm.WRITE : 0), shared: Perm.ALL });
  const rec = { node, e };
  open.push(rec);
  return rec;
}

/**
 * Reads the whole virtual disk twice through Spindle: once in one request (cold cache,
 * general path) and once in seeded odd-sized chunks (warm cache, fast path); both must agree.
 */
async function spindleRaw(filename: string, extra: Partial<NodeOptions> = {}): Promise<Buffer> {
  const { node, e } = await openRo(filename, extra);
  const len = node.length;
  const whole = Buffer.alloc(len, 0xee);
  await io.read(e, 0, whole);
  const chunked = Buffer.alloc(len, 0xdd);
  const r = rng(len % 100_003);
  for (let pos = 0; pos < len; ) {
    const n = Math.min(len - pos, 1 + r(3 * 65536));
    await io.read(e, pos, chunked.subarray(pos, pos + n));
    pos += n;
  }
  expect(sha256(chunked), 'chunked read equals whole read').toBe(sha256(whole));
  await closeAll();
  return whole;
}

/** Asserts Spindle's and qemu's views of the image are byte-identical. */
async function expectSameAsQemu(filename: string): Promise<Buffer> {
  const want = qemuRaw(filename);
  const got = await spindleRaw(filename);
  expect(got.length).toBe(want.length);
  if (!got.equals(want)) {
    let i = 0;
    while (got[i] === want[i]) i++;
    expect.fail(`first difference at byte ${i}: Spindle ${got[i]}, qemu ${want[i]}`);
  }
  return got;
}

/** A spread of qemu-io writes at odd offsets and lengths, within `size`. */
function writes(size: number, seed: number, clusterSize = 65536): string[] {
  const r = rng(seed);
  const cmds: string[] = [];
  for (let i = 0; i < 12; i++) {
    const len = 1 + r(40_000);
    cmds.push(`write -P 0x${(0x50 + i).toString(16)} ${r(size - len)} ${len}`);
  }
  // Last, so the random ones do not cover them: the test checks these bytes.
  cmds.push(
    `write -P 0x33 ${3 * clusterSize + 511} ${2 * clusterSize + 3}`, // spans whole clusters
    `write -P 0x22 ${clusterSize - 7} 14`, // crosses a cluster boundary
    `write -P 0x11 65000 1000`,
    `write -P 0x44 ${size - 777} 777`, // the last bytes
  );
  return cmds;
}

interface Variant {
  name: string;
  opts: string[];
  size: number;
  clusterSize: number;
}
const variants: Variant[] = [
  { name: 'default (64k, v3)', opts: [], size: 8 * MiB, clusterSize: 65536 },
  { name: 'compat=0.10 (v2)', opts: ['compat=0.10'], size: 8 * MiB, clusterSize: 65536 },
  { name: 'cluster_size=512', opts: ['cluster_size=512'], size: 2 * MiB, clusterSize: 512 },
  { name: 'cluster_size=2M', opts: ['cluster_size=2M'], size: 52 * MiB, clusterSize: 2 * MiB },
  { name: 'refcount_bits=1', opts: ['refcount_bits=1'], size: 4 * MiB, clusterSize: 65536 },
  { name: 'refcount_bits=64', opts: ['refcount_bits=64'], size: 4 * MiB, clusterSize: 65536 },
  { name: 'extended_l2 64k', opts: ['extended_l2=on', 'cluster_size=64k'], size: 4 * MiB, clusterSize: 65536 },
  { name: 'extended_l2 128k', opts: ['extended_l2=on', 'cluster_size=128k'], size: 6 * MiB, clusterSize: 131072 },
  { name: 'extended_l2 16k', opts: ['extended_l2=on', 'cluster_size=16k'], size: 2 * MiB, clusterSize: 16384 },
  { name: 'lazy_refcounts=on', opts: ['lazy_refcounts=on'], size: 4 * MiB, clusterSize: 65536 },
];

describe('qcow2 read interop: images written by qemu', () => {
  for (const v of variants) {
    it(`${v.name}: data, zero, discarded clusters`, async () => {
      const p = createImage(path('v.qcow2'), v.size, v.opts);
      const cs = v.clusterSize;
      const cmds = writes(v.size, v.size + v.opts.length, cs);
      // Zeroes over data (whole clusters, with and without unmap), and partial zeroes.
      cmds.push(`write -P 0x77 ${8 * cs} ${6 * cs}`);
      expect(26 * cs).toBeLessThanOrEqual(v.size);
      cmds.push(`write -z ${8 * cs} ${cs}`, `write -z -u ${10 * cs} ${2 * cs}`, `write -z ${12 * cs + 100} 300`);
      cmds.push(`discard ${13 * cs} ${cs}`);
      // Subcluster-sized pieces: for extended L2, partial allocation inside one cluster.
      const sc = v.opts.includes('extended_l2=on') ? cs / 32 : cs;
      cmds.push(`write -P 0x88 ${16 * cs + 3 * sc + 5} ${sc}`, `write -z ${16 * cs + 7 * sc} ${2 * sc}`);
      cmds.push(`write -P 0x99 ${17 * cs} ${cs}`, `discard ${17 * cs + 4 * sc} ${sc}`);
      qemuIo(p, cmds);
      const info = qemuInfo(p);
      expect(info['cluster-size']).toBe(cs);
      expect(info['format-specific']?.data['compat']).toBe(v.opts.includes('compat=0.10') ? '0.10' : '1.1');
      const got = await expectSameAsQemu(p);
      // The patterns are really there (the comparison is not of two empty disks).
      expect(got[65000]).toBe(0x11);
      expect(got[v.size - 1]).toBe(0x44);
      expect(got[16 * cs + 3 * sc + 5]).toBe(0x88);
      expect(got.subarray(8 * cs, 9 * cs).equals(Buffer.alloc(cs))).toBe(true);
    });
  }

  it('compressed clusters (qemu-img convert -c), with zero runs and small tails', async () => {
    for (const cs of [65536, 4096, 512]) {
      const p = path('c.qcow2');
      const data = compressedImage(p, 3 * MiB, cs, [`cluster_size=${cs}`]);
      const got = await expectSameAsQemu(p);
      expect(got.equals(data)).toBe(true);
      // Overwrite some compressed clusters partially with qemu: mixed compressed and normal.
      qemuIo(p, [`write -P 0x5c ${cs + 17} 100`, `write -z ${4 * cs} ${cs}`]);
      data.fill(0x5c, cs + 17, cs + 117).fill(0, 4 * cs, 5 * cs);
      expect((await expectSameAsQemu(p)).equals(data)).toBe(true);
    }
  });

  it('a 3-deep chain (raw base shorter than its overlays) reads through every layer', async () => {
    const base = path('base.raw');
    const baseData = pattern(3 * MiB + 1234, 7); // shorter than the overlays, not cluster aligned
    writeFileSync(base, baseData);
    const mid = createImage(path('mid.qcow2'), 6 * MiB, [], { file: base, fmt: 'raw' });
    qemuIo(mid, ['write -P 0xa1 65000 1000', 'write -P 0xa2 2000000 300000', 'write -z 131072 65536']);
    const top = createImage(path('top.qcow2'), 8 * MiB, ['cluster_size=4k'], { file: mid, fmt: 'qcow2' });
    qemuIo(top, ['write -P 0xb1 65500 100', 'write -P 0xb2 3145000 5000', 'write -P 0xb3 7000001 999', 'discard 2097152 65536']);
    const got = await expectSameAsQemu(top);
    expect(got[65000]).toBe(0xa1);
    expect(got[65500]).toBe(0xb1);
    expect(got.subarray(0, 1000).equals(baseData.subarray(0, 1000))).toBe(true);
    // Past the raw base and past the mid layer: zeroes (except what the top wrote).
    expect(got.subarray(3150000, 6 * MiB).equals(Buffer.alloc(6 * MiB - 3150000))).toBe(true);
    expect(got.subarray(6 * MiB, 7000001).equals(Buffer.alloc(7000001 - 6 * MiB))).toBe(true);
    // The chain opened each backing file with the recorded format.
    const { node } = await openRo(top);
    expect(node.backing?.node.driver.format).toBe('qcow2');
    expect(node.backing?.node.backing?.node.driver.format).toBe('raw');
    expect(node.backing?.node.backing?.node.backing).toBeUndefined();
  });

  it('a 3-deep all-qcow2 chain of different geometries, mid layer shorter than the top', async () => {
    const base = createImage(path('b.qcow2'), 2 * MiB, ['cluster_size=512', 'refcount_bits=8']);
    qemuIo(base, ['write -P 0xc1 0 2097152', 'write -z 1000000 4096']);
    const mid = createImage(path('m.qcow2'), 3 * MiB + 512, ['extended_l2=on', 'cluster_size=32k'], { file: base, fmt: 'qcow2' });
    qemuIo(mid, ['write -P 0xc2 1025 2000', 'write -z 40960 2048', 'write -P 0xc3 3000000 145000']);
    const top = createImage(path('t.qcow2'), 5 * MiB, ['compat=0.10'], { file: mid, fmt: 'qcow2' });
    qemuIo(top, ['write -P 0xc4 1500 100', 'write -P 0xc5 3145700 10000']);
    const got = await expectSameAsQemu(top);
    expect(got[1500]).toBe(0xc4);
    expect(got[1025]).toBe(0xc2);
    expect(got[500]).toBe(0xc1);
    expect(got[40960]).toBe(0);
    expect(got.subarray(3 * MiB + 512 + 20000, 5 * MiB).equals(Buffer.alloc(5 * MiB - 3 * MiB - 512 - 20000))).toBe(true);
  });

  it('relative backing paths resolve against the overlay, not the working directory', async () => {
    const root = path('rel');
    mkdirSync(join(root, 'a'), { recursive: true });
    mkdirSync(join(root, 'b', 'c'), { recursive: true });
    const base = createImage(join(root, 'a', 'base.qcow2'), 2 * MiB);
    qemuIo(base, ['write -P 0xd1 100000 5000']);
    // Created from inside the overlay's directory with a relative -b.
    createImage('mid.qcow2', 2 * MiB, [], { file: '../a/base.qcow2', fmt: 'qcow2' }, join(root, 'b'));
    createImage('top.qcow2', 2 * MiB, [], { file: '../mid.qcow2', fmt: 'qcow2' }, join(root, 'b', 'c'));
    const top = join(root, 'b', 'c', 'top.qcow2');
    qemuIo(top, ['write -P 0xd2 100500 10']);
    expect(qemuInfo(top)['backing-filename']).toBe('../mid.qcow2');
    expect(process.cwd()).not.toBe(join(root, 'b', 'c'));
    const got = await expectSameAsQemu(top);
    expect(got[100000]).toBe(0xd1);
    expect(got[100500]).toBe(0xd2);
  });

  it('backing: null opens the overlay alone (unallocated reads zero)', async () => {
    const base = createImage(path('bn.qcow2'), MiB);
    qemuIo(base, ['write -P 0xe1 0 1048576']);
    const top = createImage(path('tn.qcow2'), MiB, [], { file: base, fmt: 'qcow2' });
    qemuIo(top, ['write -P 0xe2 4096 512']);
    const got = await spindleRaw(top, { backing: null });
    // qemu's copy-on-write filled the rest of the written cluster from the backing file.
    const want = Buffer.alloc(MiB);
    want.fill(0xe1, 0, 65536).fill(0xe2, 4096, 4608);
    expect(got.equals(want)).toBe(true);
  });

  it('round trip: Spindle writes, qemu-io writes over it, Spindle reads both', async () => {
    const p = createImage(path('rt.qcow2'), 4 * MiB);
    const model = Buffer.alloc(4 * MiB);
    const { e } = await openRo(p, { discard: 'unmap' }, true);
    const a = pattern(200_000, 12);
    await io.write(e, 65000, a);
    await io.writeZeroes(e, 131072, 65536, ReqFlags.MAY_UNMAP);
    await io.flush(e);
    await closeAll();
    a.copy(model, 65000);
    model.fill(0, 131072, 196608);
    qemuIo(p, ['write -P 0x5e 100000 3000', 'write -P 0x5f 1048570 20', 'discard 1048576 65536']);
    model.fill(0x5e, 100000, 103000).fill(0x5f, 1048570, 1048576);
    expectEqual(await expectSameAsQemu(p), model, 'Spindle reading the mixed image');
    expectClean(p);
  });
});
