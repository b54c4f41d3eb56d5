/**
 * runDriverConformance: the behaviours every block driver owes its parents, checked through
 * a root edge (attachRoot) the way a backend or job would use the node.
 *
 * `make()` opens a fresh node (with explicit node names, so the tree can be re-opened from
 * its description) and says whether it keeps data (`persistent`).
 */
import { readdirSync } from 'node:fs';
import { afterEach, describe, expect, it } from 'vitest';
import { describeTree } from '../../src/block/describe.js';
import { BlockError } from '../../src/block/error.js';
import { attachRoot, detachRoot, findNode, openNode, settleCloses, unref } from '../../src/block/graph.js';
import * as io from '../../src/block/io.js';
import type { BlockChild, BlockNode, BlockParent } from '../../src/block/node.js';
import { Perm, ReqFlags, type BlockDriver, type IoVec, type NodeOptions } from '../../src/block/types.js';

export interface ConformanceSubject {
  node: BlockNode;
  persistent: boolean;
  cleanup?(): void | Promise<void>;
}

const user: BlockParent = { parentKind: 'job', describeUser: () => 'the conformance test' };
const RW = { perm: Perm.CONSISTENT_READ | Perm.WRITE, shared: Perm.ALL };

/** A small deterministic PRNG (mulberry32). */
export function rng(seed: number): (n: number) => number {
  let a = seed >>> 0;
  return (n) => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return Math.floor((((t ^ (t >>> 14)) >>> 0) / 4294967296) * n);
  };
}

export interface TraceEntry { op: string; off: number; end: number; t0: number; t1: number }

/**
 * Logs when each readv/writev/writeZeroes/discard reaches `drv` and when it completes, on a
 * logical clock, by wrapping the shared driver table; `restore()` puts the table back.
 */
export function traceDriver(drv: BlockDriver): { log: TraceEntry[]; restore(): void } {
  const log: TraceEntry[] = [];
  let clock = 0;
  const saved = { ...drv };
  const enter = (op: string, off: number, bytes: number): TraceEntry => {
    const ent = { op, off, end: off + bytes, t0: clock++, t1: -1 };
    log.push(ent);
    return ent;
  };
  for (const k of ['readv', 'writev'] as const) {
    const orig = saved[k];
    if (orig) drv[k] = (nd, off, bytes, iov, fl, cb) => {
      const ent = enter(k, off, bytes);
      orig.call(drv, nd, off, bytes, iov, fl, (err) => ((ent.t1 = clock++), cb(err)));
    };
  }
  const zo = saved.writeZeroes;
  if (zo) drv.writeZeroes = async (nd, off, bytes, fl) => {
    const ent = enter('writeZeroes', off, bytes);
    await zo.call(drv, nd, off, bytes, fl);
    ent.t1 = clock++;
  };
  const dc = saved.discard;
  if (dc) drv.discard = async (nd, off, bytes) => {
    const ent = enter('discard', off, bytes);
    await dc.call(drv, nd, off, bytes);
    ent.t1 = clock++;
  };
  return { log, restore: () => void Object.assign(drv, saved) };
}

function cbp(fn: (cb: (e: BlockError | null) => void) => void): Promise<void> {
  return new Promise((res, rej) => fn((e) => (e ? rej(e) : res())));
}
export const readv = (e: BlockChild, off: number, iov: IoVec, flags = 0): Promise<void> =>
  cbp((cb) => io.readv(e, off, iov.reduce((s, b) => s + b.length, 0), iov, flags, cb));
export const writev = (e: BlockChild, off: number, iov: IoVec, flags = 0): Promise<void> =>
  cbp((cb) => io.writev(e, off, iov.reduce((s, b) => s + b.length, 0), iov, flags, cb));

/** Splits `buf` into 1..4 segments of odd sizes (views, so writes into them land in buf). */
function segments(buf: Buffer, r: (n: number) => number): Buffer[] {
  const out: Buffer[] = [];
  let pos = 0;
  const parts = 1 + r(4);
  for (let i = 0; i < parts - 1 && pos < buf.length; i++) {
    const n = Math.min(buf.length - pos, 1 + 2 * r(Math.max(1, (buf.length - pos) >> 1)));
    out.push(buf.subarray(pos, pos + n));
    pos += n;
  }
  if (pos < buf.length) out.push(buf.subarray(pos));
  return out;
}

