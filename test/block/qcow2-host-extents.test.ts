// qcow2 hostExtents/watchMappings (the native fast path's view of an image): the host offsets
// must be the ones `qemu-img map` reports and must hold the guest's bytes; `writable` must
// follow COPIED; and every change that moves or unmaps a mapped cluster must be reported to
// the listeners before the driver's tables change, while allocations over unmapped clusters
// and in-place overwrites must not be.
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { lookupCached, newMapping, KIND_NORMAL } from '../../src/block/drivers/qcow2/map.js';
import { createSnapshot, deleteSnapshot } from '../../src/block/drivers/qcow2/snapshot.js';
import { qstate } from '../../src/block/drivers/qcow2/state.js';
import { withDrained } from '../../src/block/drain.js';
import { attachRoot, detachRoot, openNode, settleCloses, unref } from '../../src/block/graph.js';
import * as io from '../../src/block/io.js';
import type { BlockChild, BlockNode, BlockParent } from '../../src/block/node.js';
import { reopen } from '../../src/block/reopen.js';
import { Perm, ReqFlags, type HostExtent } from '../../src/block/types.js';
import { setWarningSink } from '../../src/block/warn.js';
import { compressedImage, createImage, expectClean, qemuImg, qemuIo, qemuRaw } from '../helpers/qemu.js';
import { pattern, scratchDir } from '../helpers/tmp.js';

const dir = scratchDir('spindle-qcow2-extents-');
const KiB = 1024;
const MiB = 1 << 20;
const user: BlockParent = { parentKind: 'job', describeUser: () => 'the host extents test' };
let seq = 0;
const path = (name: string): string => join(dir, `${seq++}-${name}`);

interface Img { node: BlockNode; e: BlockChild }
const open: Img[] = [];
async function closeAll(): Promise<void> {
  for (const { node, e } of open.splice(0)) {
    if (node.parents.includes(e)) {
      if (e.perm & Perm.WRITE) await io.flush(e);
      detachRoot(e);
    }
    if (!node.deleted) unref(node);
  }
  await settleCloses();
}
afterEach(closeAll);

async function openImg(filename: string, opts: { rw?: boolean; perm?: number } = {}): Promise<Img> {
  const rw = opts.rw ?? true;
  const node = await openNode({ driver: 'qcow2', 'read-only': !rw, discard: 'unmap', file: { driver: 'file', filename } });
  const perm = opts.perm ?? Perm.CONSISTENT_READ | (rw ? Perm.WRITE : 0);
  const e = attachRoot(user, node, 'root', { perm, shared: Perm.ALL });
  const img = { node, e };
  open.push(img);
  return img;
}

const extents = (node: BlockNode, offset: number, bytes: number): Promise<HostExtent[]> => node.driver.hostExtents!(node, offset, bytes);

/** Per cluster of [0, len): its host offset, or -1 (a cluster must map whole to count). */
function hostPerCluster(list: HostExtent[], len: number, cs: number): number[] {
  const out: number[] = [];
  for (const x of list) {
    for (let g = x.offset; g < x.offset + x.bytes; g += cs) out[g / cs] = x.host < 0 ? -1 : x.host + (g - x.offset);
  }
  expect(out.length).toBe(Math.ceil(len / cs));
  return out;
}

interface MapEntry { start: number; length: number; depth: number; zero: boolean; data: boolean; offset?: number }
function qemuMap(file: string): MapEntry[] {
  return JSON.parse(qemuImg(['map', '--output=json', '-U', '-f', 'qcow2', file])) as MapEntry[];
}
/** qemu's answer per cluster: the host offset where the whole cluster is plain data in this image. */
function qemuHostPerCluster(map: MapEntry[], len: number, cs: number): number[] {
  const out: number[] = [];
  for (let c = 0; c < len / cs; c++) {
    const parts = map.filter((m) => m.start < (c + 1) * cs && c * cs < m.start + m.length);
    const plain = parts.every((m) => m.depth === 0 && m.data && !m.zero && m.offset !== undefined);
    const first = parts[0]!;
    out[c] = plain ? first.offset! + (c * cs - first.start) : -1;
    // A cluster mapped in pieces must be contiguous on the host to count as one.
    if (plain) for (const m of parts) if (m.offset! - m.start !== first.offset! - first.start) out[c] = -1;
  }
  return out;
}

