// QMP's block-graph commands over a real UNIX socket: blockdev-add (nested and by reference,
// QEMU's argument errors), query-named-block-nodes and query-block against what qemu-img says
// about the same images, blockdev-del's refusals, and block_resize through backends and nodes.
import { statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createBackend, type BlockBackend } from '../../src/backend/backend.js';
import { findNode } from '../../src/block/graph.js';
import { registerBlockCommands } from '../../src/monitor/commands/block.js';
import { QmpMonitor } from '../../src/monitor/qmp.js';
import { serveMonitor, type QmpSession } from '../helpers/qmp.js';
import { createImage, qemuInfo, expectClean } from '../helpers/qemu.js';
import { scratchDir } from '../helpers/tmp.js';

const dir = scratchDir('spindle-qmp-block-');

type Client = QmpSession;

let client: Client;

async function open(mon: QmpMonitor): Promise<Client> {
  return serveMonitor(mon, join(dir, 'qmp.sock'));
}

beforeAll(async () => {
  const mon = new QmpMonitor({ major: 7, minor: 2, micro: 0, package: 'spindle-test' });
  registerBlockCommands(mon);
  client = await open(mon);
});
afterAll(() => {
  client.close();
});

type Info = Record<string, unknown>;
async function namedNodes(flat?: boolean): Promise<Info[]> {
  return (await client.ok('query-named-block-nodes', flat === undefined ? undefined : { flat })) as Info[];
}
async function node(name: string, flat?: boolean): Promise<Info> {
  const n = (await namedNodes(flat)).find((x) => x['node-name'] === name);
  if (!n) throw new Error(`node ${name} not listed`);
  return n;
}
/** A device stand-in that counts the resizes the backend reports. */
function attach(be: BlockBackend, id: string): { resizes: number } {
  const seen = { resizes: 0 };
  be.attachDevice({ id }, { resize: () => seen.resizes++ });
  return seen;
}
/** The ImageInfo fields both sides must agree on. */
const IMAGE_KEYS = ['virtual-size', 'format', 'filename', 'cluster-size', 'backing-filename', 'full-backing-filename', 'backing-filename-format', 'format-specific', 'dirty-flag'];
function pick(o: Info): Info {
  return Object.fromEntries(IMAGE_KEYS.filter((k) => o[k] !== undefined).map((k) => [k, o[k]]));
}

describe('blockdev-add', () => {
  it('opens a qcow2 over a nested file node, and a raw over a node-name reference', async () => {
    const q = createImage(join(dir, 'a.qcow2'), 8 << 20);
    expect(await client.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'qa', file: { driver: 'file', filename: q } })).toEqual({});
    const qa = await node('qa');
    expect(qa).toMatchObject({ drv: 'qcow2', file: q, ro: false, image: { format: 'qcow2', 'virtual-size': 8 << 20 } });
    // The nested file node is listed under its generated name.
    const fileNode = (await namedNodes()).find((n) => n['drv'] === 'file' && n['file'] === q);
    expect(fileNode?.['node-name']).toMatch(/^#block\d+$/);

    const r = join(dir, 'b.raw');
    writeFileSync(r, Buffer.alloc(1 << 20));
    await client.ok('blockdev-add', { driver: 'file', 'node-name': 'fb', filename: r });
    await client.ok('blockdev-add', { driver: 'raw', 'node-name': 'rb', file: 'fb' });
    expect(findNode('rb')?.file?.node).toBe(findNode('fb'));
    expect(await node('rb')).toMatchObject({ drv: 'raw', file: r, image: { format: 'raw', 'virtual-size': 1 << 20 } });
  });

  it("answers bad arguments with QEMU's messages, and opening errors with the block layer's", async () => {
    const r = join(dir, 'c.raw');
    writeFileSync(r, Buffer.alloc(65536));
    const before = (await namedNodes()).length;
    expect(await client.err('blockdev-add', { driver: 'vmdkx', 'node-name': 'x1' })).toEqual({ class: 'GenericError', desc: "Parameter 'driver' does not accept value 'vmdkx'" });
    expect((await client.err('blockdev-add', { driver: 'file', filename: r })).desc).toBe("'node-name' must be specified for the root node");
    expect((await client.err('blockdev-add', { driver: 'file', 'node-name': 'x2', filename: r, foo: 1 })).desc).toBe("Parameter 'foo' is unexpected");
    expect((await client.err('blockdev-add', { driver: 'raw', 'node-name': 'x3', file: { driver: 'file', filename: r, bar: true } })).desc).toBe("Parameter 'file.bar' is unexpected");
    expect((await client.err('blockdev-add', { driver: 'raw', 'node-name': 'x4', file: { driver: 'file' } })).desc).toBe("Parameter 'file.filename' is missing");
    expect((await client.err('blockdev-add', { driver: 'raw', 'node-name': 'x5' })).desc).toBe("Parameter 'file' is missing");
    expect((await client.err('blockdev-add', { driver: 'null-co', 'node-name': 'x6', size: 'big' })).desc).toBe("Invalid parameter type for 'size', expected: integer");
    expect((await client.err('blockdev-add', { driver: 'raw', 'node-name': 'x7', file: 'nosuch' })).desc).toBe("Cannot find device='nosuch' nor node-name='nosuch'");
    expect((await client.err('blockdev-add', { 'node-name': 'x8' })).desc).toBe("Parameter 'driver' is missing");
    // An option QEMU has and Spindle's driver does not: the block layer says so.
    const q = createImage(join(dir, 'c.qcow2'), 1 << 20);
    expect((await client.err('blockdev-add', { driver: 'qcow2', 'node-name': 'x10', 'lazy-refcounts': true, file: { driver: 'file', filename: q } })).desc)
      .toBe("Block driver 'qcow2' does not support the option 'lazy-refcounts'");
    const missing = await client.err('blockdev-add', { driver: 'file', 'node-name': 'x9', filename: join(dir, 'missing.img') });
    expect(missing.class).toBe('GenericError');
    expect(missing.desc).toContain('missing.img');
    expect(missing.desc).toMatch(/No such file or directory/);
    // Nothing half-made stays behind.
    expect((await namedNodes()).length).toBe(before);
    await client.ok('blockdev-add', { driver: 'null-co', 'node-name': 'dup', size: 4096 });
    expect((await client.err('blockdev-add', { driver: 'null-co', 'node-name': 'dup' })).desc).toBe("Duplicate nodes with node-name='dup'");
  });
});

