// qcow2 write interop: a seeded random workload through Spindle on images qemu made (fresh,
// pre-populated, v2, growing refcount tables, subclusters, backing files, compressed clusters,
// internal snapshots); afterwards qemu must find the image clean and read what the model says.
import { copyFileSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { createBackend, type BlockBackend } from '../../src/backend/backend.js';
import type { BackendIO } from '../../src/backend/io.js';
import { registerDriver } from '../../src/block/drivers/index.js';
import { openNode, settleCloses, unref } from '../../src/block/graph.js';
import * as io from '../../src/block/io.js';
import type { BlockNode } from '../../src/block/node.js';
import { defaultChildPerms } from '../../src/block/perms.js';
import { ChildRole, type BlockDriver, type IoCallback } from '../../src/block/types.js';
import { compressedImage, createImage, expectClean, expectEqual, qemuImg, qemuInfo, qemuIo, qemuRaw, sha256 } from '../helpers/qemu.js';
import { pattern, scratchDir } from '../helpers/tmp.js';
import { rng } from './conformance.js';

const dir = scratchDir('spindle-qcow2-rw-');
const MiB = 1 << 20;
let seq = 0;
const path = (name: string): string => join(dir, `${seq++}-${name}`);

/**
 * A pass-through filter that holds the writes `gate.hold` picks until released, so a test can
 * order a metadata write against other requests without timing.
 */
const gate = { hold: (_off: number, _bytes: number): boolean => false, held: [] as (() => void)[], arrived: null as (() => void) | null };
/** Resolves once `n` writes are held. */
function held(n: number): Promise<void> {
  return new Promise((resolve) => {
    gate.arrived = () => void (gate.held.length >= n && resolve());
    gate.arrived();
  });
}
function openGate(): void {
  gate.hold = () => false;
  for (const go of gate.held.splice(0)) go();
}
const gateDriver: BlockDriver = {
  format: 'x-test-gate', growable: true, optionKeys: ['file'],
  open: async (node, o, ctx) => void (await ctx.openChild(node, o['file'] as never, 'file', ChildRole.DATA | ChildRole.PRIMARY)),
  getLength: (n) => n.file!.node.length,
  childPerms: (_n, _c, perm, shared) => defaultChildPerms(perm, shared, true),
  readv: (n, off, bytes, iov, fl, cb) => io.readv(n.file!, off, bytes, iov, fl, cb),
  writev(n, off, bytes, iov, fl, cb: IoCallback) {
    if (!gate.hold(off, bytes)) return io.writev(n.file!, off, bytes, iov, fl, cb);
    const copy = iov.map((b) => Buffer.from(b));
    gate.held.push(() => io.writev(n.file!, off, bytes, copy, fl, cb));
    gate.arrived?.();
  },
  flush: (n) => io.flush(n.file!),
  truncate: (n, len) => io.truncate(n.file!, len),
};
registerDriver(gateDriver);

interface Disk { node: BlockNode; backend: BlockBackend; blk: BackendIO; dev: { id: string } }
const live: Disk[] = [];

async function openDisk(filename: string, extra: Record<string, unknown> = {}, aio?: string): Promise<Disk> {
  const file = { driver: 'file', filename, ...(aio ? { aio } : {}) };
  const node = await openNode({ driver: 'qcow2', discard: 'unmap', file, ...extra });
  const backend = createBackend({}, node);
  const dev = { id: `disk${seq++}` };
  const d = { node, backend, blk: backend.attachDevice(dev, {}), dev };
  live.push(d);
  return d;
}
async function closeDisk(d: Disk): Promise<void> {
  if (!live.includes(d)) return;
  live.splice(live.indexOf(d), 1);
  await d.blk.flush();
  d.backend.detachDevice(d.dev);
  d.backend.unref();
  unref(d.node);
  await settleCloses();
}
afterEach(async () => {
  openGate(); // a failed gate test must not leave writes held
  for (const d of [...live]) await closeDisk(d);
});

/** An image, its cluster size, version, and what the guest reads through its backing file. */
interface Subject { path: string; cs: number; v2: boolean; backing?: Buffer }

/**
 * The workload: sequential overlapping writes, concurrent batches of disjoint writes, discards
 * and write-zeroes (whole and partial clusters), reads checked along the way, a grow and
 * writes past the old end. `model` is the disk as the guest must see it; returned grown.
 */
async function workload(s: Subject, d: Disk, model: Buffer, seed: number, rounds = 240): Promise<Buffer> {
  const r = rng(seed);
  const { blk } = d;
  const cs = s.cs;
  let len = model.length;
  const span = (max: number): [number, number] => {
    const kind = r(4);
    const n = kind === 0 ? 1 + r(600) : kind === 1 ? cs * (1 + r(3)) : 1 + r(max);
    const aligned = r(3) === 0;
    let off = r(len - Math.min(n, len));
    if (aligned) off -= off % cs;
    return [off, Math.min(n, len - off)];
  };
  const discardModel = (off: number, n: number): void => {
    const start = Math.ceil(off / cs) * cs;
    const end = Math.min(Math.floor((off + n) / cs) * cs, len);
    model.fill(0, start, end); // v2 over a backing file: unallocated, the backing data shows
    if (s.backing && s.v2 && start < s.backing.length) s.backing.copy(model, start, start, Math.min(end, s.backing.length));
  };
  const check = async (off: number, n: number, what: string): Promise<void> => {
    const got = Buffer.alloc(n, 0xee);
    await blk.read(off, got);
    expectEqual(got, model.subarray(off, off + n), `${what}: read [${off}, +${n})`);
  };
  const step = async (i: number): Promise<void> => {
    const op = r(20);
    if (op < 12) {
      const [off, n] = span(3 * cs + 5000);
      const data = pattern(n, seed * 1000 + i);
      await blk.write(off, data);
      data.copy(model, off);
    } else if (op < 14) {
      // A batch of disjoint writes, all in flight at once (several may share a cluster).
      const taken: [number, number][] = [];
      const batch: Promise<void>[] = [];
      for (let k = 0; k < 8; k++) {
        const [off, n] = span(cs + 3000);
        if (taken.some(([a, b]) => off < b && a < off + n)) continue;
        taken.push([off, off + n]);
        const data = pattern(n, seed * 1000 + i * 10 + k);
        batch.push(blk.write(off, data));
        data.copy(model, off);
      }
      await Promise.all(batch);
    } else if (op < 16) {
      const [off, n] = span(4 * cs);
      await blk.writeZeroes(off, n, r(2) === 0);
      model.fill(0, off, off + n);
    } else if (op < 18) {
      const [off, n] = span(4 * cs);
      await blk.discard(off, n);
      discardModel(off, n);
    } else {
      const [off, n] = span(3 * cs);
      await check(off, n, `step ${i}`);
    }
  };
  for (let i = 0; i < rounds; i++) await step(i);
  await check(0, len, 'before the grow');
  // Grow by an odd amount and write across and past the old end.
  const old = len;
  len = old + 3 * cs + 1536;
  await d.backend.truncate(len);
  expect(blk.getLength()).toBe(len);
  const grown = Buffer.alloc(len);
  model.copy(grown);
  model = grown;
  const tail = pattern(cs + 700, seed);
  const at = old - 300;
  await blk.write(at, tail);
  tail.copy(model, at);
  for (let i = rounds; i < rounds + 30; i++) await step(i);
  await check(0, len, 'after the workload');
  return model;
}

/** Runs the workload, closes, and checks the image with qemu. */
async function runAndVerify(s: Subject, seed: number, rounds?: number, extra?: Record<string, unknown>, aio?: string): Promise<Buffer> {
  const before = qemuRaw(s.path);
  const d = await openDisk(s.path, extra, aio);
  const model = await workload(s, d, Buffer.from(before), seed, rounds);
  await closeDisk(d);
  expectClean(s.path);
  expect(qemuInfo(s.path)['virtual-size']).toBe(model.length);
  expectEqual(qemuRaw(s.path), model, 'qemu-img convert after the workload');
  return model;
}

/** qemu-io writes at odd offsets, spread over the disk. */
function populate(p: string, size: number, seed: number, extra: string[] = []): void {
  const r = rng(seed);
  const cmds: string[] = [];
  for (let i = 0; i < 30; i++) {
    const n = 1 + r(150_000);
    cmds.push(`write -P 0x${(0x20 + i).toString(16)} ${r(size - n)} ${n}`);
  }
  qemuIo(p, [...cmds, ...extra]);
}

const header = (p: string, h = readFileSync(p)): number[] => [Number(h.readBigUInt64BE(48)), h.readUInt32BE(56), h.readUInt32BE(36)];

describe('qcow2 writes through Spindle, checked by qemu', () => {
  it('fresh 64k v3 image', async () => {
    const p = createImage(path('fresh.qcow2'), 8 * MiB);
    await runAndVerify({ path: p, cs: 65536, v2: false }, 1);
  });

  it('pre-populated 64k v3 image with zero and discarded clusters', async () => {
    const p = createImage(path('pop.qcow2'), 8 * MiB + 1536);
    populate(p, 8 * MiB, 2, ['write -z 1048576 131072', 'write -z -u 2097152 65536', 'discard 3145728 196608']);
    await runAndVerify({ path: p, cs: 65536, v2: false }, 2);
  });

  it('pre-populated v2 (compat=0.10) image', async () => {
    const p = createImage(path('v2.qcow2'), 6 * MiB, ['compat=0.10']);
    populate(p, 6 * MiB, 3);
    await runAndVerify({ path: p, cs: 65536, v2: true }, 3);
  });

  it('512-byte clusters with 64-bit refcounts: the refcount table and L1 table grow', async () => {
    const p = createImage(path('small.qcow2'), 4 * MiB, ['cluster_size=512', 'refcount_bits=64']);
    populate(p, 4 * MiB, 4);
    const h0 = header(p);
    // With a 4-table L2 cache and the thread-pool engine: tables are evicted and reloaded.
    await runAndVerify({ path: p, cs: 512, v2: false }, 4, 400, { 'l2-cache-size': 2048 }, 'threads');
    const h1 = header(p); // refcount table offset and clusters, L1 entries: all changed
    expect(h1[0], 'the refcount table moved').not.toBe(h0[0]);
    expect(h1[1]).toBeGreaterThan(h0[1]!);
    expect(h1[2]).toBeGreaterThan(h0[2]!);
  });

  it('extended L2 (64k clusters, 2k subclusters), partially allocated by qemu', async () => {
    const p = createImage(path('ext.qcow2'), 4 * MiB, ['extended_l2=on', 'cluster_size=64k']);
    populate(p, 4 * MiB, 5, ['write -z 70000 6000', 'write -P 0x66 133120 2048', 'write -z -u 200704 4096']);
    await runAndVerify({ path: p, cs: 65536, v2: false }, 5);
  });

  it('extended L2 overlay over a backing file: partial subclusters keep the backing data', async () => {
    const base = createImage(path('extb.qcow2'), 3 * MiB);
    populate(base, 3 * MiB, 6);
    const backing = qemuRaw(base);
    const p = createImage(path('exto.qcow2'), 4 * MiB, ['extended_l2=on', 'cluster_size=32k'], { file: base, fmt: 'qcow2' });
    qemuIo(p, ['write -P 0x71 40000 100', 'write -z 98304 1024']);
    await runAndVerify({ path: p, cs: 32768, v2: false, backing }, 6);
    expectClean(base);
    expectEqual(qemuRaw(base), backing, 'the backing file is untouched');
  });

  for (const v2 of [false, true]) {
    it(`${v2 ? 'v2' : 'v3'} overlay over a shorter qcow2 backing file`, async () => {
      const base = createImage(path('b.qcow2'), 3 * MiB + 4096, ['cluster_size=4k']);
      populate(base, 3 * MiB, 7);
      const backing = qemuRaw(base);
      const p = createImage(path('o.qcow2'), 5 * MiB, v2 ? ['compat=0.10'] : [], { file: base, fmt: 'qcow2' });
      qemuIo(p, ['write -P 0x72 1000000 70000']);
      const sum = sha256(readFileSync(base));
      await runAndVerify({ path: p, cs: 65536, v2, backing }, v2 ? 8 : 7);
      expect(sha256(readFileSync(base)), 'the backing file was never written').toBe(sum);
    });
  }

  it('an image with compressed clusters (COW out of compressed data, discards of them)', async () => {
    const p = path('c.qcow2');
    compressedImage(p, 4 * MiB, 9);
    await runAndVerify({ path: p, cs: 65536, v2: false }, 9);
  });

  it('an image with an internal snapshot: writes copy, the snapshot keeps its data', async () => {
    const p = createImage(path('snap.qcow2'), 6 * MiB, ['cluster_size=16k']);
    populate(p, 6 * MiB, 10, ['write -z 500000 50000']);
    qemuImg(['snapshot', '-c', 's1', p]);
    const snap = qemuRaw(p);
    await runAndVerify({ path: p, cs: 16384, v2: false }, 10);
    expect(qemuImg(['snapshot', '-l', p])).toContain('s1');
    const copy = path('snap-copy.qcow2');
    copyFileSync(p, copy);
    qemuImg(['snapshot', '-a', 's1', copy]);
    expectClean(copy);
    const back = qemuRaw(copy);
    // The snapshot was taken at 6 MiB; the grow happened after it.
    expectEqual(back.subarray(0, snap.length), snap, 'the snapshot after reverting to it');
  });

  it('lazy_refcounts=on image stays clean (Spindle keeps refcounts exact)', async () => {
    const p = createImage(path('lazy.qcow2'), 4 * MiB, ['lazy_refcounts=on']);
    populate(p, 4 * MiB, 11);
    await runAndVerify({ path: p, cs: 65536, v2: false }, 11, 120);
    expect(qemuInfo(p)['format-specific']?.data['corrupt']).toBe(false);
  });

  it('growing an overlay over a longer backing file: the new area reads zeroes, as after qemu-img resize', async () => {
    const base = createImage(path('long.qcow2'), 4 * MiB);
    qemuIo(base, ['write -P 0xaa 0 4M']);
    for (const o of [[], ['extended_l2=on', 'cluster_size=32k']]) {
      const p = createImage(path('short.qcow2'), 2 * MiB + 1024, o, { file: base, fmt: 'qcow2' });
      qemuIo(p, ['write -P 0x17 2096000 2000']); // the last, partial cluster is allocated
      const ref = path('short-ref.qcow2');
      copyFileSync(p, ref);
      qemuImg(['resize', '-q', ref, String(3 * MiB + 512)]);
      const want = qemuRaw(ref);
      expect(want.subarray(2 * MiB + 1024).equals(Buffer.alloc(MiB - 512))).toBe(true);
      const d = await openDisk(p);
      await d.backend.truncate(3 * MiB + 512);
      const got = Buffer.alloc(3 * MiB + 512);
      await d.blk.read(0, got);
      expectEqual(got, want, 'Spindle after the grow');
      await closeDisk(d);
      expectClean(p);
      expectEqual(qemuRaw(p), want, 'qemu after Spindle grew it');
    }
    // Version 2 has no zero clusters: refused, like qemu-img resize, and nothing changes.
    const v2 = createImage(path('short2.qcow2'), 2 * MiB, ['compat=0.10'], { file: base, fmt: 'qcow2' });
    const sum = sha256(readFileSync(v2));
    const d = await openDisk(v2);
    await expect(d.backend.truncate(3 * MiB)).rejects.toMatchObject({ code: 'ENOTSUP' });
    expect(d.blk.getLength()).toBe(2 * MiB);
    await closeDisk(d);
    expect(sha256(readFileSync(v2))).toBe(sum);
  });

  for (const o of [['cluster_size=64k'], ['extended_l2=on', 'cluster_size=64k']]) {
    it(`concurrent disjoint writes into the same clusters (${o.join(',')}): COW from backing and snapshot`, async () => {
      const cs = 65536;
      const base = createImage(path('cb.qcow2'), 2 * MiB);
      qemuIo(base, ['write -P 0xb5 0 2M']);
      const p = createImage(path('cc.qcow2'), 2 * MiB, o, { file: base, fmt: 'qcow2' });
      qemuIo(p, ['write -P 0xc6 0 65536', 'write -P 0xc7 300000 70000', 'write -z 655360 131072']);
      qemuImg(['snapshot', '-c', 'before', p]);
      const snap = qemuRaw(p);
      const model = Buffer.from(snap);
      const r = rng(o.length);
      const d = await openDisk(p);
      for (let round = 0; round < 6; round++) {
        // Pieces of a few clusters (allocated and shared, unallocated over the backing file,
        // zero), cut into disjoint writes that are all in flight together.
        const batch: Promise<void>[] = [];
        for (const c of [0, 3 + round, 10, 16 + r(16)]) { // not adjacent: pieces spill into the next cluster
          for (let pos = c * cs + r(300); pos < (c + 1) * cs; ) {
            const n = Math.min(1 + r(9000), (c + 1) * cs + r(2000) - pos, 2 * MiB - pos);
            const data = pattern(n, round * 1000 + pos);
            batch.push(d.blk.write(pos, data));
            data.copy(model, pos);
            pos += n + r(3000);
          }
        }
        await Promise.all(batch);
        const got = Buffer.alloc(2 * MiB);
        await d.blk.read(0, got);
        expectEqual(got, model, `after concurrent round ${round}`);
      }
      await closeDisk(d);
      expectClean(p);
      expectEqual(qemuRaw(p), model, 'qemu after the concurrent writes');
      qemuImg(['snapshot', '-a', 'before', p]);
      expectEqual(qemuRaw(p), snap, 'the snapshot kept its data');
    });
  }

  it('an L2 table with an entry not yet written back stays cached, and one being written back comes back with it', async () => {
    // 512-byte clusters: an L2 table maps 32 KiB; 16-bit refcounts: refcount writes are 2 bytes.
    const p = createImage(path('gate.qcow2'), 4 * MiB, ['cluster_size=512']);
    qemuIo(p, [0, 1, 2, 3, 4, 5].map((t) => `write -P 0x${t + 1}0 ${t * 32768} 512`));
    const model = qemuRaw(p);
    const d = await openDisk(p, { 'l2-cache-size': 2048, file: { driver: 'x-test-gate', file: { driver: 'file', filename: p } } });
    const buf = Buffer.alloc(512);
    for (let t = 0; t < 6; t++) await d.blk.read(t * 32768, buf);
    const data = pattern(512, 5);
    await d.blk.write(1024, data); // a new cluster in table 0: its entry only in the cache
    data.copy(model, 1024);
    // Four other tables would push table 0 out of a cache of four; dirty, it must stay.
    for (let t = 1; t <= 5; t++) await d.blk.read(t * 32768, buf);
    const got = Buffer.alloc(2048);
    await d.blk.read(0, got);
    expectEqual(got, model.subarray(0, 2048), 'the first clusters before the write-back');
    gate.hold = (_off, bytes) => bytes === 8; // the L2 entry on its way to the disk
    const arrived = held(1);
    const flushed = d.blk.flush();
    await arrived;
    // While the entry is on the way: the other tables push table 0 out, then it is read again.
    for (let t = 1; t <= 5; t++) await d.blk.read(t * 32768, buf);
    await d.blk.read(0, got);
    expectEqual(got, model.subarray(0, 2048), 'the first clusters during the write-back');
    openGate();
    await flushed;
    await d.blk.read(0, got);
    expectEqual(got, model.subarray(0, 2048), 'the first clusters after the write-back');
    await d.blk.write(1024 + 100, data.subarray(0, 10)); // in place: no second allocation
    data.copy(model, 1124, 0, 10);
    await closeDisk(d);
    expectClean(p);
    expectEqual(qemuRaw(p), model, 'qemu after the gated write-back');
  });

  it('a refcount block with a count raised only in memory is not evicted by a search through every block', async () => {
    // 512-byte clusters, 32-bit refcounts: 128 clusters per block; a 34 MiB file has ~540
    // blocks, twice what the block cache holds, so a search from the start evicts them all.
    const p = createImage(path('rc.qcow2'), 40 * MiB, ['cluster_size=512', 'refcount_bits=32']);
    qemuIo(p, [`write -P 0x4d 0 ${34 * MiB - 65536}`]);
    const model = qemuRaw(p);
    /** Free clusters inside the file. */
    const holes = (): number => {
      const f = readFileSync(p);
      const table = Number(f.readBigUInt64BE(48));
      const rc = (c: number): number => f.readUInt32BE(Number(f.readBigUInt64BE(table + Math.floor(c / 128) * 8)) + (c % 128) * 4);
      return Array.from({ length: f.length / 512 }, (_, c) => c).filter((c) => rc(c) === 0).length;
    };
    const d = await openDisk(p);
    // Use up the free clusters qemu left inside the file, and make the last L2 table exist.
    const n = holes();
    expect(n).toBeLessThan(64);
    for (const at of [...Array.from({ length: n }, (_, i) => 34 * MiB - 65536 + i * 512), 34 * MiB - 32768]) {
      const fill = pattern(512, at);
      await d.blk.write(at, fill);
      fill.copy(model, at);
    }
    await d.blk.discard(0, 512); // frees a cluster at the start (written back: a discard frees)
    model.fill(0, 0, 512);
    await d.blk.flush();
    expect(holes()).toBe(1);
    const a = pattern(512, 7);
    await d.blk.write(34 * MiB - 512, a); // takes the cluster at the start; its count only in memory
    a.copy(model, 34 * MiB - 512);
    const b = pattern(1024, 8);
    await d.blk.write(34 * MiB - 2048, b); // two clusters in a row: a search through every block
    b.copy(model, 34 * MiB - 2048);
    await d.blk.flush(); // writes the raised counts from the blocks that hold them
    const got = Buffer.alloc(1536);
    await d.blk.read(34 * MiB - 512, got.subarray(0, 512));
    await d.blk.read(34 * MiB - 2048, got.subarray(512));
    expectEqual(got, Buffer.concat([a, b]), 'both new clusters');
    await closeDisk(d);
    expectClean(p);
    expectEqual(qemuRaw(p), model, 'qemu after the search');
  });
});
