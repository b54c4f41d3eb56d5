// Soak: 1,000 hot-plug/unplug cycles of a virtio-blk disk on `spindle system` over real
// sockets, with I/O on the hot-plugged disk in every cycle and on a disk that stays. After
// them no backend, node or file descriptor is left behind, the process's memory has not kept
// growing, and every write the guest saw acknowledged is in the image files.
import { readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { GuestAlloc } from '../../src/qos/alloc.js';
import { startMachine } from '../../src/qos/machine.js';
import { QPciBus } from '../../src/qos/pci.js';
import { QVirtioBlk, VIRTIO_BLK_S_OK } from '../../src/qos/virtio-blk.js';
import { ensureBuilt } from '../cli/helpers.js';
import { pattern, scratchDir } from '../helpers/tmp.js';
import { eventually, openCount, RawQmp } from './hotplug-helpers.js';

const CYCLES = 1000;
const SECTOR = 512;
const dir = scratchDir('spindle-soak-');
beforeAll(ensureBuilt);

const fds = (pid: number): number => readdirSync(`/proc/${pid}/fd`).length;
const rssKiB = (pid: number): number => Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))![1]);
/** The sector cycle `i` writes: its number in every 32-bit word. */
const sectorOf = (i: number, disk: number): Buffer => {
  const b = Buffer.alloc(SECTOR);
  for (let o = 0; o < SECTOR; o += 4) b.writeUInt32LE((disk << 24) | i, o);
  return b;
};

describe('hot-plug soak', () => {
  it(`${CYCLES} plug/unplug cycles with I/O running leak nothing and lose no acknowledged write`, async () => {
    const hot = join(dir, 'hot.img');
    const keep = join(dir, 'keep.img');
    writeFileSync(hot, Buffer.alloc(CYCLES * SECTOR));
    writeFileSync(keep, pattern(CYCLES * SECTOR, 9));
    const sock = join(dir, 'soak.qmp');
    const vm = await startMachine(['-machine', 'pc', '-m', '64', '-nodefaults', '-qmp', `unix:${sock},server=on,wait=off`,
      '-drive', `if=none,id=keep,file=${keep},format=raw`, '-device', 'virtio-blk-pci,drive=keep,id=keepdev,addr=0x4']);
    const qmp = await RawQmp.connect(sock);
    const { qts } = vm;
    const pid = vm.process.pid!;
    try {
      await qts.irqInterceptIn('ioapic');
      await qts.outw(0xafe2, 0x2); // the guest enables the hotplug GPE
      // The disk that stays lives in the top half of guest RAM; each hot-plugged one in the bottom.
      const bus = new QPciBus(qts); // one bus places every BAR, so they never overlap
      const stay = await QVirtioBlk.start(qts, new GuestAlloc(32 << 20, 64 << 20), { slot: 4, bus });
      const fdsBefore = fds(pid);
      const nodesBefore = ((await qmp.ok('query-named-block-nodes')) as unknown[]).length;
      let rssEarly = 0;
      for (let i = 0; i < CYCLES; i++) {
        expect(await qmp.hmp(`drive_add 0 if=none,id=hp,file=${hot},format=raw`)).toBe('OK\r\n');
        expect(await qmp.cmd('device_add', { driver: 'virtio-blk-pci', id: 'hpdev', drive: 'hp', addr: '0x5' })).toEqual({ return: {} });
        await qts.outw(0xafe0, 0x2);
        const blk = await QVirtioBlk.start(qts, new GuestAlloc(1 << 20, 32 << 20), { slot: 5, bus });
        expect(await blk.write(i, sectorOf(i, 1))).toBe(VIRTIO_BLK_S_OK);
        expect(await stay.write(i, sectorOf(i, 2))).toBe(VIRTIO_BLK_S_OK);
        const back = await blk.read(i, SECTOR);
        expect(back.status).toBe(VIRTIO_BLK_S_OK);
        expect(Buffer.from(back.data).equals(sectorOf(i, 1))).toBe(true);
        expect(await qmp.cmd('device_del', { id: 'hpdev' })).toEqual({ return: {} });
        await qts.outw(0xafe0, 0x2);
        await qts.outl(0xae08, 1 << 5); // the guest ejects the slot
        await qmp.waitEvent('DEVICE_DELETED', 2 * (i + 1));
        if (i === 99) rssEarly = rssKiB(pid);
      }
      expect(await stay.flush()).toBe(VIRTIO_BLK_S_OK);
      // Nothing left behind: the hot disk's backend and node are gone, its file closed.
      await eventually(() => openCount(pid, hot) === 0, 'the hot-plugged image to be closed');
      expect(fds(pid)).toBe(fdsBefore);
      expect(((await qmp.ok('query-named-block-nodes')) as unknown[]).length).toBe(nodesBefore);
      expect(((await qmp.ok('query-block')) as { device: string }[]).map((b) => b.device)).toEqual(['keep']);
      // Memory: what 900 more cycles added is bounded (no per-cycle leak of any size).
      const growth = rssKiB(pid) - rssEarly;
      expect(growth, `RSS grew ${growth} KiB over ${CYCLES - 100} cycles`).toBeLessThan(48 * 1024);
    } finally {
      qmp.close();
      expect(await vm.quit()).toBe(0);
    }
    // Every acknowledged write is in the files.
    const h = readFileSync(hot);
    const k = readFileSync(keep);
    for (let i = 0; i < CYCLES; i++) {
      expect(h.subarray(i * SECTOR, (i + 1) * SECTOR).equals(sectorOf(i, 1)), `hot sector ${i}`).toBe(true);
      expect(k.subarray(i * SECTOR, (i + 1) * SECTOR).equals(sectorOf(i, 2)), `keep sector ${i}`).toBe(true);
    }
  }, 300_000);
});