describe('query-named-block-nodes', () => {
  it("describes a backing chain as qemu-img info does, nested unless flat", async () => {
    const base = createImage(join(dir, 'base.qcow2'), 4 << 20, ['cluster_size=4096']);
    // Recorded relative to the overlay, as people usually make them.
    const top = createImage(join(dir, 'top.qcow2'), 6 << 20, [], { file: 'base.qcow2', fmt: 'qcow2' });
    await client.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'top', file: { driver: 'file', filename: top } });
    const qTop = qemuInfo(top);
    const qBase = qemuInfo(base);
    expect(qTop).toMatchObject({ 'backing-filename': 'base.qcow2', 'full-backing-filename': base });

    const full = await node('top');
    const img = full['image'] as Info;
    expect(pick(img)).toEqual(pick(qTop));
    expect(pick(img['backing-image'] as Info)).toEqual(pick(qBase));
    // Same keys in the same order as qemu-img prints them.
    expect(Object.keys(img).filter((k) => k in qTop)).toEqual(Object.keys(qTop));
    expect(full).toMatchObject({ backing_file: 'base.qcow2', backing_file_depth: 1, drv: 'qcow2', encrypted: false, detect_zeroes: 'off', write_threshold: 0 });
    expect(full['cache']).toEqual({ writeback: true, direct: false, 'no-flush': false });

    const flat = await node('top', true);
    expect(pick(flat['image'] as Info)).toEqual(pick(qTop));
    expect(flat['image']).not.toHaveProperty('backing-image');
    // The backing node opened from the header is listed too, read-only, described like base.
    const b = (await namedNodes(true)).find((n) => n['drv'] === 'qcow2' && n['file'] === base)!;
    expect(b).toMatchObject({ ro: true, backing_file_depth: 0 });
    expect(b).not.toHaveProperty('backing_file');
    expect(pick(b['image'] as Info)).toEqual(pick(qBase));
  });
});

describe('query-block', () => {
  it('lists backends with and without a medium', async () => {
    await client.ok('blockdev-add', { driver: 'null-co', 'node-name': 'nq', size: 1 << 20 });
    const withMedium = createBackend({ name: 'qb0', werror: 'stop' }, findNode('nq')!);
    attach(withMedium, 'disk0');
    const empty = createBackend({ name: 'qb1' });
    const cd = createBackend({ name: 'qb2', werror: 'report' }); // no io-status: nothing can stop or report ENOSPC
    try {
      const list = (await client.ok('query-block')) as Info[];
      const a = list.find((x) => x['device'] === 'qb0')!;
      expect(a).toMatchObject({ qdev: 'disk0', type: 'unknown', removable: false, locked: false, 'io-status': 'ok' });
      expect(a).not.toHaveProperty('tray_open');
      expect(a['inserted']).toMatchObject({
        'node-name': 'nq', drv: 'null-co', ro: false, file: 'null-co://', backing_file_depth: 0, encrypted: false,
        bps: 0, bps_rd: 0, bps_wr: 0, iops: 0, iops_rd: 0, iops_wr: 0, write_threshold: 0,
        cache: { writeback: true, direct: false, 'no-flush': false },
        image: { 'virtual-size': 1 << 20, format: 'null-co', filename: 'null-co://' },
      });
      const b = list.find((x) => x['device'] === 'qb1')!;
      expect(b).toEqual({ device: 'qb1', type: 'unknown', removable: true, locked: false });
      // A device with a tray: removable, and its tray and lock reported.
      cd.attachDevice({ id: 'cd0' }, { changeMedia: () => {}, isTrayOpen: () => true, isMediumLocked: () => true });
      const c = ((await client.ok('query-block')) as Info[]).find((x) => x['device'] === 'qb2')!;
      expect(c).toEqual({ device: 'qb2', qdev: 'cd0', type: 'unknown', removable: true, locked: true, tray_open: true });
    } finally {
      empty.unref();
    }
  });
});

