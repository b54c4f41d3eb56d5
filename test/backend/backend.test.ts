// Seeds 000/003: devices see only a BlockBackend. Scenarios (b) drive_del and (f) media change,
// plus names, error policy, write cache and resize.
import { writeFileSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { createBackend, driveDel, findBackend } from '../../src/backend/backend.js';
import { onBlockEvent, type BlockEvent } from '../../src/backend/events.js';
import type { DeviceOps } from '../../src/backend/device-ops.js';
import { openNode, settleCloses, unref } from '../../src/block/graph.js';
import type { BlockError } from '../../src/block/error.js';
import { pattern, scratchDir } from '../helpers/tmp.js';

const dir = scratchDir();
let n = 0;
async function rawImage(fill: number, size = 1 << 20) {
  const path = join(dir, `img${n++}.img`);
  writeFileSync(path, Buffer.alloc(size, fill));
  const node = await openNode({ driver: 'raw', file: { driver: 'file', filename: path } });
  return { path, node };
}
function recordingOps(log: string[]): DeviceOps {
  return {
    changeMedia: (load) => log.push(`changeMedia(${load})`),
    resize: () => log.push('resize'),
    drainedBegin: () => log.push('drainedBegin'),
    drainedEnd: () => log.push('drainedEnd'),
  };
}
const events: BlockEvent[] = [];
onBlockEvent((e) => events.push(e));
afterEach(() => void (events.length = 0));

describe('backend names', () => {
  it('enforces QEMU id syntax and uniqueness with clear errors', async () => {
    const b = createBackend({ name: 'nm0' });
    expect(() => createBackend({ name: 'nm0' })).toThrow("Device with id 'nm0' already exists");
    expect(() => createBackend({ name: '0nm' })).toThrow(/must start with a letter/);
    expect(() => createBackend({ name: 'a b' })).toThrow(/Invalid block device name/);
    const node = await openNode({ driver: 'null-co', 'node-name': 'nmnode' });
    expect(() => createBackend({ name: 'nmnode' })).toThrow(/conflicts with an existing node name/);
    await expect(openNode({ driver: 'null-co', 'node-name': 'nm0' })).rejects.toThrow(/conflicting with a device id/);
    expect(findBackend('nm0')).toBe(b);
    b.unref();
    expect(findBackend('nm0')).toBeUndefined();
    unref(node);
  });
});

describe('drive_del while a device holds the backend (seed 000, contract 1)', () => {
  it('revokes the medium, frees the name at once, and frees only the old backend on unplug', async () => {
    const { node } = await rawImage(0x11);
    const old = createBackend({ name: 'drive0' }, node);
    unref(node);
    const log: string[] = [];
    const oldDev = { id: 'disk-old' };
    const io = old.attachDevice(oldDev, recordingOps(log));
    await io.write(0, Buffer.alloc(512, 0x22));

    await driveDel(old);
    expect(findBackend('drive0')).toBeUndefined();
    expect(old.dead).toBe(false); // the device still holds it
    expect(node.deleted).toBe(true); // the medium is gone
    expect(log).toContain('changeMedia(false)');
    const err = await io.read(0, Buffer.alloc(512)).catch((e: BlockError) => e);
    expect((err as BlockError).code).toBe('ENOMEDIUM');
    expect(io.isInserted()).toBe(false);

    // The name is free for a new backend at once.
    const { node: node2 } = await rawImage(0x33);
    const fresh = createBackend({ name: 'drive0' }, node2);
    unref(node2);
    const newDev = { id: 'disk-new' };
    const io2 = fresh.attachDevice(newDev, {});

    // Unplugging the old device frees the old backend, never the new one.
    old.detachDevice(oldDev);
    expect(old.dead).toBe(true);
    expect(fresh.dead).toBe(false);
    expect(findBackend('drive0')).toBe(fresh);
    const buf = Buffer.alloc(512);
    await io2.read(0, buf);
    expect(buf.every((x) => x === 0x33)).toBe(true);
    // The old handle stays dead.
    expect(((await io.read(0, buf).catch((e: BlockError) => e)) as BlockError).code).toBe('ENOMEDIUM');
    fresh.detachDevice(newDev);
    fresh.unref();
    expect(fresh.dead).toBe(true);
    expect(node2.deleted).toBe(true);
  });

  it('drive_del of a backend no device holds frees it at once', async () => {
    const { node } = await rawImage(0);
    const b = createBackend({ name: 'lonely' }, node);
    unref(node);
    await driveDel(b);
    expect(b.dead).toBe(true);
    expect(node.deleted).toBe(true);
    await expect(driveDel(b)).rejects.toThrow("Device 'lonely' not found");
  });
});

describe('media change (seed 003)', () => {
  it('keeps the device on its backend and calls changeMedia(false) then (true)', async () => {
    const a = await rawImage(0xa1);
    const b = await rawImage(0xb2);
    const be = createBackend({ name: 'cd0' }, a.node);
    unref(a.node);
    const log: string[] = [];
    const io = be.attachDevice({ id: 'ide-cd0' }, recordingOps(log));
    const buf = Buffer.alloc(512);
    await io.read(0, buf);
    expect(buf[0]).toBe(0xa1);
    await be.removeNode();
    expect(a.node.deleted).toBe(true);
    expect(((await io.read(0, buf).catch((e: BlockError) => e)) as BlockError).code).toBe('ENOMEDIUM');
    be.insertNode(b.node);
    unref(b.node);
    await io.read(0, buf);
    expect(buf[0]).toBe(0xb2);
    expect(log.filter((l) => l.startsWith('changeMedia'))).toEqual(['changeMedia(false)', 'changeMedia(true)']);
    expect(() => be.insertNode(b.node)).toThrow(/already has a medium/);
    be.detachDevice(be.device!);
    be.unref();
    await settleCloses();
  });
});

describe('error policy and iostatus', () => {
  async function faulty(werror: 'stop' | 'report' | 'ignore' | 'enospc', errno: number, once: boolean) {
    const { path, node: raw } = await rawImage(0, 65536);
    unref(raw);
    const node = await openNode({
      driver: 'blkdebug',
      'inject-error': [{ event: 'write_aio', errno, once }],
      image: { driver: 'raw', file: { driver: 'file', filename: path } },
    });
    const be = createBackend({ name: `pol${n++}`, werror }, node);
    unref(node);
    return { path, be, io: be.attachDevice({ id: `d${n}` }, {}) };
  }

  it('werror=stop keeps the request, reports BLOCK_IO_ERROR, and resume retries it', async () => {
    const { path, be, io } = await faulty('stop', 5, true);
    let done: BlockError | null | undefined;
    io.writev(0, 512, [Buffer.alloc(512, 0x5a)], 0, (e) => (done = e));
    await new Promise<void>((r) => onBlockEvent((e) => e.event === 'BACKEND_STOPPED' && r()));
    expect(done).toBeUndefined();
    expect(be.stopped).toHaveLength(1);
    expect(io.iostatus()).toBe('failed');
    expect(events.find((e) => e.event === 'BLOCK_IO_ERROR')).toMatchObject({ operation: 'write', action: 'stop', nospace: false });
    be.resume();
    await be.idle();
    expect(done).toBeNull();
    expect(io.iostatus()).toBe('ok');
    expect(readFileSync(path)[0]).toBe(0x5a);
    be.detachDevice(be.device!);
    be.unref();
  });

  it('werror=report fails the request; ignore completes it; enospc reports EIO', async () => {
    for (const [policy, expectCode] of [['report', 'EIO'], ['ignore', null], ['enospc', 'EIO']] as const) {
      const { be, io } = await faulty(policy, 5, false);
      const err = await io.write(0, Buffer.alloc(512)).then(() => null, (e: BlockError) => e.code);
      expect(err).toBe(expectCode);
      expect(be.stopped).toHaveLength(0);
      expect(io.iostatus()).toBe(policy === 'ignore' ? 'ok' : 'failed');
      be.detachDevice(be.device!);
      be.unref();
    }
  });

  it('werror=enospc stops on ENOSPC with iostatus nospace', async () => {
    const { be, io } = await faulty('enospc', 28, true);
    io.writev(0, 512, [Buffer.alloc(512)], 0, () => undefined);
    await new Promise<void>((r) => onBlockEvent((e) => e.event === 'BACKEND_STOPPED' && r()));
    expect(io.iostatus()).toBe('nospace');
    be.resume();
    await be.idle();
    be.detachDevice(be.device!);
    be.unref();
  });
});

describe('request range', () => {
  it('a device on a growable file node cannot grow it by writing past the end', async () => {
    const path = join(dir, 'grow.img');
    writeFileSync(path, Buffer.alloc(8192));
    const node = await openNode({ driver: 'file', filename: path });
    const be = createBackend({ name: 'rg0' }, node);
    unref(node);
    const io = be.attachDevice({ id: 'rgdev' }, {});
    const err = (await io.write(8192, Buffer.alloc(512, 1)).catch((e: BlockError) => e)) as BlockError;
    expect(err.code).toBe('EINVAL');
    expect(err.message).toMatch(/past the end of the 8192-byte medium/);
    expect(readFileSync(path).length).toBe(8192);
    await io.write(7680, Buffer.alloc(512, 1));
    be.detachDevice(be.device!);
    be.unref();
  });
});

describe('write cache and resize', () => {
  it('with the write cache off every write is flushed before it completes', async () => {
    const { node } = await rawImage(0);
    const be = createBackend({ name: 'wc0' }, node);
    unref(node);
    const io = be.attachDevice({ id: 'wcdev' }, {});
    const fileNode = node.file!.node;
    await io.write(0, pattern(4096, 1));
    expect(fileNode.stats.flushOps).toBe(0);
    io.setWriteCache(false);
    await io.write(4096, pattern(4096, 2));
    expect(fileNode.stats.flushOps).toBe(1);
    be.detachDevice(be.device!);
    be.unref();
  });

  it('a resize reaches the device through DeviceOps.resize', async () => {
    const { path, node } = await rawImage(0, 65536);
    const be = createBackend({ name: 'rs0' }, node);
    unref(node);
    const log: string[] = [];
    const io = be.attachDevice({ id: 'rsdev' }, recordingOps(log));
    await be.truncate(131072);
    expect(io.getLength()).toBe(131072);
    expect(readFileSync(path).length).toBe(131072);
    expect(log).toContain('resize');
    be.detachDevice(be.device!);
    be.unref();
  });
});