function fill(len: number, seed: number): Buffer {
  const b = Buffer.alloc(len);
  for (let i = 0; i < len; i++) b[i] = ((i * 31 + seed * 7) % 251) + 1;
  return b;
}

async function expectFail(p: Promise<unknown>, code: string, ...parts: string[]): Promise<BlockError> {
  const err = await p.then(() => null, (e: unknown) => e);
  expect(err, 'the request should have failed').toBeInstanceOf(BlockError);
  const be = err as BlockError;
  expect(be.code).toBe(code);
  for (const s of parts) expect(be.message).toContain(s);
  return be;
}

function fdCount(): number {
  return readdirSync('/proc/self/fd').length;
}

/** Opens the trees described (bottom-up, children by name) and returns the top node. */
async function openDescribed(descs: readonly NodeOptions[]): Promise<BlockNode> {
  const opened: BlockNode[] = [];
  try {
    for (const d of descs) opened.push(await openNode(structuredClone(d)));
  } catch (e) {
    for (const n of opened.reverse()) unref(n);
    throw e;
  }
  // Parents hold their children now; drop our references to everything but the top.
  for (const n of opened.slice(0, -1)) unref(n);
  return opened[opened.length - 1]!;
}

function treeNodes(top: BlockNode): BlockNode[] {
  const out: BlockNode[] = [];
  const walk = (n: BlockNode): void => {
    out.push(n);
    for (const c of n.children) walk(c.node);
  };
  walk(top);
  return out;
}

