// The three disk kinds through `spindle system`, started the libqtest way and driven over
// the qtest socket by spindle/qos's guest-side drivers: what the guest writes lands in the
// image files, and what the files hold reads back.
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { GuestAlloc } from '../../src/qos/alloc.js';
import { QAtaChannel } from '../../src/qos/ata.js';
import { startMachine } from '../../src/qos/machine.js';
import { QPciBus } from '../../src/qos/pci.js';
import { QVirtioBlk } from '../../src/qos/virtio-blk.js';
import { XenBlkfront, XenGuest } from '../../src/qos/xen-blkfront.js';
import { ensureBuilt } from '../cli/helpers.js';
import { pattern, scratchDir } from '../helpers/tmp.js';

const dir = scratchDir('spindle-disks-');
beforeAll(ensureBuilt);

describe('disks through spindle system', () => {
  it('virtio-blk, IDE (PIO) and xen-disk each write into their image and read it back', async () => {
    const img = (name: string, seed: number): string => {
      const p = join(dir, name);
      writeFileSync(p, pattern(4 << 20, seed));
      return p;
    };
    const [vda, hda, xvda] = [img('vda.img', 1), img('hda.img', 2), img('xvda.img', 3)];
    const vm = await startMachine([
      '-machine', 'pc', '-m', '64', '-nodefaults',
      '-drive', `file=${vda},if=virtio,format=raw`,
      '-drive', `file=${hda},if=ide,format=raw,cache=writeback`,
      '-blockdev', `driver=raw,node-name=xen0,file.driver=file,file.filename=${xvda}`,
      '-device', 'xen-disk,vdev=xvda,drive=xen0',
    ]);
    try {
      const alloc = await GuestAlloc.forPc(vm.qts);
      // virtio-blk: a write at sector 8, a read of sectors 0..15.
      const blk = await QVirtioBlk.start(vm.qts, alloc);
      const v = pattern(4096, 11);
      expect(await blk.write(8, v)).toBe(0);
      const vr = await blk.read(0, 8192);
      expect(vr.status).toBe(0);
      expect(Buffer.from(vr.data).equals(Buffer.concat([pattern(4 << 20, 1).subarray(0, 4096), v]))).toBe(true);
      expect(await blk.flush()).toBe(0);
      // IDE: WRITE SECTORS then READ SECTORS at LBA 3, by PIO on the primary master.
      const [ide0] = await QAtaChannel.piix(vm.qts, new QPciBus(vm.qts), alloc);
      await ide0.select(0);
      const h = pattern(1024, 12);
      expect((await ide0.pioOut(0x30, { count: 2, lba: 3 }, h)).status & 1).toBe(0);
      const hr = await ide0.pioIn(0x20, { count: 2, lba: 3 }, 1024);
      expect(Buffer.from(hr.data).equals(h)).toBe(true);
      // xen-disk: connect the frontend, write 2 sectors at 100, read them back.
      const xen = await XenGuest.create(vm.qts, alloc);
      const front = new XenBlkfront(xen, (202 << 8) | 0);
      await front.connect();
      const x = pattern(1024, 13);
      expect(await front.write(100, x)).toBe(0);
      const xr = await front.read(100, 2);
      expect(Buffer.from(xr.data).equals(x)).toBe(true);
      await front.flush();
    } finally {
      expect(await vm.quit()).toBe(0);
    }
    const want = (seed: number, at: number, data: Buffer): Buffer => {
      const b = pattern(4 << 20, seed);
      data.copy(b, at);
      return b;
    };
    expect(readFileSync(vda).equals(want(1, 8 * 512, pattern(4096, 11)))).toBe(true);
    expect(readFileSync(hda).equals(want(2, 3 * 512, pattern(1024, 12)))).toBe(true);
    expect(readFileSync(xvda).equals(want(3, 100 * 512, pattern(1024, 13)))).toBe(true);
  }, 60_000);

  it('takes the IDE command line libqtest uses: a -blockdev file node under ide-hd, and an empty ide-cd on the same bus', async () => {
    const hd = join(dir, 'lib.img');
    writeFileSync(hd, pattern(1 << 20, 4));
    const vm = await startMachine([
      '-machine', 'pc', '-blockdev', `driver=file,node-name=hda,filename=${hd}`,
      '-device', 'ide-hd,drive=hda,bus=ide.0,unit=0,serial=QM0001', '-device', 'ide-cd,bus=ide.0',
    ]);
    try {
      const alloc = await GuestAlloc.forPc(vm.qts);
      const [ide0] = await QAtaChannel.piix(vm.qts, new QPciBus(vm.qts), alloc);
      await ide0.select(0);
      const id = await ide0.identify();
      // Serial number: words 10-19, bytes swapped within each word.
      const serial = Buffer.alloc(20);
      for (let i = 0; i < 20; i += 2) [serial[i], serial[i + 1]] = [id[20 + i + 1]!, id[20 + i]!];
      expect(serial.toString().trim()).toBe('QM0001');
      expect(Buffer.from(id).readUInt32LE(60 * 2)).toBe((1 << 20) / 512); // LBA28 capacity
      await ide0.select(1);
      await ide0.identify(0xa1); // IDENTIFY PACKET DEVICE: a CD-ROM answers it
      await ide0.packet([0x00, 0, 0, 0, 0, 0]); // TEST UNIT READY
      expect((await ide0.requestSense())[0]).toBe(0x02); // NOT READY: no medium
    } finally {
      expect(await vm.quit()).toBe(0);
    }
  }, 60_000);
});
