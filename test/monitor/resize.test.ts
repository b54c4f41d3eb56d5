// block_resize over QMP on `spindle system` reaches the guest as virtio-blk's configuration
// change (and a pending unplug is not reported at quit): an MSI-X message to the config vector, a new config generation, the ISR's config
// bit, and the new capacity, on which the guest then writes past the old end.
import { readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { GuestAlloc } from '../../src/qos/alloc.js';
import { startMachine } from '../../src/qos/machine.js';
import { QVirtioBlk, VIRTIO_BLK_S_OK } from '../../src/qos/virtio-blk.js';
import { ensureBuilt } from '../cli/helpers.js';
import { pattern, scratchDir } from '../helpers/tmp.js';
import { RawQmp } from './hotplug-helpers.js';

const dir = scratchDir('spindle-resize-');
beforeAll(ensureBuilt);

describe('block_resize', () => {
  it('grows a disk under a running guest: config interrupt, new capacity, I/O past the old end', async () => {
    const img = join(dir, 'grow.img');
    writeFileSync(img, Buffer.alloc(2 << 20));
    const sock = join(dir, 'r.qmp');
    const vm = await startMachine(['-machine', 'pc', '-m', '64', '-nodefaults', '-qmp', `unix:${sock},server=on,wait=off`,
      '-drive', `if=none,id=d0,file=${img},format=raw`, '-device', 'virtio-blk-pci,drive=d0,id=vd0']);
    const qmp = await RawQmp.connect(sock);
    try {
      const alloc = await GuestAlloc.forPc(vm.qts);
      const blk = await QVirtioBlk.start(vm.qts, alloc);
      const d = blk.dev;
      const mailbox = alloc.alloc(16);
      await vm.qts.memset(mailbox, 16, 0);
      await d.setMsixEntry(0, mailbox, 0x5c);
      await d.enableMsix();
      await d.setConfigVector(0);
      const gen = await d.configGeneration();
      expect(await blk.capacity()).toBe((2 << 20) / 512);
      expect(await qmp.cmd('block_resize', { device: 'd0', size: 6 << 20 })).toEqual({ return: {} });
      expect(await vm.qts.readl(mailbox)).toBe(0x5c);
      expect(await d.configGeneration()).not.toBe(gen);
      expect((await d.isr()) & 2).toBe(2);
      expect(await blk.capacity()).toBe((6 << 20) / 512);
      expect(statSync(img).size).toBe(6 << 20);
      const data = pattern(512, 8);
      expect(await blk.write((5 << 20) / 512, data)).toBe(VIRTIO_BLK_S_OK);
      expect(await blk.flush()).toBe(VIRTIO_BLK_S_OK);
      expect(readFileSync(img).subarray(5 << 20, (5 << 20) + 512).equals(data)).toBe(true);
      const info = (await qmp.ok('query-block')) as { device: string; qdev: string; inserted: { image: { 'virtual-size': number } } }[];
      const d0 = info.find((b) => b.device === 'd0')!;
      expect(d0.inserted.image['virtual-size']).toBe(6 << 20);
      expect(d0.qdev).toBe('/machine/peripheral/vd0/virtio-backend'); // as QEMU names virtio-blk's holder
      // An unplug the guest never completes is not reported as done when the machine quits.
      expect(await qmp.cmd('device_del', { id: 'vd0' })).toEqual({ return: {} });
    } finally {
      expect(await vm.quit()).toBe(0);
      qmp.close();
    }
    expect(qmp.seen('SHUTDOWN')).toHaveLength(1); // this client was still there at the end
    expect(qmp.seen('DEVICE_DELETED')).toEqual([]);
  }, 60_000);
});
