// block_set_io_throttle and query-blockstats over a real UNIX socket: QEMU's argument names
// and messages (checked against QEMU 7.2), limits that take effect on a device's I/O, and
// counters after real I/O through a device's BackendIO.
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { createBackend } from '../../src/backend/backend.js';
import { setThrottleClock, type ThrottleClock } from '../../src/backend/throttle.js';
import { openNode, unref } from '../../src/block/graph.js';
import { registerThrottleCommands, throttleLimits } from '../../src/monitor/commands/throttle.js';
import { QmpMonitor } from '../../src/monitor/qmp.js';
import { serveMonitor, type QmpSession } from '../helpers/qmp.js';

const dir = mkdtempSync(join(tmpdir(), 'spindle-thr-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

type Reply = Record<string, unknown>;
async function client(name: string): Promise<QmpSession> {
  const mon = new QmpMonitor({ major: 0, minor: 1, micro: 0, package: 'spindle-test' });
  registerThrottleCommands(mon);
  return serveMonitor(mon, join(dir, name));
}

const ZERO = { bps: 0, bps_rd: 0, bps_wr: 0, iops: 0, iops_rd: 0, iops_wr: 0 };
const err = (desc: string, cls = 'GenericError'): Reply => ({ error: { class: cls, desc } });

describe('block_set_io_throttle', () => {
  it("refuses what QEMU refuses, with QEMU's messages", async () => {
    const node = await openNode({ driver: 'null-co', size: 1 << 20 });
    const be = createBackend({ name: 'thrq0' }, node);
    unref(node);
    const empty = createBackend({ name: 'thrq-empty' });
    const c = await client('a.sock');
    const set = (a: Record<string, unknown>): Promise<Reply> => c.run('block_set_io_throttle', { device: 'thrq0', ...ZERO, ...a });
    expect(await c.run('block_set_io_throttle', { device: 'thrq0', bps: 1 })).toEqual(err("Parameter 'bps_rd' is missing"));
    expect(await set({ bps: 1, bps_rd: 1 })).toEqual(err('bps/iops/max total values and read/write values cannot be used at the same time'));
    expect(await set({ iops: 1, iops_wr: 1 })).toEqual(err('bps/iops/max total values and read/write values cannot be used at the same time'));
    expect(await set({ bps: -1 })).toEqual(err('bps/iops/max values must be within [0, 1000000000000000]'));
    expect(await set({ bps: 10, bps_max: 5 })).toEqual(err('bps_max/iops_max cannot be lower than bps/iops'));
    expect(await set({ bps_max: 5 })).toEqual(err('bps_max/iops_max require corresponding bps/iops values'));
    expect(await set({ bps: 10, bps_max_length: 2 })).toEqual(err('burst length set without burst rate'));
    expect(await set({ bps: 10, bps_max: 20, bps_max_length: 0 })).toEqual(err('the burst length cannot be 0'));
    expect(await set({ bps: 10, bps_max: 20, bps_max_length: -1 })).toEqual(err('burst length too high for this burst rate'));
    expect(await set({ bps: 10, iops_size: 512 })).toEqual(err('iops size requires an iops value to be set'));
    expect(await c.run('block_set_io_throttle', { device: 'nope', ...ZERO, bps: 10 })).toEqual(err("Device 'nope' not found", 'DeviceNotFound'));
    expect(await c.run('block_set_io_throttle', { id: 'nodev', ...ZERO, bps: 10 })).toEqual(err("Device 'nodev' not found", 'DeviceNotFound'));
    expect(await c.run('block_set_io_throttle', { ...ZERO, bps: 10 })).toEqual(err("Need exactly one of 'device' and 'id'"));
    expect(await c.run('block_set_io_throttle', { device: 'thrq-empty', ...ZERO, bps: 10 })).toEqual(err('Device has no medium'));
    expect(be.throttle).toBeNull();
    expect(throttleLimits(be)).toEqual(ZERO);
    c.close();
    be.unref();
    empty.unref();
  });

  it('sets limits and groups, by device name or device id, and all zero removes them', async () => {
    const mk = async (name: string) => {
      const node = await openNode({ driver: 'null-co', size: 1 << 20 });
      const be = createBackend({ name }, node);
      unref(node);
      return be;
    };
    const a = await mk('thrq1');
    const b = await mk('thrq2');
    const dev = { id: 'disk-b' };
    b.attachDevice(dev);
    const c = await client('b.sock');
    expect(await c.run('block_set_io_throttle', { device: 'thrq1', ...ZERO, iops: 100, iops_max: 200, iops_size: 4096 })).toEqual({ return: {} });
    expect(throttleLimits(a)).toEqual({ ...ZERO, iops: 100, iops_max: 200, iops_max_length: 1, iops_size: 4096, group: 'thrq1' });
    // By id, without a group: QEMU names the group after the argument given.
    expect(await c.run('block_set_io_throttle', { id: 'disk-b', ...ZERO, bps_rd: 1000 })).toEqual({ return: {} });
    expect(throttleLimits(b)).toEqual({ ...ZERO, bps_rd: 1000, group: 'disk-b' });
    // Moving b into a's group gives the group b's limits: both see them.
    expect(await c.run('block_set_io_throttle', { device: 'thrq2', ...ZERO, iops: 50, group: 'thrq1' })).toEqual({ return: {} });
    expect(b.throttle!.group).toBe(a.throttle!.group);
    expect(throttleLimits(a)).toEqual({ ...ZERO, iops: 50, group: 'thrq1' });
    expect(await c.run('block_set_io_throttle', { device: 'thrq2', ...ZERO })).toEqual({ return: {} });
    expect(b.throttle).toBeNull();
    expect(throttleLimits(b)).toEqual(ZERO);
    expect(throttleLimits(a)['group']).toBe('thrq1');
    expect(await c.run('block_set_io_throttle', { device: 'thrq1', ...ZERO })).toEqual({ return: {} });
    expect(a.throttle).toBeNull();
    c.close();
    b.detachDevice(dev);
    a.unref();
    b.unref();
  });
});

describe('limits set over QMP apply to the device', () => {
  it('iops=10 queues a device\'s requests until a (virtual) timer lets them go', async () => {
    const timers: { at: number; fn: () => void }[] = [];
    let t = 5e9;
    const vclock: ThrottleClock = {
      now: () => t,
      schedule: (fn, ns) => { const h = { at: t + ns, fn }; timers.push(h); return h; },
      cancel: (h) => void timers.splice(timers.indexOf(h as never), 1),
    };
    const prev = setThrottleClock(vclock);
    try {
      const node = await openNode({ driver: 'null-co', size: 1 << 20 });
      const be = createBackend({ name: 'thrq-io' }, node);
      unref(node);
      const dev = { id: 'io-disk' };
      const io = be.attachDevice(dev);
      const c = await client('e.sock');
      expect(await c.run('block_set_io_throttle', { id: 'io-disk', ...ZERO, iops: 10 })).toEqual({ return: {} });
      let done = 0;
      for (let i = 0; i < 5; i++) io.readv(i * 512, 512, [new Uint8Array(512)], 0, () => void done++);
      await new Promise<void>((r) => setImmediate(r));
      expect(done).toBe(2);
      expect(timers.length).toBe(1);
      const first = timers.splice(0, 1)[0]!;
      t = first.at;
      first.fn();
      await new Promise<void>((r) => setImmediate(r));
      expect(done).toBe(3);
      // Removing the limits over QMP lets the rest go without any time passing.
      expect(await c.run('block_set_io_throttle', { id: 'io-disk', ...ZERO })).toEqual({ return: {} });
      await new Promise<void>((r) => setImmediate(r));
      expect(done).toBe(5);
      const st = (((await c.run('query-blockstats'))['return'] as Reply[]).find((x) => x['device'] === 'thrq-io')!)['stats'];
      expect(st).toMatchObject({ rd_operations: 5, rd_bytes: 2560 });
      c.close();
      be.detachDevice(dev);
      be.unref();
    } finally {
      setThrottleClock(prev);
    }
  });
});

describe('query-blockstats', () => {
  it("counts a device's I/O by kind, with failures, and shows the node below", async () => {
    const path = join(dir, 'stats.img');
    writeFileSync(path, Buffer.alloc(1 << 20));
    const node = await openNode({ driver: 'raw', 'node-name': 'stats-fmt', file: { driver: 'file', filename: path, 'node-name': 'stats-file' } });
    const be = createBackend({ name: 'thrq-stats' }, node);
    unref(node);
    const dev = { id: 'stats-disk' };
    const io = be.attachDevice(dev);
    const c = await client('c.sock');
    const before = ((await c.run('query-blockstats'))['return'] as Reply[]).find((s) => s['device'] === 'thrq-stats')!;
    expect(before['stats']).not.toHaveProperty('idle_time_ns');
    for (let i = 0; i < 3; i++) await io.write(i * 4096, Buffer.alloc(4096, 1));
    await io.read(0, Buffer.alloc(512));
    await io.read(512, Buffer.alloc(1024));
    await io.flush();
    await io.discard(65536, 8192);
    await io.writeZeroes(131072, 4096, false);
    await expect(io.read((1 << 20) - 512, Buffer.alloc(4096))).rejects.toThrow(/past the end/);
    const all = (await c.run('query-blockstats'))['return'] as Reply[];
    const s = all.find((x) => x['device'] === 'thrq-stats')!;
    expect(s).toMatchObject({ device: 'thrq-stats', qdev: 'stats-disk', 'node-name': 'stats-fmt', parent: { 'node-name': 'stats-file' } });
    const st = s['stats'] as Record<string, unknown>;
    expect(st).toMatchObject({
      rd_bytes: 1536, wr_bytes: 3 * 4096 + 4096, unmap_bytes: 8192,
      rd_operations: 2, wr_operations: 4, flush_operations: 1, unmap_operations: 1,
      rd_merged: 0, wr_merged: 0, unmap_merged: 0,
      failed_rd_operations: 1, failed_wr_operations: 0, failed_flush_operations: 0, failed_unmap_operations: 0,
      invalid_rd_operations: 0, invalid_wr_operations: 0, invalid_flush_operations: 0, invalid_unmap_operations: 0,
      wr_highest_offset: 131072 + 4096,
      account_invalid: true, account_failed: true, timed_stats: [],
    });
    for (const k of ['rd_total_time_ns', 'wr_total_time_ns', 'flush_total_time_ns', 'unmap_total_time_ns', 'idle_time_ns']) {
      expect(Number.isSafeInteger(st[k]), k).toBe(true);
      expect(st[k] as number, k).toBeGreaterThanOrEqual(0);
    }
    expect((s['parent'] as Reply)['stats']).toMatchObject({ rd_operations: 0, account_failed: false });
    // Named nodes, with query-nodes.
    const nodes = (await c.run('query-blockstats', { 'query-nodes': true }))['return'] as Reply[];
    expect(nodes.find((x) => x['node-name'] === 'stats-fmt')).toMatchObject({ parent: { 'node-name': 'stats-file' } });
    expect(await c.run('query-blockstats', { 'query-nodes': 1 })).toEqual(err("Invalid parameter type for 'query-nodes', expected: boolean"));
    c.close();
    be.detachDevice(dev);
    be.unref();
  });

  it('leaves out anonymous backends no device uses', async () => {
    const anon = createBackend({});
    const c = await client('d.sock');
    const all = (await c.run('query-blockstats'))['return'] as Reply[];
    expect(all.some((x) => x['device'] === '')).toBe(false);
    const dev = { id: 'anon-dev' };
    anon.attachDevice(dev);
    const again = (await c.run('query-blockstats'))['return'] as Reply[];
    expect(again.find((x) => x['qdev'] === 'anon-dev')).toMatchObject({ device: '' });
    c.close();
    anon.detachDevice(dev);
    anon.unref();
  });
});