/** The extents cover [offset, end) in order, and no two neighbours could have been merged. */
function expectWellFormed(list: HostExtent[], offset: number, end: number): void {
  let at = offset;
  for (const [i, x] of list.entries()) {
    expect(x.offset, `extent ${i} starts where the last ended`).toBe(at);
    expect(x.bytes).toBeGreaterThan(0);
    if (x.host < 0) expect(x.writable).toBe(false);
    at += x.bytes;
    const prev = list[i - 1];
    if (prev) {
      const mergeable = prev.writable === x.writable && (x.host < 0 ? prev.host < 0 : prev.host >= 0 && prev.host + prev.bytes === x.host);
      expect(mergeable, `extents ${i - 1} and ${i} should be one`).toBe(false);
    }
  }
  expect(at).toBe(end);
}

/** Every mapped extent's host bytes in the image file are the guest's bytes as qemu reads them. */
function expectHostBytes(file: string, list: HostExtent[], raw: Buffer): void {
  const img = readFileSync(file);
  for (const x of list.filter((l) => l.host >= 0)) {
    expect(img.subarray(x.host, x.host + x.bytes).equals(raw.subarray(x.offset, x.offset + x.bytes)), `host bytes of guest ${x.offset}+${x.bytes}`).toBe(true);
  }
}

/**
 * Records listener calls, and for each the host the range's first cluster still mapped to at
 * call time (read synchronously from the driver's tables; null if not mapped any more).
 */
function watch(node: BlockNode) {
  const rec = { calls: [] as [number, number][], stillMapped: [] as (number | null)[], copied: [] as boolean[], log: [] as string[], stop: () => {} };
  rec.stop = node.driver.watchMappings!(node, (off, bytes) => {
    rec.calls.push([off, bytes]);
    rec.log.push('unmap');
    const m = lookupCached(qstate(node), off, newMapping());
    rec.stillMapped.push(m && m.kind === KIND_NORMAL ? m.host : null);
    rec.copied.push(m?.copied ?? false);
  });
  return rec;
}

describe('hostExtents against qemu-img map', () => {
  const variants: [string, string[], number][] = [
    ['64k clusters', [], 64 * KiB],
    ['4k clusters', ['cluster_size=4096'], 4 * KiB],
    ['extended L2', ['extended_l2=on'], 64 * KiB],
  ];
  for (const [label, opts, cs] of variants) {
    it(`${label}: allocated, unallocated, zero, compressed, partial and backing clusters`, async () => {
      const base = createImage(path('base.qcow2'), 2 * MiB);
      qemuIo(base, ['write -P 11 0 1536k']);
      const top = createImage(path('top.qcow2'), 2 * MiB, opts, { file: base, fmt: 'qcow2' });
      qemuIo(top, [
        'write -P 1 0 64k',
        'write -z 128k 64k', // zero, no allocation
        'write -P 2 256k 128k', // two clusters, contiguous on the host
        'write -P 3 1M 64k',
        'write -P 4 384k 64k', // allocated after 1M: not contiguous with 256k..384k
        'write -P 5 512k 64k',
        'write -z 512k 64k', // zero keeping its allocation
        'write -P 6 640k 4k', // partial: COW from the backing file (subclusters stay partial)
        'write -c -P 7 768k 64k', // compressed
      ]);
      const len = 2 * MiB;
      const want = qemuHostPerCluster(qemuMap(top), len, cs);
      // The image must hold every case, or the comparison proves little.
      expect(want.filter((h) => h >= 0).length).toBeGreaterThanOrEqual(4 * (64 * KiB / cs));
      expect(want[768 * KiB / cs]).toBe(-1);
      expect(want[512 * KiB / cs]).toBe(-1);
      const raw = qemuRaw(top);

      const { node } = await openImg(top);
      const list = await extents(node, 0, len);
      expectWellFormed(list, 0, len);
      expect(hostPerCluster(list, len, cs)).toEqual(want);
      // Fresh image, no snapshots, opened read-write: every mapped cluster is ours alone.
      for (const x of list) expect(x.writable).toBe(x.host >= 0);
      expectHostBytes(top, list, raw);
      // 256k..384k is one run (host-contiguous), 384k starts another.
      const run = list.find((x) => x.offset === 256 * KiB)!;
      expect(run.bytes).toBe(128 * KiB);
      expect(list.find((x) => x.offset === 384 * KiB)!.host).toBeGreaterThanOrEqual(0);
      // Partial ranges are clipped to the request, and to the end of the node.
      const mid = await extents(node, 256 * KiB + 100, 1000);
      expect(mid).toEqual([{ offset: 256 * KiB + 100, bytes: 1000, host: run.host + 100, writable: true }]);
      const tail = await extents(node, len - 10, 1 * MiB);
      expect(tail).toEqual([{ offset: len - 10, bytes: 10, host: -1, writable: false }]);
      expect(await extents(node, len, 100)).toEqual([]);
      await closeAll();

      // Read-only: the same hosts, nothing writable.
      const ro = await openImg(top, { rw: false });
      const rlist = await extents(ro.node, 0, len);
      expect(hostPerCluster(rlist, len, cs)).toEqual(want);
      expect(rlist.every((x) => !x.writable)).toBe(true);
    });
  }

  it('compressed clusters (qemu-img convert -c) are never mapped; writing one allocates without a report', async () => {
    const p = path('comp.qcow2');
    const data = compressedImage(p, 2 * MiB, 7);
    const cs = 64 * KiB;
    const map = qemuMap(p);
    expect(map.some((m) => m.data && m.offset === undefined), 'qemu sees compressed data').toBe(true);
    const { node, e } = await openImg(p);
    const list = await extents(node, 0, 2 * MiB);
    // Clusters that did not shrink are stored plainly; qemu gives offsets for those only.
    const want = qemuHostPerCluster(map, 2 * MiB, cs);
    expect(hostPerCluster(list, 2 * MiB, cs)).toEqual(want);
    for (const m of map.filter((x) => x.data && x.offset === undefined)) {
      for (let g = m.start; g < m.start + m.length; g += cs) expect(want[g / cs], `compressed cluster at ${g}`).toBe(-1);
    }
    // Find a compressed cluster and overwrite part of it: a new, plain cluster; nothing reported.
    const c = map.find((m) => m.data && m.offset === undefined)!.start;
    const w = watch(node);
    const buf = pattern(4096, 3);
    await io.write(e, c + 8192, buf);
    expect(w.calls).toEqual([]);
    const after = await extents(node, c, cs);
    expect(after).toHaveLength(1);
    expect(after[0]!.host).toBeGreaterThanOrEqual(0);
    expect(after[0]!.writable).toBe(true);
    buf.copy(data, c + 8192);
    await closeAll();
    expect(qemuHostPerCluster(qemuMap(p), 2 * MiB, cs)[c / cs]).toBe(after[0]!.host);
    expect(qemuRaw(p).equals(data)).toBe(true);
    expectClean(p);
  });
});

