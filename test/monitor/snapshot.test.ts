// External snapshots over a real QMP socket: blockdev-snapshot-sync creates a qcow2 overlay
// naming the old top as its backing file and swaps it in under a backend a device is writing
// through; blockdev-snapshot does the same with a node the user opened. QEMU reads the result.
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { createBackend, type BlockBackend } from '../../src/backend/backend.js';
import type { BackendIO } from '../../src/backend/io.js';
import { findNode, openNode, settleCloses, unref } from '../../src/block/graph.js';
import { registerSnapshotCommands } from '../../src/monitor/commands/snapshot.js';
import { QmpMonitor } from '../../src/monitor/qmp.js';
import { serveMonitor, type QmpSession } from '../helpers/qmp.js';
import { createImage, qemuCheck, qemuImg, qemuIo, qemuRaw } from '../helpers/qemu.js';
import { scratchDir } from '../helpers/tmp.js';

const dir = scratchDir('spindle-snap-');
const path = (n: string): string => join(dir, n);

async function monitorOn(name: string): Promise<{ qmp: QmpSession; close: () => void }> {
  const mon = new QmpMonitor({ major: 0, minor: 1, micro: 0, package: 'test' });
  registerSnapshotCommands(mon);
  const qmp = await serveMonitor(mon, path(name));
  return { qmp, close: qmp.close };
}

function write(io: BackendIO, offset: number, byte: number, len: number): Promise<void> {
  const b = Buffer.alloc(len, byte);
  return new Promise((r, j) => io.writev(offset, len, [b], 0, (e) => (e ? j(e) : r())));
}

const opened: BlockBackend[] = [];
afterAll(async () => {
  for (const be of opened) if (!be.dead) be.unref();
  await settleCloses();
});

describe('external snapshots', () => {
  it('blockdev-snapshot-sync swaps a new overlay in under a device that keeps writing', async () => {
    createImage(path('base.qcow2'), '4M');
    qemuIo(path('base.qcow2'), ['write -P 0x11 0 64k']);
    const node = await openNode({ driver: 'qcow2', 'node-name': 'snap-base', file: { driver: 'file', filename: path('base.qcow2') } });
    const be = createBackend({ name: 'snap-disk' }, node);
    unref(node);
    opened.push(be);
    const dev = { id: 'snap-dev' };
    const io = be.attachDevice(dev);
    await write(io, 64 << 10, 0x22, 64 << 10); // before the snapshot: lands in base
    const { qmp, close } = await monitorOn('a.sock');
    try {
      expect(await qmp.run('blockdev-snapshot-sync', { device: 'nope', 'snapshot-file': path('x.qcow2') })).toEqual({
        error: { class: 'GenericError', desc: "Cannot find device='nope' nor node-name=''" },
      });
      expect(await qmp.run('blockdev-snapshot-sync', { device: 'snap-disk', 'snapshot-file': path('s1.qcow2'), 'snapshot-node-name': 'snap-s1' })).toEqual({ return: {} });
      expect(be.node?.name).toBe('snap-s1');
      expect(findNode('snap-s1')!.backing?.node.name).toBe('snap-base');
      await write(io, 0, 0x33, 4096); // after: lands in the overlay only
      expect(await qmp.run('blockdev-snapshot-sync', { 'node-name': 'snap-s1', 'snapshot-file': path('s1.qcow2'), 'snapshot-node-name': 'snap-s1' })).toEqual({
        error: { class: 'GenericError', desc: "Node name 'snap-s1' is already in use" },
      });
    } finally {
      close();
      be.detachDevice(dev);
    }
    be.unref();
    await settleCloses();
    // QEMU's view: the overlay names the base, holds only the new write, and is consistent.
    const info = JSON.parse(qemuImg(['info', '--output=json', path('s1.qcow2')])) as Record<string, unknown>;
    expect(info['backing-filename']).toBe(path('base.qcow2'));
    expect(info['backing-filename-format']).toBe('qcow2');
    expect(info['virtual-size']).toBe(4 << 20);
    expect(qemuCheck(path('s1.qcow2')).status).toBe(0);
    const top = qemuRaw(path('s1.qcow2'));
    expect(top.subarray(0, 4096).every((x) => x === 0x33)).toBe(true);
    expect(top.subarray(4096, 64 << 10).every((x) => x === 0x11)).toBe(true);
    expect(top.subarray(64 << 10, 128 << 10).every((x) => x === 0x22)).toBe(true);
    const base = qemuRaw(path('base.qcow2'));
    expect(base.subarray(0, 4096).every((x) => x === 0x11)).toBe(true); // the base never saw 0x33
  });

  it('blockdev-snapshot puts a user-opened overlay on top, and refuses one that is in use or has a backing file', async () => {
    createImage(path('b2.qcow2'), '1M');
    createImage(path('o2.qcow2'), '1M');
    const base = await openNode({ driver: 'qcow2', 'node-name': 'snap-b2', file: { driver: 'file', filename: path('b2.qcow2') } });
    const be = createBackend({ name: 'snap-disk2' }, base);
    unref(base);
    opened.push(be);
    const overlay = await openNode({ driver: 'qcow2', 'node-name': 'snap-o2', file: { driver: 'file', filename: path('o2.qcow2') }, backing: null });
    const { qmp, close } = await monitorOn('b.sock');
    try {
      expect(await qmp.run('blockdev-snapshot', { node: 'snap-b2', overlay: 'nope' })).toEqual({ error: { class: 'GenericError', desc: "Cannot find device='' nor node-name='nope'" } });
      expect(await qmp.run('blockdev-snapshot', { node: 'snap-b2', overlay: 'snap-o2' })).toEqual({ return: {} });
      expect(be.node).toBe(overlay);
      expect(await qmp.run('blockdev-snapshot', { node: 'snap-b2', overlay: 'snap-o2' })).toEqual({ error: { class: 'GenericError', desc: 'The overlay already has a backing image' } });
      const third = await openNode({ driver: 'null-co', 'node-name': 'snap-null', size: 1 << 20 });
      expect((await qmp.run('blockdev-snapshot', { node: 'snap-o2', overlay: 'snap-null' }))['error']).toMatchObject({ desc: 'The overlay does not support backing images' });
      unref(third);
    } finally {
      close();
    }
    unref(overlay);
  });
});