export function runDriverConformance(name: string, make: () => Promise<ConformanceSubject>): void {
  describe(`driver conformance: ${name}`, () => {
    let live: { s: ConformanceSubject; edge: BlockChild | null; node: BlockNode } | null = null;

    async function setup(): Promise<{ s: ConformanceSubject; e: BlockChild; node: BlockNode }> {
      const s = await make();
      const e = attachRoot(user, s.node, 'root', RW);
      live = { s, edge: e, node: s.node };
      return { s, e, node: s.node };
    }
    /** Drops the edge and the node reference; returns once closes have settled. */
    async function release(): Promise<void> {
      if (!live) return;
      const l = live;
      live = null;
      if (l.edge) detachRoot(l.edge);
      if (!l.node.deleted) unref(l.node);
      await settleCloses();
      await l.s.cleanup?.();
    }
    afterEach(release);

    it('has a positive, stable length and settles its in-flight count', async () => {
      const { e, node } = await setup();
      const len = node.length;
      expect(Number.isSafeInteger(len) && len > 0).toBe(true);
      expect(io.getLength(e)).toBe(len);
      await writev(e, 0, [fill(4096, 1)]);
      await readv(e, len - 1000, [Buffer.alloc(1000)]);
      await io.flush(e);
      expect(node.length).toBe(len);
      expect(node.inFlight).toBe(0);
      expect(node.writesInFlight).toBe(0);
      expect(node.writeHead).toBeNull();
    });

    it('round-trips vectored writes at aligned and unaligned offsets (model check)', async () => {
      const { s, e, node } = await setup();
      const len = Math.min(node.length, 4 << 20);
      const model = Buffer.alloc(len);
      if (s.persistent) await readv(e, 0, [model]);
      const r = rng(name.length * 977 + 13);
      const pick = (max: number): [number, number] => {
        const kind = r(3);
        const unit = kind === 0 ? 4096 : kind === 1 ? 512 : 1;
        const bytes = Math.max(1, Math.floor((1 + r(max)) / unit) * unit);
        const off = Math.floor(r(len - bytes + 1) / unit) * unit;
        return [off, bytes];
      };
      for (let i = 0; i < 60; i++) {
        const [off, bytes] = pick(i % 10 === 9 ? 200_000 : 20_000);
        const data = fill(bytes, i + 1);
        await writev(e, off, segments(data, r));
        data.copy(model, off);
        if (i % 3 === 2) {
          const [roff, rbytes] = pick(30_000);
          const got = Buffer.alloc(rbytes, 0xee);
          await readv(e, roff, segments(got, r));
          const want = s.persistent ? model.subarray(roff, roff + rbytes) : Buffer.alloc(rbytes);
          expect(got.equals(want), `read [${roff}, +${rbytes}) after ${i + 1} writes`).toBe(true);
        }
      }
      // Disjoint writes issued in one tick, then the whole model compared.
      const batch: Promise<void>[] = [];
      for (let i = 0; i < 16; i++) {
        const off = i * Math.floor(len / 16) + 777;
        const data = fill(3001 + i, 100 + i);
        batch.push(writev(e, off, segments(data, r)));
        data.copy(model, off);
      }
      await Promise.all(batch);
      const all = Buffer.alloc(len, 0xee);
      await readv(e, 0, [all]);
      expect(all.equals(s.persistent ? model : Buffer.alloc(len))).toBe(true);
      expect(node.inFlight).toBe(0);
    });

    it('accepts zero-length reads and writes anywhere in range', async () => {
      const { e, node } = await setup();
      const len = node.length;
      for (const off of [0, 1, 4096, len - 1, len]) {
        await readv(e, off, []);
        await writev(e, off, []);
        await readv(e, off, [Buffer.alloc(0)]);
        await writev(e, off, [Buffer.alloc(0)]);
        await io.writeZeroes(e, off, 0, 0);
        await io.writeZeroes(e, off, 0, ReqFlags.MAY_UNMAP);
        await io.discard(e, off, 0);
      }
      expect(node.length).toBe(len);
      expect(node.inFlight).toBe(0);
    });

    it('refuses requests past the end (or grows, for growable protocols)', async () => {
      const { s, e, node } = await setup();
      const len = node.length;
      if (io.isGrowable(node)) {
        // A file reads zeroes past its end and does not change length by reading.
        const b = Buffer.alloc(2048, 0xee);
        await readv(e, len - 1024, [b]);
        expect(b.subarray(1024).equals(Buffer.alloc(1024))).toBe(true);
        expect(node.length).toBe(len);
        return;
      }
      const before = Buffer.alloc(512);
      if (s.persistent) await readv(e, len - 512, [before]);
      const end = String(len + 512);
      await expectFail(readv(e, len - 512, [Buffer.alloc(1024)]), 'EINVAL', `'${node.name}'`, end);
      await expectFail(writev(e, len - 512, [Buffer.alloc(1024, 1)]), 'EINVAL', `'${node.name}'`, end);
      await expectFail(readv(e, len, [Buffer.alloc(1)]), 'EINVAL', `'${node.name}'`);
      await expectFail(io.writeZeroes(e, len - 512, 1024, 0), 'EINVAL', `'${node.name}'`);
      await expectFail(io.discard(e, len, 1), 'EINVAL', `'${node.name}'`);
      await expectFail(io.blockStatus(e, len, 1), 'EINVAL', `'${node.name}'`);
      if (s.persistent) {
        const tail = Buffer.alloc(512, 0xee);
        await readv(e, len - 512, [tail]);
        expect(tail.equals(before)).toBe(true); // the refused writes left nothing
      }
      expect(node.length).toBe(len);
    });

    it('refuses negative and non-integer offsets with EINVAL', async () => {
      const { e, node } = await setup();
      for (const off of [-1, -4096, 0.5, 511.5, Number.NaN, Infinity]) {
        await expectFail(readv(e, off, [Buffer.alloc(512)]), 'EINVAL', `'${node.name}'`);
        await expectFail(writev(e, off, [Buffer.alloc(512)]), 'EINVAL', `'${node.name}'`);
        await expectFail(io.writeZeroes(e, off, 512, 0), 'EINVAL');
        await expectFail(io.discard(e, off, 512), 'EINVAL');
        await expectFail(io.blockStatus(e, off, 512), 'EINVAL');
      }
      await expectFail(cbp((cb) => io.readv(e, 0, 1.5, [Buffer.alloc(2)], 0, cb)), 'EINVAL');
      await expectFail(cbp((cb) => io.writev(e, 0, -1, [Buffer.alloc(2)], 0, cb)), 'EINVAL');
      expect(node.inFlight).toBe(0);
    });

    it('write-zeroes reads back as zeroes and leaves the neighbours alone', async () => {
      const { s, e } = await setup();
      const base = 65536 + 4096;
      const data = fill(3 * 65536, 9);
      await writev(e, base, [data]);
      for (const [flags, off, n] of [[0, 4096, 65536], [ReqFlags.MAY_UNMAP, 100_000, 40_000], [0, 3, 1000]] as const) {
        await io.writeZeroes(e, base + off, n, flags);
        data.fill(0, off, off + n);
      }
      const got = Buffer.alloc(data.length, 0xee);
      await readv(e, base, [got]);
      expect(got.equals(s.persistent ? data : Buffer.alloc(data.length))).toBe(true);
    });

    it('flushes', async () => {
      const { e, node } = await setup();
      await writev(e, 0, [fill(512, 3)]);
      await expect(io.flush(e)).resolves.toBeUndefined();
      expect(node.stats.flushOps).toBeGreaterThan(0);
    });

    it('answers block-status with bytes > 0 that cover any range', async () => {
      const { e, node } = await setup();
      const len = node.length;
      await writev(e, 8192, [fill(65536, 4)]);
      const ranges: [number, number][] = [[0, len], [1, len - 1], [8192 + 100, 70_000], [len - 4097, 4097]];
      for (const [start, bytes] of ranges) {
        let pos = start;
        let steps = 0;
        while (pos < start + bytes) {
          const st = await io.blockStatus(e, pos, start + bytes - pos);
          expect(st.bytes, `block-status at ${pos}`).toBeGreaterThan(0);
          expect(pos + st.bytes).toBeLessThanOrEqual(start + bytes);
          expect(typeof st.data === 'boolean' && typeof st.zero === 'boolean').toBe(true);
          pos += st.bytes;
          expect(++steps).toBeLessThan(10_000);
        }
        expect(pos).toBe(start + bytes);
      }
      // The 64k just written is data.
      const st = await io.blockStatus(e, 8192, 65536);
      if (node.driver.format !== 'null-co') expect(st.data).toBe(true);
    });

    it('describes itself, and the description re-opens to an equal node', async () => {
      const { s, e, node } = await setup();
      const descs = describeTree(node);
      expect(descs[descs.length - 1]!['node-name']).toBe(node.name);
      // Every option the node was opened with survives in its description.
      for (const [k, v] of Object.entries(node.options)) {
        if (typeof v === 'object' && v !== null && 'driver' in v) {
          expect(typeof descs[descs.length - 1]![k === 'image' ? 'file' : k]).toBe('string');
        } else if (typeof v === 'object' && v !== null) {
          expect(descs[descs.length - 1]![k], `option '${k}'`).toMatchObject(v);
        } else expect(descs[descs.length - 1]![k], `option '${k}'`).toEqual(v);
      }
      const names = descs.map((d) => d['node-name'] as string);
      const infos = treeNodes(node).map((n) => n.driver.info?.(n));
      const marker = fill(4096, 42);
      await writev(e, 4096, [marker]);
      await io.flush(e);
      live!.edge = null;
      detachRoot(e);
      unref(node);
      await settleCloses();
      for (const n of names) expect(findNode(n), `node '${n}' is gone`).toBeUndefined();
      const again = await openDescribed(descs);
      live!.node = again;
      expect(describeTree(again)).toEqual(descs);
      expect(treeNodes(again).map((n) => n.driver.info?.(n))).toEqual(infos);
      const e2 = attachRoot(user, again, 'root', RW);
      live!.edge = e2;
      const back = Buffer.alloc(4096, 0xee);
      await readv(e2, 4096, [back]);
      expect(back.equals(s.persistent ? marker : Buffer.alloc(4096))).toBe(true);
    });

    it('is deleted with its whole tree after the last unref, without leaking fds', async () => {
      const once = async (): Promise<BlockNode[]> => {
        const { e, node } = await setup();
        await writev(e, 0, [fill(4096, 5)]);
        const tree = treeNodes(node);
        await release();
        return tree;
      };
      await once(); // engines and slabs are created lazily on first use
      const before = fdCount();
      const tree = await once();
      for (const n of tree) {
        expect(n.deleted, `node '${n.name}' deleted`).toBe(true);
        expect(findNode(n.name)).toBeUndefined();
        expect(n.parents).toHaveLength(0);
      }
      expect(fdCount()).toBe(before);
    });
  });
}
