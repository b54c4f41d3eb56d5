// The I/O API (src/block/io.ts, io-align.ts) on real files: errors, RMW, zeroes, status, resize.
import { closeSync, existsSync, fsyncSync, ftruncateSync, mkdtempSync, openSync, readFileSync, rmSync, statSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { createBackend } from '../../src/backend/backend.js';
import { drainedBegin, drainedEnd } from '../../src/block/drain.js';
import { BlockError } from '../../src/block/error.js';
import { fileDriver } from '../../src/block/drivers/file.js';
import { attachRoot, detachRoot, openNode, settleCloses, unref } from '../../src/block/graph.js';
import * as io from '../../src/block/io.js';
import type { BlockChild, BlockNode, BlockParent } from '../../src/block/node.js';
import { Perm, ReqFlags, type NodeOptions } from '../../src/block/types.js';
import { getEngine } from '../../src/native/engine.js';
import { pattern, scratchDir } from '../helpers/tmp.js';
import { rng, traceDriver } from './conformance.js';

const dir = scratchDir('spindle-io-');
const MiB = 1 << 20;
const RW = { perm: Perm.CONSISTENT_READ | Perm.WRITE, shared: Perm.ALL };
let n = 0;
const resized: BlockChild[] = [];
const user: BlockParent = { parentKind: 'job', describeUser: () => 'the io test', childResized: (c) => void resized.push(c) };

/** A file of `size` bytes: pattern data (allocated, synced) or, with sparse, a hole. */
function img(size: number, sparse = false, where = dir): string {
  const p = join(where, `f${n++}.img`);
  const fd = openSync(p, 'w');
  if (sparse) ftruncateSync(fd, size);
  else writeSync(fd, pattern(size, n)), fsyncSync(fd);
  closeSync(fd);
  return p;
}
const blocks = (p: string): number => statSync(p).blocks;

const opened: { node: BlockNode; edges: BlockChild[] }[] = [];
async function open(o: NodeOptions, want = RW): Promise<{ node: BlockNode; e: BlockChild }> {
  const node = await openNode(o);
  const rec = { node, edges: [] as BlockChild[] };
  opened.push(rec);
  const e = attachRoot(user, node, 'root', want);
  rec.edges.push(e);
  return { node, e };
}
afterEach(async () => {
  for (const { node, edges } of opened.splice(0)) {
    for (const e of edges) if (e.node.parents.includes(e)) detachRoot(e);
    if (!node.deleted) unref(node);
  }
  await settleCloses();
  resized.length = 0;
});

async function failure(p: Promise<unknown>): Promise<BlockError> {
  const e = await p.then(() => null, (x: unknown) => x);
  expect(e).toBeInstanceOf(BlockError);
  return e as BlockError;
}

describe('range and permission checks', () => {
  it('names the offset, the end and the node in EINVAL errors', async () => {
    const { e } = await open({ driver: 'raw', 'node-name': 'rng', file: { driver: 'file', filename: img(MiB) } });
    let err = await failure(io.read(e, 1048000, Buffer.alloc(1024)));
    expect(err.code).toBe('EINVAL');
    expect(err.message).toMatch(/'rng'.*1048000.*1049024.*1048576/);
    err = await failure(io.write(e, 1048000, Buffer.alloc(1024, 1)));
    expect(err.message).toContain('1049024');
    err = await failure(io.read(e, -512, Buffer.alloc(512)));
    expect(err.code).toBe('EINVAL');
    expect(err.message).toContain('-512');
    err = await failure(io.writeZeroes(e, MiB, 1, 0));
    expect(err.message).toContain('write-zeroes');
  });

  it('refuses writes on a read-only node with EPERM and leaves the file alone', async () => {
    const path = img(65536);
    const before = readFileSync(path);
    const ro: NodeOptions = { driver: 'raw', 'read-only': true, file: { driver: 'file', filename: path, 'read-only': true } };
    const { node, e } = await open(ro, { perm: Perm.CONSISTENT_READ, shared: Perm.ALL });
    for (const p of [io.write(e, 0, Buffer.alloc(512, 7)), io.writeZeroes(e, 0, 512, 0), io.discard(e, 0, 4096), io.truncate(e, 4096)]) {
      const err = await failure(p);
      expect(err.code).toBe('EPERM');
      expect(err.message).toContain('read-only');
    }
    expect(() => attachRoot(user, node, 'writer', RW)).toThrow(/read-only/);
    expect(readFileSync(path).equals(before)).toBe(true);
  });

  it('refuses writes through a backend whose edge lacks WRITE', async () => {
    const path = img(65536);
    const before = readFileSync(path);
    const node = await openNode({ driver: 'raw', file: { driver: 'file', filename: path } });
    const b = createBackend({ perm: Perm.CONSISTENT_READ, shared: Perm.ALL }, node);
    unref(node);
    const dev = { id: 'ro-dev' };
    const bio = b.attachDevice(dev);
    const err = await failure(bio.write(0, Buffer.alloc(4096, 9)));
    expect(err.code).toBe('EPERM');
    expect(err.message).toMatch(/no write permission/);
    expect((await failure(bio.writeZeroes(0, 4096, false))).code).toBe('EPERM');
    const back = Buffer.alloc(4096);
    await bio.read(0, back);
    expect(back.equals(before.subarray(0, 4096))).toBe(true);
    b.detachDevice(dev);
    b.unref();
    await settleCloses();
    expect(node.deleted).toBe(true);
    expect(readFileSync(path).equals(before)).toBe(true);
  });
});

describe('read-modify-write', () => {
  const cases: [string, (p: string) => NodeOptions][] = [
    ['blkdebug align=4096', (p) => ({ driver: 'blkdebug', align: 4096, image: { driver: 'file', filename: p } })],
    ['file cache.direct', (p) => ({ driver: 'file', filename: p, cache: { direct: true } })],
  ];
  for (const [label, opts] of cases) {
    for (const seed of [1, 2, 3]) {
      it(`${label}: ~200 concurrent disjoint writes sharing blocks all land (seed ${seed})`, async () => {
        const size = 96 * 1024;
        const path = img(size);
        const want = readFileSync(path);
        const { node, e } = await open(opts(path));
        expect(node.limits.requestAlignment).toBeGreaterThanOrEqual(512);
        const r = rng(seed);
        const writes: Promise<void>[] = [];
        let pos = r(300);
        for (let i = 0; pos < size; i++) {
          const len = Math.min(size - pos, i % 40 === 39 ? 4096 + r(9000) : 1 + r(500));
          const data = pattern(len, seed * 1000 + i);
          data.copy(want, pos);
          writes.push(io.write(e, pos, data));
          pos += len + (r(4) === 0 ? r(50) : 0); // occasional untouched gaps
        }
        expect(writes.length).toBeGreaterThan(150);
        expect(node.inFlight).toBeGreaterThan(0);
        await Promise.all(writes);
        expect(node.inFlight).toBe(0);
        expect(node.serialising).toHaveLength(0);
        await io.flush(e);
        expect(readFileSync(path).equals(want)).toBe(true);
        const back = Buffer.alloc(size);
        await io.read(e, 0, back);
        expect(back.equals(want)).toBe(true);
      });
    }
  }

  for (const dz of ['off', 'on'] as const) {
    it(`write-zeroes and discard sharing blocks with concurrent RMW writes are not lost (detect-zeroes=${dz})`, async () => {
      const size = 64 * 1024;
      const path = img(size);
      const want = readFileSync(path);
      const { e } = await open({
        driver: 'blkdebug', align: 4096, discard: 'unmap', 'detect-zeroes': dz, image: { driver: 'file', filename: path, discard: 'unmap' },
      });
      const r = rng(dz.length);
      const ops: Promise<void>[] = [];
      for (let pos = 0, i = 0; pos < size; i++) {
        const len = Math.min(size - pos, 1 + r(1500));
        const kind = i % 4;
        if (kind === 1) ops.push(io.writeZeroes(e, pos, len, i % 8 === 1 ? ReqFlags.MAY_UNMAP : 0));
        else if (kind === 3 && dz === 'on') ops.push(io.write(e, pos, Buffer.alloc(len)));
        else if (kind === 3) ops.push(io.writeZeroes(e, pos, len, ReqFlags.MAY_UNMAP));
        else ops.push(io.write(e, pos, pattern(len, 50 + i)));
        if (kind === 1 || kind === 3) want.fill(0, pos, pos + len);
        else pattern(len, 50 + i).copy(want, pos);
        pos += len;
      }
      await Promise.all(ops);
      expect(readFileSync(path).equals(want)).toBe(true);
    });
  }

  it('write-zeroes and discard never interleave with a read-modify-write of their block', async () => {
    const path = img(64 * 1024);
    const want = readFileSync(path);
    const { e } = await open({ driver: 'blkdebug', align: 4096, discard: 'unmap', image: { driver: 'file', filename: path, discard: 'unmap' } });
    const { log, restore } = traceDriver(fileDriver);
    try {
      await Promise.all([
        io.write(e, 100, Buffer.alloc(100, 1)), io.writeZeroes(e, 1000, 2000, 0), // RMW first
        io.write(e, 4096 + 3000, Buffer.alloc(100, 2)), io.discard(e, 4096 + 100, 1900),
        io.writeZeroes(e, 8192, 1000, 0), io.write(e, 8192 + 2000, Buffer.alloc(100, 3)), // zeroes first
        io.discard(e, 12288 + 100, 1000), io.write(e, 12288 + 2000, Buffer.alloc(100, 4)),
      ]);
    } finally {
      restore();
    }
    want.fill(1, 100, 200).fill(0, 1000, 3000).fill(2, 7096, 7196).fill(0, 4196, 6096);
    want.fill(0, 8192, 9192).fill(3, 10192, 10292).fill(0, 12388, 13388).fill(4, 14288, 14388);
    expect(readFileSync(path).equals(want)).toBe(true);
    // Per 4k block: the RMW's read..write span and each zeroing request are disjoint in time.
    for (let blk = 0; blk < 4; blk++) {
      const inBlk = log.filter((x) => x.off < (blk + 1) * 4096 && x.end > blk * 4096);
      const rmw = inBlk.filter((x) => x.op === 'readv' || x.op === 'writev');
      const span = [Math.min(...rmw.map((x) => x.t0)), Math.max(...rmw.map((x) => x.t1))];
      const z = inBlk.filter((x) => x.op === 'writeZeroes' || x.op === 'discard');
      expect(rmw.length).toBe(2);
      expect(z.length).toBe(1);
      expect(z[0]!.t1 < span[0]! || z[0]!.t0 > span[1]!, `block ${blk}: ${JSON.stringify(inBlk)}`).toBe(true);
    }
  });

  it('a write waiting behind a read-modify-write counts as in flight, so drain waits for it', async () => {
    const { node, e } = await open({ driver: 'blkdebug', align: 4096, image: { driver: 'null-co', size: MiB, 'latency-ns': 1_000_000 } });
    const done: string[] = [];
    const w1 = io.write(e, 100, Buffer.alloc(100, 1)).then(() => done.push('rmw'));
    const w2 = io.write(e, 0, Buffer.alloc(4096, 2)).then(() => done.push('aligned'));
    expect(node.inFlight).toBe(2);
    await drainedBegin(node);
    expect(node.inFlight).toBe(0);
    expect(done.sort()).toEqual(['aligned', 'rmw']);
    drainedEnd(node);
    await Promise.all([w1, w2]);
  });
});

describe('detect-zeroes, discard and write-zeroes', () => {
  const zeroes = Buffer.alloc(65536);

  it('detect-zeroes=on turns a zero write into write-zeroes that keeps the allocation', async () => {
    const path = img(MiB);
    const { node, e } = await open({ driver: 'file', filename: path, 'detect-zeroes': 'on' });
    const b0 = blocks(path);
    await io.write(e, 65536, zeroes);
    expect(node.stats.wrOps).toBe(0); // no data write reached the driver
    expect(blocks(path)).toBeGreaterThanOrEqual(b0);
    expect(readFileSync(path).subarray(65536, 131072).equals(zeroes)).toBe(true);
    const almost = Buffer.alloc(4096);
    almost[4095] = 1;
    await io.write(e, 0, almost);
    expect(node.stats.wrOps).toBe(1);
  });

  it('detect-zeroes=unmap with discard=unmap punches a hole', async () => {
    const path = img(MiB);
    const { e } = await open({ driver: 'raw', 'detect-zeroes': 'unmap', discard: 'unmap', file: { driver: 'file', filename: path, discard: 'unmap' } });
    const b0 = blocks(path);
    await io.write(e, 65536, zeroes);
    expect(b0 - blocks(path)).toBeGreaterThanOrEqual(65536 / 512);
    expect(await io.blockStatus(e, 65536, 65536)).toMatchObject({ bytes: 65536, data: false, zero: true });
    expect(readFileSync(path).subarray(65536, 131072).equals(zeroes)).toBe(true);
  });

  it('refuses detect-zeroes=unmap without discard=unmap at open', async () => {
    const err = await failure(openNode({ driver: 'file', filename: img(4096), 'detect-zeroes': 'unmap' }));
    expect(err.code).toBe('EINVAL');
    expect(err.message).toMatch(/detect-zeroes.*unmap.*discard/);
  });

  it('discard punches a hole with discard=unmap and is a no-op without', async () => {
    const p1 = img(MiB);
    const p2 = img(MiB);
    const before2 = readFileSync(p2);
    const a = await open({ driver: 'file', filename: p1, discard: 'unmap' });
    const b = await open({ driver: 'file', filename: p2 });
    const [b1, b2] = [blocks(p1), blocks(p2)];
    await io.discard(a.e, 256 * 1024, 128 * 1024);
    await io.discard(b.e, 256 * 1024, 128 * 1024);
    expect(b1 - blocks(p1)).toBeGreaterThanOrEqual(256);
    expect(readFileSync(p1).subarray(256 * 1024, 384 * 1024).equals(Buffer.alloc(128 * 1024))).toBe(true);
    expect(await io.blockStatus(a.e, 256 * 1024, MiB - 256 * 1024)).toMatchObject({ bytes: 128 * 1024, data: false });
    expect(blocks(p2)).toBe(b2);
    expect(readFileSync(p2).equals(before2)).toBe(true);
    expect(b.node.stats.discardOps).toBe(0);
  });

  it('write-zeroes falls back to writing zeroes on ENOTSUP, unless NO_FALLBACK', async () => {
    const path = img(MiB);
    const want = readFileSync(path);
    const { node, e } = await open({
      driver: 'blkdebug', 'inject-error': [{ event: 'write_zeroes', errno: 95 }], image: { driver: 'file', filename: path },
    });
    const err = await failure(io.writeZeroes(e, 4096, 8192, ReqFlags.NO_FALLBACK | ReqFlags.MAY_UNMAP));
    expect(err.code).toBe('ENOTSUP');
    expect(readFileSync(path).equals(want)).toBe(true);
    await io.writeZeroes(e, 4096 + 10, 8192, ReqFlags.MAY_UNMAP);
    expect(node.stats.wrOps).toBeGreaterThan(0); // done as a data write
    want.fill(0, 4106, 4106 + 8192);
    expect(readFileSync(path).equals(want)).toBe(true);
  });

  const shm = existsSync('/dev/shm') ? mkdtempSync('/dev/shm/spindle-io-') : null;
  afterAll(() => void (shm && rmSync(shm, { recursive: true, force: true })));
  it.runIf(shm !== null)('write-zeroes falls back where the filesystem lacks ZERO_RANGE (tmpfs)', async () => {
    const path = img(MiB, false, shm!);
    const want = readFileSync(path);
    const { node, e } = await open({ driver: 'file', filename: path });
    expect((await failure(io.writeZeroes(e, 0, 65536, ReqFlags.NO_FALLBACK))).code).toBe('ENOTSUP');
    expect(readFileSync(path).equals(want)).toBe(true);
    await io.writeZeroes(e, 100, 65536, 0);
    want.fill(0, 100, 65636);
    expect(readFileSync(path).equals(want)).toBe(true);
    expect(node.stats.wrOps).toBeGreaterThan(0);
  });
});

describe('block-status', () => {
  /** Walks [start, end) and merges equal answers into runs. */
  async function runs(e: BlockChild, start: number, end: number): Promise<[number, number, boolean][]> {
    const out: [number, number, boolean][] = [];
    for (let pos = start; pos < end; ) {
      const st = await io.blockStatus(e, pos, end - pos);
      expect(st.bytes).toBeGreaterThan(0);
      expect(st.zero).toBe(!st.data);
      const last = out[out.length - 1];
      if (last && last[2] === st.data) last[1] = pos + st.bytes;
      else out.push([pos, pos + st.bytes, st.data]);
      pos += st.bytes;
    }
    return out;
  }

  it('finds data islands in a sparse file exactly, also through a raw window', async () => {
    const path = img(8 * MiB, true);
    const { e } = await open({ driver: 'raw', file: { driver: 'file', filename: path } });
    await io.write(e, MiB, pattern(65536, 1));
    await io.write(e, 3 * MiB, pattern(65536, 2));
    const K64 = 65536;
    expect(await runs(e, 0, 8 * MiB)).toEqual([
      [0, MiB, false], [MiB, MiB + K64, true], [MiB + K64, 3 * MiB, false], [3 * MiB, 3 * MiB + K64, true], [3 * MiB + K64, 8 * MiB, false],
    ]);
    expect(await io.blockStatus(e, MiB + 4096, MiB)).toMatchObject({ bytes: K64 - 4096, data: true, zero: false });
    expect(await io.blockStatus(e, 2 * MiB, 4096)).toMatchObject({ bytes: 4096, data: false, zero: true });
    expect(await io.blockStatus(e, 0, 2 * MiB)).toMatchObject({ bytes: MiB, data: false });
    const w = await open({ driver: 'raw', offset: MiB / 2, size: 4 * MiB, file: { driver: 'file', filename: path } }, { perm: Perm.CONSISTENT_READ, shared: Perm.ALL });
    expect(await runs(w.e, 0, 4 * MiB)).toEqual([
      [0, MiB / 2, false], [MiB / 2, MiB / 2 + K64, true], [MiB / 2 + K64, 2.5 * MiB, false], [2.5 * MiB, 2.5 * MiB + K64, true], [2.5 * MiB + K64, 4 * MiB, false],
    ]);
  });
});

describe('truncate', () => {
  it('needs RESIZE on the edge, grows with zeroes, shrinks, and tells the parents', async () => {
    const path = img(MiB);
    const before = readFileSync(path);
    const plain = await open({ driver: 'raw', 'node-name': 'tr', file: { driver: 'file', filename: path } });
    const err = await failure(io.truncate(plain.e, 2 * MiB));
    expect(err.code).toBe('EPERM');
    expect(err.message).toMatch(/'tr'.*resize/);
    expect(statSync(path).size).toBe(MiB);
    const node = plain.node;
    const e = attachRoot(user, node, 'resizer', { perm: Perm.CONSISTENT_READ | Perm.WRITE | Perm.RESIZE, shared: Perm.ALL });
    opened[0]!.edges.push(e);
    await io.truncate(e, 2 * MiB);
    expect(statSync(path).size).toBe(2 * MiB);
    expect(node.length).toBe(2 * MiB);
    expect(resized).toContain(e);
    const back = Buffer.alloc(2 * MiB, 0xee);
    await io.read(e, 0, back);
    expect(back.equals(Buffer.concat([before, Buffer.alloc(MiB)]))).toBe(true); // the new area reads as zeroes
    await io.truncate(e, MiB / 2);
    expect(statSync(path).size).toBe(MiB / 2);
    expect((await failure(io.read(e, MiB / 2, Buffer.alloc(1)))).code).toBe('EINVAL');
    expect((await failure(io.truncate(e, -1))).code).toBe('EINVAL');
  });
});

describe('FUA', () => {
  it('a FUA write is made stable (fdatasync) before it completes; plain writes are not', async () => {
    const { e } = await open({ driver: 'raw', file: { driver: 'file', filename: img(65536) } });
    const eng = getEngine();
    const syncs: boolean[] = [];
    const orig = eng.fsync;
    eng.fsync = (fd, datasync, done) => (syncs.push(datasync), orig.call(eng, fd, datasync, done));
    try {
      await io.write(e, 0, pattern(4096, 1));
      expect(syncs).toEqual([]);
      await io.write(e, 4096, pattern(4096, 2), ReqFlags.FUA);
      await io.write(e, 100, pattern(100, 3), ReqFlags.FUA); // unaligned, small: synced all the same
      expect(syncs).toEqual([true, true]);
    } finally {
      eng.fsync = orig;
    }
  });
});

describe('in-flight accounting', () => {
  it('1000 callback reads at depth 64: every callback once, in-flight back to 0', async () => {
    const { node, e } = await open({ driver: 'null-co', size: 64 * MiB, 'latency-ns': 100_000 });
    const N = 1000;
    const calls = new Uint32Array(N);
    const errs: (BlockError | null)[] = new Array(N).fill(null);
    let next = 0;
    let maxDepth = 0;
    const buf = Buffer.alloc(4096);
    await new Promise<void>((resolve) => {
      let done = 0;
      const issue = (): void => {
        const i = next++;
        // Every 50th request is past the end: it fails without reaching the driver.
        const off = i % 50 === 49 ? 64 * MiB : (i * 4096) % (64 * MiB);
        io.readv(e, off, 4096, [buf], 0, (err) => {
          calls[i]!++;
          errs[i] = err;
          if (++done === N) resolve();
          else if (next < N) issue();
        });
        maxDepth = Math.max(maxDepth, node.inFlight);
      };
      for (let k = 0; k < 64; k++) issue();
    });
    expect([...calls].every((c) => c === 1)).toBe(true);
    expect(errs.filter((x) => x !== null)).toHaveLength(N / 50);
    expect(errs.every((x, i) => (x === null) === (i % 50 !== 49))).toBe(true);
    expect(maxDepth).toBe(64);
    expect(node.inFlight).toBe(0);
    expect(node.stats.rdOps).toBe(N - N / 50);
  });

  it('failed writes release their tracking too', async () => {
    const { node, e } = await open({
      driver: 'blkdebug', align: 4096, 'inject-error': [{ event: 'write_aio', errno: 5, offset: 8192 }],
      image: { driver: 'null-co', size: MiB },
    });
    const res = await Promise.allSettled([0, 8192, 8192 + 100, 3 * 4096, 100].map((o, i) => io.write(e, o, Buffer.alloc(i === 0 ? 4096 : 200, 1))));
    expect(res.map((r) => r.status)).toEqual(['fulfilled', 'rejected', 'rejected', 'fulfilled', 'fulfilled']);
    expect((res[1] as PromiseRejectedResult).reason).toMatchObject({ code: 'EIO' });
    expect(node.inFlight).toBe(0);
    expect(node.writeHead).toBeNull();
    expect(node.serialising).toHaveLength(0);
  });
});
