// qcow2 metadata write-back: allocations change refcounts and L2 tables in memory, and they
// reach the file on a flush, a close, a FUA write, a switch to read-only, or (for a backend
// without a write cache) after every write. A copy of the file taken while the image is
// still open shows what a crash at that moment would leave.
import { copyFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { createBackend } from '../../src/backend/backend.js';
import { blkdebugWrites } from '../../src/block/drivers/blkdebug.js';
import { attachRoot, detachRoot, openNode, settleCloses, unref } from '../../src/block/graph.js';
import * as io from '../../src/block/io.js';
import type { BlockNode } from '../../src/block/node.js';
import { reopen } from '../../src/block/reopen.js';
import { Perm, ReqFlags } from '../../src/block/types.js';
import { createImage, expectClean, expectEqual, qemuCheck, qemuRaw } from '../helpers/qemu.js';
import { pattern, scratchDir } from '../helpers/tmp.js';

const dir = scratchDir('spindle-qcow2-wb-');
const MiB = 1 << 20;
const CS = 65536;
let seq = 0;
const path = (name: string): string => join(dir, `${seq++}-${name}`);
const user = { describeUser: () => 'test', parentKind: 'backend' as const };

const open: BlockNode[] = [];
async function openImage(file: string, extra: Record<string, unknown> = {}): Promise<BlockNode> {
  const node = await openNode({ driver: 'qcow2', file: { driver: 'blkdebug', image: { driver: 'file', filename: file } }, ...extra });
  open.push(node);
  return node;
}
function close(node: BlockNode): Promise<void> {
  open.splice(open.indexOf(node), 1);
  unref(node);
  return settleCloses();
}
afterEach(async () => {
  for (const n of [...open]) await close(n);
});

/** What a crash now would leave: a copy of the file, as qemu reads it. */
function crashCopy(file: string): { raw: Buffer; check: number } {
  const copy = `${file}.crash`;
  copyFileSync(file, copy);
  return { raw: qemuRaw(copy), check: qemuCheck(copy).status ?? -1 };
}

describe('qcow2 metadata write-back', () => {
  it('allocating writes cost one file write each until a flush writes their metadata once', async () => {
    const file = path('batch.qcow2');
    createImage(file, 8 * MiB);
    const node = await openImage(file);
    const edge = attachRoot(user, node, 'root', { perm: Perm.CONSISTENT_READ | Perm.WRITE, shared: Perm.ALL });
    const model = Buffer.alloc(8 * MiB);
    const before = blkdebugWrites(node.file!.node);
    for (let c = 0; c < 32; c++) {
      const data = pattern(CS, c);
      await io.write(edge, c * CS * 3, data); // 32 clusters, one L2 table, one refcount block
      data.copy(model, c * CS * 3);
    }
    // The data, and the new L2 table: its refcount, the table, then the L1 entry that links it.
    expect(blkdebugWrites(node.file!.node) - before, 'file writes for 32 allocations').toBe(32 + 3);
    const early = crashCopy(file);
    expect(early.check, 'a crash before the flush leaks at most').not.toBe(2);
    await io.flush(edge);
    // The refcount block, then the L2 table: one write each.
    expect(blkdebugWrites(node.file!.node) - before, 'file writes after the flush').toBe(32 + 3 + 2);
    const late = crashCopy(file);
    expect(late.check).toBe(0);
    expectEqual(late.raw, model, 'a crash after the flush');
    detachRoot(edge);
  });

  it('a close without a flush writes the metadata back before the file closes', async () => {
    const file = path('close.qcow2');
    createImage(file, 4 * MiB);
    const node = await openImage(file);
    const be = createBackend({}, node);
    const blk = be.attachDevice({ id: 'd0' }, {});
    const data = pattern(3 * CS + 777, 5);
    await blk.write(CS + 100, data);
    be.detachDevice(be.device!);
    be.unref();
    await close(node);
    expectClean(file);
    const want = Buffer.alloc(4 * MiB);
    data.copy(want, CS + 100);
    expectEqual(qemuRaw(file), want, 'after the close');
  });

  it('a FUA write, and every write of a backend without a write cache, is on disk when it completes', async () => {
    const file = path('fua.qcow2');
    createImage(file, 4 * MiB);
    const node = await openImage(file);
    const edge = attachRoot(user, node, 'root', { perm: Perm.CONSISTENT_READ | Perm.WRITE, shared: Perm.ALL });
    const want = Buffer.alloc(4 * MiB);
    const a = pattern(5000, 1);
    await io.write(edge, 3 * CS - 10, a, ReqFlags.FUA);
    a.copy(want, 3 * CS - 10);
    let now = crashCopy(file);
    expect(now.check).toBe(0);
    expectEqual(now.raw, want, 'after the FUA write');
    detachRoot(edge);

    const be = createBackend({ writeCache: false }, node);
    const blk = be.attachDevice({ id: 'd1' }, {});
    const b = pattern(CS, 2);
    await blk.write(2 * MiB, b);
    b.copy(want, 2 * MiB);
    now = crashCopy(file);
    expect(now.check).toBe(0);
    expectEqual(now.raw, want, 'after a write with the write cache off');
    be.detachDevice(be.device!);
    be.unref();
  });

  it('switching to read-only writes back first', async () => {
    const file = path('ro.qcow2');
    createImage(file, 4 * MiB);
    const node = await openImage(file);
    const edge = attachRoot(user, node, 'root', { perm: Perm.CONSISTENT_READ | Perm.WRITE, shared: Perm.ALL });
    const data = pattern(2 * CS, 9);
    await io.write(edge, MiB, data);
    detachRoot(edge);
    await reopen(node, { 'read-only': true });
    expect(node.readOnly).toBe(true);
    const now = crashCopy(file);
    expect(now.check).toBe(0);
    const want = Buffer.alloc(4 * MiB);
    data.copy(want, MiB);
    expectEqual(now.raw, want, 'after the switch to read-only');
  });
});