describe('blockdev-del', () => {
  it('refuses nodes in use or not its own, and deletes once nothing uses the node', async () => {
    const img = createImage(join(dir, 'del.qcow2'), 1 << 20);
    await client.ok('blockdev-add', { driver: 'file', 'node-name': 'df', filename: img });
    await client.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'dq', file: 'df' });
    const be = createBackend({ name: 'delbe' }, findNode('dq')!);
    expect(await client.err('blockdev-del', { 'node-name': 'dq' })).toEqual({ class: 'GenericError', desc: 'Node dq is in use' });
    expect((await client.err('blockdev-del', { 'node-name': 'df' })).desc).toBe('Block device df is in use');
    // The backing node of 'top' was opened from its header, not by blockdev-add.
    const base = (await namedNodes(true)).find((n) => n['file'] === join(dir, 'base.qcow2'))!['node-name'] as string;
    expect((await client.err('blockdev-del', { 'node-name': base })).desc).toBe(`Node '${base}' is busy: node is used as backing hd of 'top'`);
    const auto = (await namedNodes(true)).find((n) => n['drv'] === 'file' && n['file'] === join(dir, 'a.qcow2'))!['node-name'] as string;
    expect((await client.err('blockdev-del', { 'node-name': auto })).desc).toBe(`Node ${auto} is not owned by the monitor`);
    expect((await client.err('blockdev-del', { 'node-name': 'nosuch' })).desc).toBe("Failed to find node with node-name='nosuch'");

    be.unref();
    expect(await client.ok('blockdev-del', { 'node-name': 'dq' })).toEqual({});
    expect(findNode('dq')).toBeUndefined();
    expect(await client.ok('blockdev-del', { 'node-name': 'df' })).toEqual({});
    expect((await namedNodes()).some((n) => n['file'] === img)).toBe(false);
    expectClean(img);
  });
});

describe('block_resize', () => {
  it('grows a raw file through its backend, and the device hears of it', async () => {
    const r = join(dir, 'grow.raw');
    writeFileSync(r, Buffer.alloc(1 << 20));
    await client.ok('blockdev-add', { driver: 'raw', 'node-name': 'gr', file: { driver: 'file', filename: r } });
    const be = createBackend({ name: 'growbe' }, findNode('gr')!);
    const dev = attach(be, 'growdev');
    expect(await client.ok('block_resize', { device: 'growbe', size: 3 << 20 })).toEqual({});
    expect(statSync(r).size).toBe(3 << 20);
    expect(dev.resizes).toBeGreaterThan(0);
    const seen = dev.resizes;
    // By node name, the node a backend holds: the same way through the backend.
    await client.ok('block_resize', { 'node-name': 'gr', size: 5 << 20 });
    expect(statSync(r).size).toBe(5 << 20);
    expect(dev.resizes).toBeGreaterThan(seen);
    const list = (await client.ok('query-block')) as Info[];
    expect((list.find((x) => x['device'] === 'growbe')!['inserted'] as Info)['image']).toMatchObject({ 'virtual-size': 5 << 20 });
  });

  it('grows a qcow2 node that no backend holds (qemu-img agrees)', async () => {
    const q = createImage(join(dir, 'grow.qcow2'), 1 << 20);
    await client.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'gq', file: { driver: 'file', filename: q } });
    await client.ok('block_resize', { 'node-name': 'gq', size: 64 << 20 });
    expect(qemuInfo(q)['virtual-size']).toBe(64 << 20);
    expect(((await node('gq'))['image'] as Info)['virtual-size']).toBe(64 << 20);
    await client.ok('blockdev-del', { 'node-name': 'gq' });
    expectClean(q);
  });

  it("refuses a read-only node and bad targets with QEMU's messages", async () => {
    const r = join(dir, 'ro.raw');
    writeFileSync(r, Buffer.alloc(65536));
    await client.ok('blockdev-add', { driver: 'raw', 'node-name': 'ror', 'read-only': true, file: { driver: 'file', filename: r } });
    expect(await client.err('block_resize', { 'node-name': 'ror', size: 1 << 20 })).toEqual({ class: 'GenericError', desc: 'Image is read-only' });
    expect(statSync(r).size).toBe(65536);
    expect((await client.err('block_resize', { 'node-name': 'ror', size: -1 })).desc).toBe("Parameter 'size' expects a >0 size");
    expect((await client.err('block_resize', { device: 'nope', size: 4096 })).desc).toBe("Cannot find device='nope' nor node-name=''");
    const empty = createBackend({ name: 'emptybe' });
    expect((await client.err('block_resize', { device: 'emptybe', size: 4096 })).desc).toBe("Device 'emptybe' has no medium");
    empty.unref();
    expect((await client.err('block_resize', { size: 4096 })).desc).toBe("Cannot find device='' nor node-name=''");
  });
});
