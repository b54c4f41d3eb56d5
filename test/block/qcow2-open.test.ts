// qcow2 open checks: feature bits, corrupt/dirty images, broken headers, backing formats,
// read-only opens that never write, and image locks seen by qemu-io.
import { closeSync, openSync, readFileSync, statSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { createBackend } from '../../src/backend/backend.js';
import { BlockError } from '../../src/block/error.js';
import { attachRoot, detachRoot, openNode, settleCloses, unref } from '../../src/block/graph.js';
import * as io from '../../src/block/io.js';
import type { BlockChild, BlockNode, BlockParent } from '../../src/block/node.js';
import { Perm, type NodeOptions } from '../../src/block/types.js';
import { setWarningSink } from '../../src/block/warn.js';
import { createImage, qemuImg, qemuInfo, qemuRaw, run, sha256 } from '../helpers/qemu.js';
import { scratchDir } from '../helpers/tmp.js';

const dir = scratchDir('spindle-qcow2-open-');
const MiB = 1 << 20;
const user: BlockParent = { parentKind: 'job', describeUser: () => 'the qcow2 open test' };
let seq = 0;
const path = (name: string): string => join(dir, `${seq++}-${name}`);

const nodes: BlockNode[] = [];
const edges: BlockChild[] = [];
afterEach(async () => {
  for (const e of edges.splice(0)) if (e.node.parents.includes(e)) detachRoot(e);
  for (const n of nodes.splice(0)) if (!n.deleted) unref(n);
  await settleCloses();
});

function opts(filename: string, extra: Partial<NodeOptions> = {}): NodeOptions {
  return { driver: 'qcow2', file: { driver: 'file', filename }, ...extra };
}
async function open(filename: string, extra: Partial<NodeOptions> = {}): Promise<BlockNode> {
  const n = await openNode(opts(filename, extra));
  nodes.push(n);
  return n;
}
async function close(n: BlockNode): Promise<void> {
  for (const e of [...n.parents]) if (edges.includes(e)) detachRoot(e);
  nodes.splice(nodes.indexOf(n), 1);
  unref(n);
  await settleCloses();
}
function attach(n: BlockNode, perm: number): BlockChild {
  const e = attachRoot(user, n, 'root', { perm, shared: Perm.ALL });
  edges.push(e);
  return e;
}
async function openFails(filename: string, extra: Partial<NodeOptions> = {}): Promise<BlockError> {
  const err = await openNode(opts(filename, extra)).then((n) => (nodes.push(n), null), (e: unknown) => e);
  expect(err, 'the open should have failed').toBeInstanceOf(BlockError);
  return err as BlockError;
}

function patch(p: string, offset: number, bytes: Buffer | number[]): void {
  const fd = openSync(p, 'r+');
  writeSync(fd, Buffer.from(bytes), 0, bytes.length, offset);
  closeSync(fd);
}
/** ORs `mask` into the low byte (bits 0-7) of the 64-bit feature field at `field`. */
function setFeatureBit(p: string, field: number, mask: number): void {
  const b = readFileSync(p);
  patch(p, field + 7, [b[field + 7]! | mask]);
}
/** Offset of the header extension `type` (its 8-byte type/length head), or -1. */
function findExtension(p: string, type: number): number {
  const b = readFileSync(p);
  let off = b.readUInt32BE(100);
  while (off + 8 <= 65536) {
    const t = b.readUInt32BE(off);
    if (t === 0) return -1;
    if (t === type) return off;
    off += 8 + Math.ceil(b.readUInt32BE(off + 4) / 8) * 8;
  }
  return -1;
}
const EXT_FEATURES = 0x6803f857;
const EXT_BACKING_FORMAT = 0xe2792aca;

/** Reads the whole disk through a read-only root edge, in 3-cluster requests. */
async function readAll(n: BlockNode): Promise<Buffer> {
  const e = attach(n, Perm.CONSISTENT_READ);
  const out = Buffer.alloc(n.length);
  for (let pos = 0; pos < out.length; pos += 196608) await io.read(e, pos, out.subarray(pos, Math.min(out.length, pos + 196608)));
  return out;
}

function withWarnings<T>(fn: () => Promise<T>): Promise<{ value: T; warnings: string[] }> {
  const warnings: string[] = [];
  const old = setWarningSink((m) => void warnings.push(m));
  return fn().then((value) => ({ value, warnings }), (e: unknown) => { throw e; }).finally(() => setWarningSink(old));
}

function populated(name: string, size = 2 * MiB, o: string[] = []): string {
  const p = createImage(path(name), size, o);
  run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x3c 65000 200000', p]);
  return p;
}

describe('qcow2 open: feature bits', () => {
  it('refuses an unknown incompatible feature bit with ENOTSUP naming it', async () => {
    const p = populated('f5.qcow2');
    setFeatureBit(p, 72, 1 << 5);
    const err = await openFails(p, { 'read-only': true });
    expect(err.code).toBe('ENOTSUP');
    expect(err.message).toContain('unknown incompatible feature bit 5');
    // With a feature-name-table entry for bit 5, the name is what the user sees.
    const ext = findExtension(p, EXT_FEATURES);
    expect(ext).toBeGreaterThan(0);
    const row = Buffer.alloc(48);
    row[0] = 0;
    row[1] = 5;
    row.write('frobnicated clusters', 2);
    patch(p, ext + 8, row); // the first row (qemu's "dirty bit") becomes bit 5's name
    const named = await openFails(p, { 'read-only': true });
    expect(named.code).toBe('ENOTSUP');
    expect(named.message).toContain('frobnicated clusters');
  });

  it('opens a corrupt image read-only with a warning; writers are refused; the file is untouched', async () => {
    const p = populated('corrupt.qcow2');
    setFeatureBit(p, 72, 1 << 1);
    const sum = sha256(readFileSync(p));
    const { value: n, warnings } = await withWarnings(() => open(p));
    expect(n.readOnly).toBe(true);
    expect(warnings.join('\n')).toMatch(/corrupt/);
    expect(warnings.join('\n')).toContain('read-only');
    expect(warnings.join('\n')).toContain(p);
    expect(() => attach(n, Perm.CONSISTENT_READ | Perm.WRITE)).toThrow(/read-only/);
    const b = createBackend({}, n);
    const dev = { id: 'corrupt-dev' };
    const blk = b.attachDevice(dev, {});
    const err = await blk.write(0, Buffer.alloc(512, 1)).then(() => null, (e: unknown) => e);
    expect(err).toBeInstanceOf(BlockError);
    expect((err as BlockError).code).toBe('EPERM');
    const got = Buffer.alloc(n.length);
    await blk.read(0, got);
    expect(got[65000]).toBe(0x3c);
    b.detachDevice(dev);
    b.unref();
    await close(n);
    expect(sha256(readFileSync(p))).toBe(sum);
  });

  it('repairs a dirty image on a read-write open, and leaves it alone read-only', async () => {
    const p = createImage(path('dirty.qcow2'), 2 * MiB, ['lazy_refcounts=on']);
    // qemu-io's abort leaves the lazy-refcounts image dirty, as a crash would.
    const r = run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x44 1000 70000', '-c', 'abort', p]);
    expect(r.status).not.toBe(0);
    expect(readFileSync(p)[79]! & 1).toBe(1);
    const expected = qemuRaw(p);
    const sum = sha256(readFileSync(p));
    const ro = await open(p, { 'read-only': true });
    expect((await readAll(ro)).equals(expected)).toBe(true);
    await close(ro);
    expect(sha256(readFileSync(p)), 'a read-only open repairs nothing').toBe(sum);
    const warnings: string[] = [];
    const old = setWarningSink((m) => warnings.push(m));
    try {
      const rw = await open(p);
      expect(warnings.join('\n')).toMatch(/not closed cleanly; repairing/);
      expect((await readAll(rw)).equals(expected)).toBe(true);
      await close(rw);
    } finally {
      setWarningSink(old);
    }
    expect(readFileSync(p)[79]! & 1, 'the dirty bit is cleared').toBe(0);
    const check = run('qemu-img', ['check', p]);
    expect(check.status, check.stdout).toBe(0);
  });

  it('clears unknown autoclear bits (bitmaps) on a read-write open, and only then', async () => {
    const p = populated('bitmap.qcow2');
    qemuImg(['bitmap', '--add', p, 'b0']);
    expect(readFileSync(p)[95]! & 1).toBe(1);
    const ro = await open(p, { 'read-only': true });
    await readAll(ro);
    await close(ro);
    expect(readFileSync(p)[95]! & 1, 'a read-only open changes nothing').toBe(1);
    const rw = await open(p);
    const e = attach(rw, Perm.CONSISTENT_READ | Perm.WRITE);
    await io.write(e, 0, Buffer.alloc(4096, 0x61));
    await close(rw);
    // qemu must not trust a bitmap that missed Spindle's write.
    expect(readFileSync(p)[95]! & 1).toBe(0);
    expect(JSON.stringify(qemuInfo(p)['format-specific'])).not.toContain('"b0"');
  });
});

describe('qcow2 open: broken headers', () => {
  const cases: [string, (p: string) => void, string, RegExp][] = [
    ['bad magic', (p) => patch(p, 0, [0x51, 0x46, 0x49, 0xfc]), 'EINVAL', /magic|not a qcow2/],
    ['version 4', (p) => patch(p, 4, [0, 0, 0, 4]), 'ENOTSUP', /version 4/],
    ['version 1', (p) => patch(p, 4, [0, 0, 0, 1]), 'ENOTSUP', /version 1/],
    ['cluster_bits 8', (p) => patch(p, 20, [0, 0, 0, 8]), 'EINVAL', /cluster/],
    ['cluster_bits 22', (p) => patch(p, 20, [0, 0, 0, 22]), 'EINVAL', /cluster/],
    ['unaligned L1 table', (p) => patch(p, 40, [0, 0, 0, 0, 0, 3, 0, 0x10]), 'EINVAL', /L1 table offset/],
    ['L1 table past the end', (p) => patch(p, 40, [0, 0, 0, 1, 0, 0, 0, 0]), 'EINVAL', /L1 table/],
    ['L1 table too small', (p) => patch(p, 36, [0, 0, 0, 0]), 'EINVAL', /L1 table/],
    ['unaligned refcount table', (p) => patch(p, 48, [0, 0, 0, 0, 0, 1, 0, 8]), 'EINVAL', /refcount table/],
    ['zero-cluster refcount table', (p) => patch(p, 56, [0, 0, 0, 0]), 'EINVAL', /refcount table/],
  ];
  for (const [what, breakIt, code, re] of cases) {
    it(`${what}: ${code} naming the image`, async () => {
      const p = populated('broken.qcow2');
      breakIt(p);
      const err = await openFails(p, { 'read-only': true });
      expect(err.code).toBe(code);
      expect(err.message).toMatch(re);
      expect(err.message).toContain(p);
    });
  }
});

describe('qcow2 open: backing files', () => {
  it('a backing file without a recorded format is an error unless the backing is given', async () => {
    const base = path('base.raw');
    const data = Buffer.alloc(MiB, 0x5b);
    writeFileSync(base, data);
    const p = createImage(path('nofmt.qcow2'), MiB, [], { file: base, fmt: 'raw' });
    const ext = findExtension(p, EXT_BACKING_FORMAT);
    expect(ext).toBeGreaterThan(0);
    patch(p, ext, [0x12, 0x34, 0x56, 0x78]); // now an unknown extension, ignored by readers
    const err = await openFails(p, { 'read-only': true });
    expect(err.code).toBe('EINVAL');
    expect(err.message).toContain('no recorded format');
    expect(err.message).toContain(base.split('/').pop()!);
    const n = await open(p, { 'read-only': true, backing: { driver: 'raw', file: { driver: 'file', filename: base } } });
    expect(n.backing?.node.driver.format).toBe('raw');
    expect((await readAll(n)).equals(data)).toBe(true);
    await close(n);
    const alone = await open(p, { 'read-only': true, backing: null });
    expect(alone.backing).toBeUndefined();
    expect((await readAll(alone)).equals(Buffer.alloc(MiB))).toBe(true);
  });

  it('a missing backing file fails the open with an error naming it', async () => {
    const base = createImage(path('gone.qcow2'), MiB);
    const p = createImage(path('orphan.qcow2'), MiB, [], { file: base, fmt: 'qcow2' });
    const f = readFileSync(p);
    const at = f.readBigUInt64BE(8);
    patch(p, Number(at) + f.readUInt32BE(16) - 6, Buffer.from('x.none'));
    const err = await openFails(p, { 'read-only': true });
    expect(err.message).toContain('x.none');
  });
});

describe('qcow2 open: read-only opens and locks', () => {
  it('a read-only open of every kind of cluster never writes the file', async () => {
    const p = populated('ro.qcow2', 4 * MiB, ['lazy_refcounts=on', 'cluster_size=4k']);
    run('qemu-io', ['-f', 'qcow2', '-c', 'write -z 0 8192', '-c', 'discard 200000 40000', p]);
    qemuImg(['snapshot', '-c', 's1', p]);
    const before = statSync(p);
    const sum = sha256(readFileSync(p));
    const n = await open(p, { 'read-only': true });
    expect((await readAll(n)).equals(qemuRaw(p))).toBe(true);
    const e = n.parents[0]!;
    for (let pos = 0; pos < n.length; pos += 65536) await io.blockStatus(e, pos, 65536);
    await io.flush(e);
    await close(n);
    expect(sha256(readFileSync(p))).toBe(sum);
    expect(statSync(p).mtimeMs).toBe(before.mtimeMs);
  });

  it('holds image locks: qemu-io cannot write while Spindle has the image read-write', async () => {
    const p = populated('lock.qcow2');
    const n = await open(p);
    const w = run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x11 0 512', p]);
    expect(w.status).not.toBe(0);
    expect(w.stderr + w.stdout).toMatch(/lock/);
    const ro = run('qemu-io', ['-r', '-U', '-f', 'qcow2', '-c', 'read -P 0x3c 65000 512', p]);
    expect(ro.status, ro.stderr + ro.stdout).toBe(0);
    await close(n);
    const again = run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x11 0 512', p]);
    expect(again.status, again.stderr + again.stdout).toBe(0);
  });
});