describe('writable and internal snapshots', () => {
  it('clusters shared with a qemu-img snapshot are not writable; a COW write is reported before it lands', async () => {
    const p = createImage(path('snap.qcow2'), 4 * MiB);
    qemuIo(p, ['write -P 1 0 256k']);
    qemuImg(['snapshot', '-c', 'snap', p]);
    qemuIo(p, ['write -P 2 512k 64k']); // after the snapshot: ours alone
    const cs = 64 * KiB;
    const want = qemuHostPerCluster(qemuMap(p), 4 * MiB, cs);
    const raw = qemuRaw(p);
    const { node, e } = await openImg(p);
    const list = await extents(node, 0, 4 * MiB);
    expect(hostPerCluster(list, 4 * MiB, cs)).toEqual(want);
    const at = (g: number): HostExtent => list.find((x) => x.offset <= g && g < x.offset + x.bytes)!;
    expect(at(0).host).toBeGreaterThanOrEqual(0);
    expect(at(0).writable).toBe(false);
    expect(at(192 * KiB).writable).toBe(false);
    expect(at(512 * KiB).host).toBeGreaterThanOrEqual(0);
    expect(at(512 * KiB).writable).toBe(true);
    expectHostBytes(p, list, raw);

    // In place (COPIED) and fresh allocations: nothing to report.
    const w = watch(node);
    await io.write(e, 512 * KiB + 100, pattern(1000, 1));
    await io.write(e, 1 * MiB, pattern(200 * KiB, 2));
    expect(w.calls).toEqual([]);

    // A write into a shared cluster copies it: reported, with the old mapping still in place.
    const old64 = at(64 * KiB).host + 64 * KiB - at(64 * KiB).offset;
    await io.write(e, 64 * KiB + 100, pattern(4096, 3)).then(() => w.log.push('written'));
    expect(w.log.at(-1)).toBe('written');
    expect(w.log.indexOf('unmap')).toBeLessThan(w.log.indexOf('written'));
    expect(w.calls.some(([o, b]) => o <= 64 * KiB && 128 * KiB <= o + b), 'the COW cluster was reported').toBe(true);
    expect(w.stillMapped.every((h) => h !== null)).toBe(true);
    const moved = await extents(node, 64 * KiB, cs);
    expect(moved[0]!.host).not.toBe(old64);
    expect(moved[0]!.writable).toBe(true);
    expect((await extents(node, 128 * KiB, cs))[0]!.writable).toBe(false);

    // The L2 table is ours now: the next COW reports exactly its cluster, mapped until then.
    w.calls.length = w.stillMapped.length = 0;
    const old128 = (await extents(node, 128 * KiB, cs))[0]!.host;
    await io.write(e, 128 * KiB, pattern(512, 4));
    expect(w.calls).toEqual([[128 * KiB, cs]]);
    expect(w.stillMapped).toEqual([old128]);
    const b = Buffer.alloc(cs);
    await io.read(e, 128 * KiB, b);
    expect(b.subarray(0, 512).equals(pattern(512, 4))).toBe(true);
    expect(b.subarray(512).every((x) => x === 1)).toBe(true);
    await closeAll();
    expectClean(p);
  });

  it('Spindle snapshot create and delete report the whole image before the tables change', async () => {
    const p = createImage(path('snap2.qcow2'), 2 * MiB);
    qemuIo(p, ['write -P 1 0 128k']);
    const { node } = await openImg(p);
    const before = await extents(node, 0, 128 * KiB);
    expect(before).toEqual([{ offset: 0, bytes: 128 * KiB, host: before[0]!.host, writable: true }]);
    const w = watch(node);
    await withDrained([node], () => createSnapshot(node, 's1'));
    expect(w.calls.some(([o, b]) => o === 0 && b >= 2 * MiB)).toBe(true);
    expect(w.copied[0], 'the listener ran before COPIED was cleared').toBe(true);
    expect(await extents(node, 0, 128 * KiB)).toEqual([{ offset: 0, bytes: 128 * KiB, host: before[0]!.host, writable: false }]);
    w.calls.length = 0;
    await withDrained([node], () => deleteSnapshot(node, 's1'));
    expect(w.calls.some(([o, b]) => o === 0 && b >= 2 * MiB)).toBe(true);
    expect(await extents(node, 0, 128 * KiB)).toEqual(before);
    await closeAll();
    expectClean(p);
  });

  it('reopening read-only is reported, and nothing is writable after', async () => {
    const p = createImage(path('ro.qcow2'), 1 * MiB);
    qemuIo(p, ['write -P 1 0 64k']);
    const { node } = await openImg(p, { perm: Perm.CONSISTENT_READ });
    expect((await extents(node, 0, 64 * KiB))[0]!.writable).toBe(true);
    const w = watch(node);
    await reopen(node, { 'read-only': true });
    expect(w.calls.some(([o, b]) => o === 0 && b >= 1 * MiB)).toBe(true);
    expect(await extents(node, 0, 64 * KiB)).toEqual([{ offset: 0, bytes: 64 * KiB, host: expect.any(Number), writable: false }]);
    expect((await extents(node, 0, 64 * KiB))[0]!.host).toBeGreaterThanOrEqual(0);
  });
});

