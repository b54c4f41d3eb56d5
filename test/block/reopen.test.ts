// Reopen as prepare/commit/abort over every node it affects.
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { createBackend } from '../../src/backend/backend.js';
import type { BlockError } from '../../src/block/error.js';
import { openNode, unref } from '../../src/block/graph.js';
import { reopen, reopenMultiple } from '../../src/block/reopen.js';
import { Perm } from '../../src/block/types.js';
import { scratchDir } from '../helpers/tmp.js';

const dir = scratchDir();

async function roImage(name: string) {
  const path = join(dir, `${name}.img`);
  writeFileSync(path, Buffer.alloc(65536));
  const node = await openNode({ driver: 'raw', 'node-name': name, 'read-only': true, file: { driver: 'file', filename: path } });
  return { path, node };
}

describe('reopen', () => {
  it('read-only to read-write reaches the file, and writes then work', async () => {
    const { path, node } = await roImage('ro2rw');
    expect(node.file!.node.readOnly).toBe(true);
    const reader = createBackend({ perm: Perm.CONSISTENT_READ, shared: Perm.ALL }, node);
    const io = reader.attachDevice({ id: 'r' }, {});
    const err = (await io.write(0, Buffer.alloc(512, 1)).catch((e: BlockError) => e)) as BlockError;
    expect(err.code).toBe('EPERM');
    await reopen(node, { 'read-only': false });
    expect(node.readOnly).toBe(false);
    expect(node.file!.node.readOnly).toBe(false);
    // Now a writer fits, and its writes reach the file (the fd was reopened O_RDWR).
    reader.detachDevice(reader.device!);
    reader.unref();
    const writer = createBackend({}, node);
    await writer.attachDevice({ id: 'w' }, {}).write(512, Buffer.alloc(512, 0x77));
    expect(readFileSync(path)[512]).toBe(0x77);
    writer.detachDevice(writer.device!);
    writer.unref();
    unref(node);
  });

  it('read-write to read-only is refused while someone writes, and nothing changes', async () => {
    const { node } = await roImage('rw2ro');
    await reopen(node, { 'read-only': false });
    const writer = createBackend({ name: 'rwWriter' }, node);
    const io = writer.attachDevice({ id: 'w' }, {});
    await expect(reopen(node, { 'read-only': true })).rejects.toThrow(/read-only, but device 'w' \(block device 'rwWriter'\).*wants 'write'/);
    expect(node.readOnly).toBe(false);
    expect(node.file!.node.readOnly).toBe(false);
    await io.write(0, Buffer.alloc(512, 3));
    writer.detachDevice(writer.device!);
    writer.unref();
    // With the writer gone the same reopen succeeds.
    await reopen(node, { 'read-only': true });
    expect(node.file!.node.readOnly).toBe(true);
    unref(node);
  });

  it('a failing prepare aborts every node of the queue', async () => {
    const a = await roImage('qa');
    const b = await roImage('qb');
    // Remove b's file so its prepare (reopen O_RDWR) fails after a's succeeded.
    const bPath = join(dir, 'qb.img');
    const fs = await import('node:fs');
    fs.chmodSync(bPath, 0o444);
    const asRoot = process.getuid?.() === 0;
    if (asRoot) fs.unlinkSync(bPath); // root ignores modes: make the path vanish instead
    await expect(reopenMultiple([
      { node: a.node, options: { 'read-only': false } },
      { node: b.node, options: { 'read-only': false } },
    ])).rejects.toThrow(/Could not open/);
    expect(a.node.readOnly).toBe(true);
    expect(a.node.file!.node.readOnly).toBe(true);
    expect(b.node.readOnly).toBe(true);
    unref(a.node);
    unref(b.node);
  });

  it('changes detect-zeroes and refuses options that need a new node', async () => {
    const { node } = await roImage('dz');
    await reopen(node, { 'detect-zeroes': 'on' });
    expect(node.detectZeroes).toBe('on');
    await expect(reopen(node, { driver: 'null-co' })).rejects.toThrow(/Cannot change the option 'driver'/);
    unref(node);
  });
});
