// Media change over a real QMP socket, the guest side played through qtest: an ide-cd with
// I/O limits gets a new ISO by blockdev-change-medium; the tray opens and closes (events),
// the guest sees UNIT ATTENTION then the new data, and the limits are still the backend's.
// The step-by-step commands (open, remove, insert, close) leave the tray as QEMU does.
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { registerMediaCommands } from '../../src/monitor/commands/media.js';
import { registerBlockCommands } from '../../src/monitor/commands/block.js';
import { registerThrottleCommands } from '../../src/monitor/commands/throttle.js';
import { QmpMonitor } from '../../src/monitor/qmp.js';
import { openNode, unref } from '../../src/block/graph.js';
import { serveMonitor, type QmpSession } from '../helpers/qmp.js';
import { pattern, scratchDir } from '../helpers/tmp.js';
import { imageFile, rig, type Rig } from '../hw/ide-helpers.js';

const dir = scratchDir('spindle-media-');
let r: Rig | null = null;
let closeAll: (() => void) | null = null;
afterEach(() => {
  closeAll?.();
  r?.cleanup();
  r = null;
});

async function setup(): Promise<{ qmp: QmpSession; isoB: string }> {
  const isoA = imageFile(dir, pattern(16 * 2048, 1));
  const isoB = imageFile(dir, pattern(16 * 2048, 2));
  r = await rig([{ bus: 1, unit: 0, kind: 'cd', path: isoA }]);
  const mon = new QmpMonitor({ major: 0, minor: 1, micro: 0, package: 'test' });
  registerMediaCommands(mon);
  registerBlockCommands(mon);
  registerThrottleCommands(mon);
  const qmp = await serveMonitor(mon, join(dir, `m${Math.random().toString(36).slice(2)}.sock`));
  closeAll = qmp.close;
  return { qmp, isoB };
}

/** READ(10) of one 2 KiB sector by PIO; null on a check condition (sense key returned). */
async function readSector(lba: number): Promise<Uint8Array | number> {
  const ch = r!.ch[1];
  const res = await ch.packet([0x28, 0, (lba >> 24) & 0xff, (lba >> 16) & 0xff, (lba >> 8) & 0xff, lba & 0xff, 0, 0, 1, 0]);
  if (res.status & 0x01) return (await ch.requestSense())[0]!;
  return res.data;
}

describe('media change', () => {
  it('blockdev-change-medium swaps the ISO under a throttled ide-cd: tray events, UNIT ATTENTION, limits kept', async () => {
    const { qmp, isoB } = await setup();
    await r!.ch[1].select(0);
    const be = r!.backends[0]!;
    expect(await qmp.run('block_set_io_throttle', { id: 'cd10', bps: 4000000, bps_rd: 0, bps_wr: 0, iops: 0, iops_rd: 0, iops_wr: 0 })).toEqual({ return: {} });
    expect(await readSector(3)).toEqual(pattern(16 * 2048, 1).subarray(3 * 2048, 4 * 2048));
    expect(await qmp.run('blockdev-change-medium', { id: 'cd10', filename: isoB, format: 'raw' })).toEqual({ return: {} });
    expect(qmp.events.map((e) => [e['event'], e['data']])).toEqual([
      ['DEVICE_TRAY_MOVED', { device: be.name, id: 'cd10', 'tray-open': true }],
      ['DEVICE_TRAY_MOVED', { device: be.name, id: 'cd10', 'tray-open': false }],
    ]);
    expect(await readSector(3)).toBe(0x06); // UNIT ATTENTION: the medium changed
    expect(await readSector(3)).toEqual(pattern(16 * 2048, 2).subarray(3 * 2048, 4 * 2048));
    const info = ((await qmp.run('query-block'))['return'] as Record<string, unknown>[]).find((b) => b['qdev'] === 'cd10')!;
    expect(info['inserted']).toMatchObject({ file: isoB, ro: true, bps: 4000000, iops: 0 });
    expect(info['tray_open']).toBe(false);
  });

  it('a tray the guest locked: eject fails with QEMU message and the guest sees the eject request; with force the medium goes', async () => {
    const { qmp } = await setup();
    const ch = r!.ch[1];
    await ch.select(0);
    const be = r!.backends[0]!;
    expect((await ch.packet([0x1e, 0, 0, 0, 1])).status & 0x01).toBe(0); // PREVENT MEDIUM REMOVAL
    expect(await qmp.run('eject', { id: 'cd10' })).toEqual({
      error: { class: 'GenericError', desc: "Device 'cd10' is locked and force was not specified, wait for tray to open and try again" },
    });
    expect(be.node).not.toBeNull();
    const ev = (await ch.packet([0x4a, 1, 0, 0, 0x10, 0, 0, 0, 8])).data; // GET EVENT STATUS NOTIFICATION, media class
    expect([ev[4], ev[5]]).toEqual([1, 2]); // an eject request, medium present
    expect(qmp.events).toEqual([]);
    expect(await qmp.run('eject', { id: 'cd10', force: true })).toEqual({ return: {} });
    expect(be.node).toBeNull();
    expect(qmp.events.map((e) => (e['data'] as Record<string, unknown>)['tray-open'])).toEqual([true]);
    expect(await readSector(0)).toBe(0x02); // NOT READY: no medium
  });

  it('open-tray, remove-medium, insert-medium and close-tray one by one, with their refusals', async () => {
    const { qmp, isoB } = await setup();
    const be = r!.backends[0]!;
    const node = await openNode({ driver: 'raw', 'node-name': 'media-b', 'read-only': true, file: { driver: 'file', filename: isoB, 'read-only': true } });
    try {
      expect(await qmp.run('blockdev-insert-medium', { id: 'cd10', 'node-name': 'media-b' })).toEqual({ error: { class: 'GenericError', desc: "Tray of device 'cd10' is not open" } });
      expect(await qmp.run('blockdev-remove-medium', { id: 'cd10' })).toEqual({ error: { class: 'GenericError', desc: "Tray of device 'cd10' is not open" } });
      expect(await qmp.run('blockdev-open-tray', { id: 'cd10' })).toEqual({ return: {} });
      expect(await qmp.run('blockdev-insert-medium', { id: 'cd10', 'node-name': 'media-b' })).toEqual({ error: { class: 'GenericError', desc: "There already is a medium in device 'cd10'" } });
      expect(await qmp.run('blockdev-remove-medium', { id: 'cd10' })).toEqual({ return: {} });
      expect(be.node).toBeNull();
      expect(await qmp.run('blockdev-insert-medium', { id: 'cd10', 'node-name': 'media-b' })).toEqual({ return: {} });
      // In, but the tray is still open: the guest has no medium until it closes.
      expect((((await qmp.run('query-block'))['return'] as Record<string, unknown>[])[0]!)['tray_open']).toBe(true);
      expect(await qmp.run('blockdev-close-tray', { id: 'cd10' })).toEqual({ return: {} });
      expect(be.node?.name).toBe('media-b');
      expect(qmp.events.map((e) => (e['data'] as Record<string, unknown>)['tray-open'])).toEqual([true, false]);
      expect((await qmp.run('blockdev-open-tray', { id: 'nope' }))['error']).toEqual({ class: 'DeviceNotFound', desc: "Device 'nope' not found" });
    } finally {
      unref(node);
    }
  });
});