describe('watchMappings', () => {
  const cs = 64 * KiB;
  /** A fresh image with clusters 0..7 written by Spindle (no reports: all fresh allocations). */
  async function written(opts: string[] = []): Promise<Img & { file: string; w: ReturnType<typeof watch> }> {
    const file = createImage(path('w.qcow2'), 4 * MiB, opts);
    const img = await openImg(file);
    const w = watch(img.node);
    await io.write(img.e, 0, pattern(8 * cs, 9));
    await io.write(img.e, 8 * cs + 100, pattern(300, 10)); // one partial, fresh cluster
    await io.write(img.e, 100, pattern(300, 11)); // in place
    expect(w.calls).toEqual([]);
    return { ...img, file, w };
  }

  for (const [label, opts] of [['standard L2', []], ['extended L2', ['extended_l2=on']]] as const) {
    it(`${label}: discard of a mapped cluster is reported first, with the old mapping still live`, async () => {
      const { node, e, w, file } = await written([...opts]);
      const old = (await extents(node, 2 * cs, cs))[0]!.host;
      expect(old).toBeGreaterThanOrEqual(0);
      await io.discard(e, 2 * cs, cs).then(() => w.log.push('done'));
      expect(w.calls).toEqual([[2 * cs, cs]]);
      expect(w.stillMapped).toEqual([old]);
      expect(w.log).toEqual(['unmap', 'done']);
      expect(await extents(node, 2 * cs, cs)).toEqual([{ offset: 2 * cs, bytes: cs, host: -1, writable: false }]);
      // Discarding what is not mapped reports nothing.
      w.calls.length = 0;
      await io.discard(e, 2 * cs, cs);
      await io.discard(e, 20 * cs, 4 * cs);
      expect(w.calls).toEqual([]);
      await closeAll();
      expectClean(file);
    });

    it(`${label}: write-zeroes over mapped clusters, with and without unmap, is reported`, async () => {
      const { node, e, w, file } = await written([...opts]);
      const old3 = (await extents(node, 3 * cs, cs))[0]!.host;
      const old4 = (await extents(node, 4 * cs, cs))[0]!.host;
      await io.writeZeroes(e, 3 * cs, cs, 0); // keeps the allocation
      expect(w.calls).toEqual([[3 * cs, cs]]);
      expect(w.stillMapped).toEqual([old3]);
      await io.writeZeroes(e, 4 * cs, 2 * cs, ReqFlags.MAY_UNMAP);
      expect(w.calls).toEqual([[3 * cs, cs], [4 * cs, cs], [5 * cs, cs]]);
      expect(w.stillMapped[1]).toBe(old4);
      expect(await extents(node, 3 * cs, 3 * cs)).toEqual([{ offset: 3 * cs, bytes: 3 * cs, host: -1, writable: false }]);
      // Zeroing zero clusters again, and writing data over them, reports nothing.
      w.calls.length = 0;
      await io.writeZeroes(e, 3 * cs, 3 * cs, 0);
      await io.write(e, 3 * cs, pattern(cs, 12));
      await io.write(e, 4 * cs + 500, pattern(500, 13));
      expect(w.calls).toEqual([]);
      expect((await extents(node, 3 * cs, cs))[0]!.host).toBeGreaterThanOrEqual(0);
      const b = Buffer.alloc(cs);
      await io.read(e, 4 * cs, b);
      expect(b.subarray(500, 1000).equals(pattern(500, 13))).toBe(true);
      expect(b.subarray(0, 500).every((x) => x === 0) && b.subarray(1000).every((x) => x === 0)).toBe(true);
      await closeAll();
      expectClean(file);
    });
  }

  it('a compressed write over a mapped cluster is reported', async () => {
    const { node, e, w } = await written();
    const old = (await extents(node, 6 * cs, cs))[0]!.host;
    await io.write(e, 6 * cs, Buffer.alloc(cs, 0x42), ReqFlags.COMPRESSED);
    expect(w.calls).toEqual([[6 * cs, cs]]);
    expect(w.stillMapped).toEqual([old]);
    expect((await extents(node, 6 * cs, cs))[0]!.host).toBe(-1);
  });

  it('the unregister function stops calls to that listener only', async () => {
    const { node, e, w } = await written();
    const other: [number, number][] = [];
    const stop = node.driver.watchMappings!(node, (o, b) => other.push([o, b]));
    w.stop();
    w.stop(); // idempotent
    await io.discard(e, 0, cs);
    expect(w.calls).toEqual([]);
    expect(other).toEqual([[0, cs]]);
    stop();
    await io.discard(e, cs, cs);
    expect(other).toEqual([[0, cs]]);
  });

  it('a listener that throws does not break the discard', async () => {
    const { node, e } = await written();
    const stop = node.driver.watchMappings!(node, () => { throw new Error('listener bug'); });
    const warnings: string[] = [];
    const old = setWarningSink((m) => warnings.push(m));
    await io.discard(e, 0, cs).finally(() => (setWarningSink(old), stop()));
    expect(warnings.some((m) => m.includes('listener bug'))).toBe(true);
    expect((await extents(node, 0, cs))[0]!.host).toBe(-1);
  });

  it('an answer whose lookup spans a reported change starts over', async () => {
    const p = createImage(path('race.qcow2'), 4 * MiB, ['cluster_size=4096']);
    // Two L2 tables (4k clusters: 512 entries, 2 MiB each), cluster 0 and one past 2 MiB.
    qemuIo(p, ['write -P 1 0 4k', 'write -P 2 2M 4k']);
    const { node, e } = await openImg(p);
    // Only the first table is cached: the second lookup awaits a load, and the discard of
    // cluster 0 goes in before it completes.
    await io.read(e, 0, Buffer.alloc(4096));
    const answer = extents(node, 0, 2 * MiB + 4096);
    await io.discard(e, 0, 4096);
    const list = await answer;
    expect(list[0]).toEqual({ offset: 0, bytes: 2 * MiB, host: -1, writable: false });
    expect(list[1]!.host).toBeGreaterThanOrEqual(0);
  });
});
