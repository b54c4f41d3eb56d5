// qcow2 internal snapshots through the driver (snapshot.ts), checked against qemu: snapshots
// Spindle makes are listed and applied by qemu-img, snapshots qemu-img makes are listed,
// applied and deleted by Spindle, and `qemu-img check` is clean (no leaks) after every step.
import { copyFileSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { createBackend, type BlockBackend } from '../../src/backend/backend.js';
import type { BackendIO } from '../../src/backend/io.js';
import { applySnapshot, createSnapshot, deleteSnapshot, listSnapshots } from '../../src/block/drivers/qcow2/snapshot.js';
import { serializeSnapshotTable } from '../../src/block/drivers/qcow2/snapshot-table.js';
import { withDrained } from '../../src/block/drain.js';
import { openNode, settleCloses, unref } from '../../src/block/graph.js';
import type { BlockNode } from '../../src/block/node.js';
import { compressedImage, createImage, expectClean, expectEqual, qemuImg, qemuInfo, qemuIo, qemuRaw } from '../helpers/qemu.js';
import { pattern, scratchDir } from '../helpers/tmp.js';

const dir = scratchDir('spindle-qcow2-snap-');
const MiB = 1 << 20;
let seq = 0;
const path = (name: string): string => join(dir, `${seq++}-${name}`);

interface Disk { node: BlockNode; backend: BlockBackend; blk: BackendIO; dev: { id: string } }
const live: Disk[] = [];

async function openDisk(filename: string, extra: Record<string, unknown> = {}): Promise<Disk> {
  const node = await openNode({ driver: 'qcow2', file: { driver: 'file', filename }, ...extra });
  const backend = createBackend({}, node);
  unref(node);
  const dev = { id: `disk${seq++}` };
  const d = { node, backend, blk: backend.attachDevice(dev, {}), dev };
  live.push(d);
  return d;
}
async function closeDisk(d: Disk): Promise<void> {
  if (!live.includes(d)) return;
  live.splice(live.indexOf(d), 1);
  d.backend.detachDevice(d.dev);
  d.backend.unref();
  await settleCloses();
}
afterEach(async () => {
  for (const d of [...live]) await closeDisk(d);
});

/** Runs a snapshot operation the way callers must: drained. */
const drained = <T>(d: Disk, fn: () => Promise<T>): Promise<T> => withDrained([d.node], fn);

async function readAll(d: Disk): Promise<Buffer> {
  const b = Buffer.alloc(d.node.length);
  await d.blk.read(0, b);
  return b;
}

/** Writes a few scattered extents (partial and whole clusters) into the disk and the model. */
async function scribble(d: Disk, model: Buffer, seed: number): Promise<void> {
  const spots = [[0, 5000], [70_000, 140_000], [1 * MiB + 123, 4096], [3 * MiB - 10, 20], [(seed % 7) * 300_000, 65_536]];
  for (const [off, len] of spots) {
    const buf = pattern(len!, seed * 10 + off!);
    await d.blk.write(off!, buf);
    buf.copy(model, off!);
  }
  await d.blk.flush();
}

/** qemu's view of one snapshot, on a copy: `qemu-img snapshot -a` then convert. */
function qemuSnapshotData(p: string, name: string): Buffer {
  const copy = `${p}.apply-${name}`;
  copyFileSync(p, copy);
  qemuImg(['snapshot', '-a', name, copy]);
  expectClean(copy);
  return qemuRaw(copy);
}

const variants: [string, string[]][] = [
  ['64k clusters', []],
  ['4k clusters', ['cluster_size=4096']],
  ['version 2', ['compat=0.10']],
  ['extended L2', ['extended_l2=on', 'cluster_size=32768']],
  ['8-bit refcounts', ['refcount_bits=8', 'cluster_size=4096']],
  ['4-bit refcounts', ['refcount_bits=4', 'cluster_size=4096']],
];

describe('qcow2 snapshots made by Spindle', () => {
  for (const [label, opts] of variants) {
    it(`${label}: create, apply, delete; qemu reads every state and check stays clean`, async () => {
      const p = createImage(path('seq.qcow2'), 4 * MiB, opts);
      const d = await openDisk(p);
      const model = Buffer.alloc(4 * MiB);
      await scribble(d, model, 1);
      const a = Buffer.from(model);
      const s1 = await drained(d, () => createSnapshot(d.node, 's1'));
      expect(s1.id).toBe('1');
      await scribble(d, model, 2);
      const b = Buffer.from(model);
      const s2 = await drained(d, () => createSnapshot(d.node, 's2'));
      expect(s2.id).toBe('2');
      await scribble(d, model, 3);
      const c = Buffer.from(model);
      expectEqual(await readAll(d), c, 'active after the writes');
      await closeDisk(d);
      expectClean(p);
      const listed = qemuImg(['snapshot', '-l', p]);
      expect(listed).toMatch(/^1 +s1 /m);
      expect(listed).toMatch(/^2 +s2 /m);
      expect(qemuInfo(p).snapshots?.map((s) => s.name)).toEqual(['s1', 's2']);
      expectEqual(qemuSnapshotData(p, 's1'), a, 'qemu applies s1');
      expectEqual(qemuSnapshotData(p, 's2'), b, 'qemu applies s2');
      expectEqual(qemuRaw(p), c, 'qemu reads the active state');

      const e = await openDisk(p);
      await drained(e, () => applySnapshot(e.node, 's1'));
      expectEqual(await readAll(e), a, 'after applying s1');
      // Writes after the apply copy: neither snapshot changes.
      const m2 = Buffer.from(a);
      await scribble(e, m2, 4);
      await closeDisk(e);
      expectClean(p);
      expectEqual(qemuSnapshotData(p, 's1'), a, 's1 after writes over it');
      expectEqual(qemuSnapshotData(p, 's2'), b, 's2 after writes over s1');
      expectEqual(qemuRaw(p), m2, 'active after writes over s1');

      const f = await openDisk(p);
      await drained(f, () => deleteSnapshot(f.node, 's2'));
      await closeDisk(f);
      expectClean(p);
      expect(qemuInfo(p).snapshots?.map((s) => s.name)).toEqual(['s1']);
      const g = await openDisk(p);
      await drained(g, () => applySnapshot(g.node, 's1'));
      expectEqual(await readAll(g), a, 'applying s1 again');
      await drained(g, () => deleteSnapshot(g.node, '1'));
      expect(await listSnapshots(g.node)).toEqual([]);
      expectEqual(await readAll(g), a, 'after deleting s1');
      await scribble(g, a, 5);
      await closeDisk(g);
      expectClean(p);
      expect(qemuInfo(p).snapshots).toBeUndefined();
      expectEqual(qemuRaw(p), a, 'the last state');
    });
  }

  it('many operations in one open, with in-place writes between them', async () => {
    const p = createImage(path('many.qcow2'), 4 * MiB, ['cluster_size=4096']);
    const d = await openDisk(p);
    const model = Buffer.alloc(4 * MiB);
    const states = new Map<string, Buffer>();
    for (let i = 0; i < 6; i++) {
      await scribble(d, model, 10 + i);
      await drained(d, () => createSnapshot(d.node, `s${i}`));
      states.set(`s${i}`, Buffer.from(model));
      if (i === 3) {
        await drained(d, () => applySnapshot(d.node, 's1'));
        states.get('s1')!.copy(model);
      }
      if (i === 4) await drained(d, () => deleteSnapshot(d.node, 's2'));
      expectEqual(await readAll(d), model, `active after step ${i}`);
    }
    await closeDisk(d);
    expectClean(p);
    states.delete('s2');
    for (const [name, data] of states) expectEqual(qemuSnapshotData(p, name), data, name);
    expectEqual(qemuRaw(p), model, 'active');
  });

  it('IDs, lookups and refusals', async () => {
    const p = createImage(path('ids.qcow2'), MiB);
    const d = await openDisk(p);
    await drained(d, () => createSnapshot(d.node, 'same'));
    await drained(d, () => createSnapshot(d.node, 'same'));
    await drained(d, () => createSnapshot(d.node, '1'));
    expect((await listSnapshots(d.node)).map((s) => [s.id, s.name])).toEqual([['1', 'same'], ['2', 'same'], ['3', '1']]);
    await expect(drained(d, () => createSnapshot(d.node, 'x', { id: '2' }))).rejects.toMatchObject({ code: 'EEXIST' });
    await expect(drained(d, () => applySnapshot(d.node, 'nope'))).rejects.toMatchObject({ code: 'ENOENT' });
    // By name only: '1' is the third snapshot's name, not the first one's ID.
    await drained(d, () => deleteSnapshot(d.node, '1', { match: 'name' }));
    await drained(d, () => deleteSnapshot(d.node, 'same'));
    expect((await listSnapshots(d.node)).map((s) => s.id)).toEqual(['2']);
    await closeDisk(d);
    expectClean(p);
    const ro = await openDisk(p, { 'read-only': true });
    await expect(createSnapshot(ro.node, 'r')).rejects.toMatchObject({ code: 'EROFS' });
    await closeDisk(ro);
  });

  it('1-bit refcounts cannot share a cluster: refused before anything is written', async () => {
    const p = createImage(path('rc1.qcow2'), MiB, ['refcount_bits=1']);
    qemuIo(p, ['write -P 5 0 64k']);
    const d = await openDisk(p);
    await expect(drained(d, () => createSnapshot(d.node, 'x'))).rejects.toMatchObject({ code: 'EINVAL' });
    expect(await listSnapshots(d.node)).toEqual([]);
    await closeDisk(d);
    expectClean(p);
  });

  it('applying a snapshot taken at another size restores that size (as qemu-img does)', async () => {
    const p = createImage(path('size.qcow2'), 2 * MiB, ['cluster_size=4096']);
    const d = await openDisk(p);
    const small = pattern(2 * MiB, 7);
    await d.blk.write(0, small);
    await drained(d, () => createSnapshot(d.node, 'small'));
    await d.backend.truncate(5 * MiB);
    await d.blk.write(4 * MiB, pattern(MiB, 8));
    await drained(d, () => createSnapshot(d.node, 'big'));
    await drained(d, () => applySnapshot(d.node, 'small'));
    expect(d.node.length).toBe(2 * MiB);
    expectEqual(await readAll(d), small, 'small');
    await closeDisk(d);
    expectClean(p);
    expect(qemuInfo(p)['virtual-size']).toBe(2 * MiB);
    const big = qemuSnapshotData(p, 'big');
    expect(big.length).toBe(5 * MiB);
    expectEqual(big.subarray(4 * MiB), pattern(MiB, 8), 'big, past the old end');
  });

  it('compressed clusters are shared and released like the others', async () => {
    const p = path('comp.qcow2');
    const data = compressedImage(p, 4 * MiB, 3, ['cluster_size=4096']);
    const d = await openDisk(p);
    await drained(d, () => createSnapshot(d.node, 'c'));
    const model = Buffer.from(data);
    await scribble(d, model, 9);
    await closeDisk(d);
    expectClean(p);
    expectEqual(qemuSnapshotData(p, 'c'), data, 'compressed snapshot');
    const e = await openDisk(p);
    await drained(e, () => deleteSnapshot(e.node, 'c'));
    await closeDisk(e);
    expectClean(p);
    expectEqual(qemuRaw(p), model, 'active after the delete');
  });

  it('keeps extra data it does not know', async () => {
    const p = createImage(path('extra.qcow2'), MiB);
    const d = await openDisk(p);
    const [sn] = [await drained(d, () => createSnapshot(d.node, 'x'))];
    await closeDisk(d);
    // Append 8 unknown bytes to the entry's extra data, in place (the table has room).
    const f = readFileSync(p);
    const at = Number(f.readBigUInt64BE(64));
    const table = serializeSnapshotTable([{ ...sn!, extraRest: Buffer.from('ABCDEFGH') }], MiB);
    table.copy(f, at);
    writeFileSync(p, f);
    expectClean(p);
    const e = await openDisk(p);
    await drained(e, () => createSnapshot(e.node, 'y'));
    const list = await listSnapshots(e.node);
    expect(list[0]!.extraRest.toString()).toBe('ABCDEFGH');
    expect(list[1]!.extraRest.length).toBe(0);
    await closeDisk(e);
    expectClean(p);
    expect(qemuInfo(p).snapshots?.map((s) => s.name)).toEqual(['x', 'y']);
  });
});

describe('qcow2 snapshots made by qemu-img', () => {
  for (const [label, opts] of variants) {
    it(`${label}: listed, applied and deleted by Spindle`, async () => {
      const p = createImage(path('q.qcow2'), 4 * MiB, opts);
      qemuIo(p, ['write -P 0x11 0 1M', 'write -P 0x12 3M 100k']);
      qemuImg(['snapshot', '-c', 'q1', p]);
      const a = qemuRaw(p);
      qemuIo(p, ['write -P 0x21 512k 1M', 'write -z 3M 64k']);
      qemuImg(['snapshot', '-c', 'q2', p]);
      const b = qemuRaw(p);
      qemuIo(p, ['write -P 0x31 0 8k']);
      const c = qemuRaw(p);
      const info = qemuInfo(p).snapshots as unknown as Record<string, unknown>[];

      const d = await openDisk(p);
      const list = await listSnapshots(d.node);
      expect(list.map((s) => [s.id, s.name, s.dateSec, s.dateNsec, s.icount, s.diskSize])).toEqual(
        info.map((s) => [s['id'], s['name'], s['date-sec'], s['date-nsec'], s['icount'], 4 * MiB]),
      );
      expectEqual(await readAll(d), c, 'active');
      await drained(d, () => applySnapshot(d.node, 'q1'));
      expectEqual(await readAll(d), a, 'q1');
      await closeDisk(d);
      expectClean(p);
      expectEqual(qemuSnapshotData(p, 'q2'), b, 'q2 as qemu applies it');

      const e = await openDisk(p);
      await drained(e, () => deleteSnapshot(e.node, 'q1'));
      expectEqual(await readAll(e), a, 'still q1 after deleting it');
      await closeDisk(e);
      expectClean(p);
      const f = await openDisk(p);
      await drained(f, () => applySnapshot(f.node, 'q2'));
      await drained(f, () => deleteSnapshot(f.node, 'q2'));
      expectEqual(await readAll(f), b, 'q2');
      await closeDisk(f);
      expectClean(p);
      expect(qemuInfo(p).snapshots).toBeUndefined();
      expectEqual(qemuRaw(p), b, 'qemu reads q2');
    });
  }
});
