// device_add / device_del, drive_add / drive_del / info block (HMP), stop / cont /
// query-status and the werror=stop path, on `spindle system` over real sockets: QMP on a
// -qmp server socket, the guest played over qtest by spindle/qos (QPciBus, QVirtioBlk) and
// by port writes to the ACPI PCI hotplug registers (0xae00..0xae13, GPE0 at 0xafe0).
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { GuestAlloc } from '../../src/qos/alloc.js';
import { startMachine, type RunningMachine } from '../../src/qos/machine.js';
import { QPciBus } from '../../src/qos/pci.js';
import { QAtaChannel } from '../../src/qos/ata.js';
import type { QtestClient } from '../../src/qos/qtest-client.js';
import { QVirtioBlk, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK } from '../../src/qos/virtio-blk.js';
import { ensureBuilt } from '../cli/helpers.js';
import { pattern, scratchDir } from '../helpers/tmp.js';
import { eventually, openCount, RawQmp } from './hotplug-helpers.js';

const SIZE = 4 << 20;
const dir = scratchDir('spindle-hotplug-qmp-');
beforeAll(ensureBuilt);

function image(name: string, seed: number): string {
  const p = join(dir, name);
  writeFileSync(p, pattern(SIZE, seed));
  return p;
}

/** A machine under qtest with a second QMP monitor on a -qmp server socket. */
async function boot(name: string, extra: string[] = []): Promise<{ vm: RunningMachine; qmp: RawQmp; pid: number }> {
  const sock = join(dir, `${name}.qmp`);
  const vm = await startMachine(['-machine', 'pc', '-m', '64', '-nodefaults', '-qmp', `unix:${sock},server=on,wait=off`, ...extra]);
  const qmp = await RawQmp.connect(sock);
  return { vm, qmp, pid: vm.process.pid! };
}

/** Whether a device answers in PCI slot `slot` (function 0). */
async function inSlot(qts: QtestClient, slot: number): Promise<boolean> {
  return (await new QPciBus(qts).enumerate()).some(([devfn]) => devfn === slot << 3);
}

/** The guest's ACPI code: acknowledge the hotplug GPE, then eject `slot`. */
async function guestEject(qts: QtestClient, slot: number): Promise<void> {
  expect(await qts.inl(0xae04) & (1 << slot)).toBe(1 << slot); // asked to go ("down")
  await qts.outw(0xafe0, 0x2);
  await qts.outl(0xae08, 1 << slot);
}

describe('device hotplug over QMP', () => {
  it('hot-plugs a virtio-blk disk on a drive_add backend; device_del is a request the guest completes; the backend is freed and its name reusable', async () => {
    const img = image('hot.img', 1);
    const { vm, qmp, pid } = await boot('hot');
    const { qts } = vm;
    try {
      await qts.irqInterceptIn('ioapic');
      await qts.outw(0xafe2, 0x2); // the guest enables the hotplug GPE
      expect(await qmp.hmp(`drive_add 0 if=none,id=hd0,file=${img},format=raw`)).toBe('OK\r\n');
      expect(openCount(pid, img)).toBe(1);
      expect(await inSlot(qts, 5)).toBe(false);

      expect(await qmp.cmd('device_add', { driver: 'virtio-blk-pci', id: 'disk0', drive: 'hd0', addr: '0x5', serial: 'hot0' })).toEqual({ return: {} });
      // The guest hears of it: slot 5 in "up", SCI up, and the function is there.
      expect(await qts.inl(0xae00) & (1 << 5)).toBe(1 << 5);
      expect(qts.getIrq(9)).toBe(true);
      expect(await inSlot(qts, 5)).toBe(true);
      await qts.outw(0xafe0, 0x2);
      await qts.inl(0xae00);
      expect(qts.getIrq(9)).toBe(false);

      // A read and a write through the hot-plugged disk land in (and come from) the image.
      const alloc = await GuestAlloc.forPc(qts);
      const blk = await QVirtioBlk.start(qts, alloc);
      const data = pattern(4096, 7);
      expect(await blk.write(16, data)).toBe(VIRTIO_BLK_S_OK);
      const r = await blk.read(0, 512);
      expect(r.status).toBe(VIRTIO_BLK_S_OK);
      expect(Buffer.from(r.data).equals(pattern(SIZE, 1).subarray(0, 512))).toBe(true);
      expect(await blk.flush()).toBe(VIRTIO_BLK_S_OK);
      expect(readFileSync(img).subarray(16 * 512, 16 * 512 + 4096).equals(data)).toBe(true);
      expect(await qmp.hmp('info block hd0')).toBe(`hd0 (${/\((#block\d+)\)/.exec(await qmp.hmp('info block hd0'))![1]}): ${img} (raw)\r\n`
        + '    Attached to:      /machine/peripheral/disk0/virtio-backend\r\n    Cache mode:       writeback\r\n');

      // device_del asks; nothing goes until the guest ejects.
      expect(await qmp.cmd('device_del', { id: 'disk0' })).toEqual({ return: {} });
      await qts.inl(0xae04); // a qtest round trip: IRQ messages sent before its reply have arrived
      expect(qts.getIrq(9)).toBe(true);
      expect(await qmp.cmd('device_del', { id: 'disk0' })).toEqual({ error: { class: 'GenericError', desc: 'Device disk0 is already in the process of unplug' } });
      await qmp.cmd('query-status'); // a QMP round trip: an event sent before its reply has arrived
      expect(qmp.seen('DEVICE_DELETED')).toEqual([]);
      expect(await inSlot(qts, 5)).toBe(true);
      expect(openCount(pid, img)).toBe(1);
      // Taken by the device: the name cannot be reused yet.
      expect(await qmp.hmp(`drive_add 0 if=none,id=hd0,file=${img},format=raw`)).toBe("Device with id 'hd0' already exists\r\n");

      await guestEject(qts, 5);
      const deleted = await qmp.waitEvent('DEVICE_DELETED', 2);
      expect(deleted).toEqual([{ path: '/machine/peripheral/disk0/virtio-backend' }, { device: 'disk0', path: '/machine/peripheral/disk0' }]);
      expect(await inSlot(qts, 5)).toBe(false);
      // The -drive-style backend went with its device: the image is closed and the name free.
      await eventually(() => openCount(pid, img) === 0, 'the image file to be closed');
      expect(await qmp.hmp('info block')).toBe('');
      expect(await qmp.cmd('device_del', { id: 'disk0' })).toEqual({ error: { class: 'DeviceNotFound', desc: "Device 'disk0' not found" } });
      expect(await qmp.hmp(`drive_add 0 if=none,id=hd0,file=${img},format=raw`)).toBe('OK\r\n');
      expect(openCount(pid, img)).toBe(1);
    } finally {
      qmp.close();
      expect(await vm.quit()).toBe(0);
    }
  }, 60_000);

  it('drive_del on an attached disk revokes it at once (guest I/O fails, name free); the new backend of that name is not the one freed at unplug', async () => {
    const old = image('old.img', 2);
    const fresh = image('new.img', 3);
    const { vm, qmp, pid } = await boot('del');
    const { qts } = vm;
    try {
      await qts.outw(0xafe2, 0x2);
      expect(await qmp.hmp(`drive_add 0 if=none,id=hd1,file=${old},format=raw,werror=stop`)).toBe('OK\r\n');
      await qmp.ok('device_add', { driver: 'virtio-blk-pci', id: 'disk1', drive: 'hd1', addr: '06' });
      const alloc = await GuestAlloc.forPc(qts);
      const blk = await QVirtioBlk.start(qts, alloc);
      expect(await blk.write(0, pattern(512, 9))).toBe(VIRTIO_BLK_S_OK);

      expect(await qmp.hmp('drive_del hd1')).toBe('');
      // The medium is gone: the guest's I/O fails (and does not stop the VM despite werror=stop).
      expect(await blk.write(8, pattern(512, 10))).toBe(VIRTIO_BLK_S_IOERR);
      const rd = await blk.read(0, 512);
      expect(rd.status).toBe(VIRTIO_BLK_S_IOERR);
      // A flush reaches the backend and fails there: reported (QEMU's drive_del set the policy
      // to report), so no STOP.
      expect(await blk.flush()).toBe(VIRTIO_BLK_S_IOERR);
      expect((await qmp.waitEvent('BLOCK_IO_ERROR')).at(-1)).toMatchObject({ operation: 'write', action: 'report', reason: 'No medium found' });
      await new Promise((res) => setTimeout(res, 50));
      expect(qmp.seen('STOP')).toEqual([]);
      expect(await qmp.ok('query-status')).toMatchObject({ status: 'running', running: true });
      await eventually(() => openCount(pid, old) === 0, 'the revoked image to be closed');
      expect(readFileSync(old).subarray(8 * 512, 9 * 512).equals(pattern(SIZE, 2).subarray(8 * 512, 9 * 512))).toBe(true);
      expect(await qmp.hmp('drive_del hd1')).toBe("Device 'hd1' not found\r\n");

      // The name is free at once; the revoked backend still sits under the device.
      expect(await qmp.hmp(`drive_add 0 if=none,id=hd1,file=${fresh},format=raw`)).toBe('OK\r\n');
      expect(openCount(pid, fresh)).toBe(1);
      const info = await qmp.hmp('info block');
      expect(info).toContain(`hd1 (`);
      expect(info).toContain(`): ${fresh} (raw)\r\n    Cache mode:       writeback\r\n`);
      expect(info).toContain('/machine/peripheral/disk1/virtio-backend: [not inserted]\r\n    Attached to:      /machine/peripheral/disk1/virtio-backend\r\n');

      await qmp.ok('device_del', { id: 'disk1' });
      await guestEject(qts, 6);
      expect(await qmp.waitEvent('DEVICE_DELETED', 2)).toContainEqual({ device: 'disk1', path: '/machine/peripheral/disk1' });
      // The unplug freed the revoked backend, not the new hd1: it stays open and listed ...
      await new Promise((res) => setTimeout(res, 100));
      expect(openCount(pid, fresh)).toBe(1);
      expect(await qmp.hmp('info block')).toMatch(new RegExp(`^hd1 \\(#block\\d+\\): ${fresh} \\(raw\\)\\r\\n    Cache mode:       writeback\\r\\n$`));
      // ... and works: a new device on it reads the new image.
      await qmp.ok('device_add', { driver: 'virtio-blk-pci', id: 'disk2', drive: 'hd1', addr: '0x7' });
      const blk2 = await QVirtioBlk.start(qts, alloc);
      const r = await blk2.read(0, 1024);
      expect(r.status).toBe(VIRTIO_BLK_S_OK);
      expect(Buffer.from(r.data).equals(pattern(SIZE, 3).subarray(0, 1024))).toBe(true);
    } finally {
      qmp.close();
      expect(await vm.quit()).toBe(0);
    }
  }, 60_000);

  it("refuses what QEMU refuses, with QEMU's messages: a bad bus, a duplicate id, an unknown drive, a drive in use, an unknown model, unknown HMP commands", async () => {
    const img = image('refuse.img', 4);
    const { vm, qmp } = await boot('refuse', ['-drive', `if=none,id=hd2,file=${img},format=raw`]);
    try {
      const err = (desc: string, cls = 'GenericError') => ({ error: { class: cls, desc } });
      expect(await qmp.cmd('device_add', { driver: 'ide-hd', id: 'ide1', drive: 'hd2', bus: 'ide.7' })).toEqual(err("Bus 'ide.7' not found (ide.0 or ide.1)"));
      expect(await qmp.cmd('device_add', { driver: 'virtio-blk-pci', id: 'd0', drive: 'nope' })).toEqual(err("Property 'virtio-blk-device.drive' can't find value 'nope'"));
      expect(await qmp.cmd('device_add', { driver: 'virtio-blk-pci', id: 'd0', drive: 'hd2', bogus: 1 })).toEqual(err("Property 'virtio-blk-pci.bogus' not found"));
      expect(await qmp.cmd('device_add', { driver: 'e1000', id: 'n0' })).toEqual(err("'e1000' is not a valid device model name"));
      expect(await qmp.cmd('device_add', { id: 'x' })).toEqual(err("Parameter 'driver' is missing"));
      expect(await qmp.cmd('device_add', { driver: 'virtio-blk-pci', id: 'd0', drive: 'hd2', 'num-queues': 2 })).toEqual({ return: {} });
      expect(await qmp.cmd('device_add', { driver: 'virtio-blk-pci', id: 'd0', drive: 'hd2' })).toEqual(err("Duplicate device ID 'd0'"));
      expect(await qmp.cmd('device_add', { driver: 'virtio-blk-pci', id: 'd1', drive: 'hd2' })).toEqual(err("Drive 'hd2' is already in use by another device"));
      expect(await qmp.cmd('device_del', { id: 'nosuch' })).toEqual(err("Device 'nosuch' not found", 'DeviceNotFound'));
      expect(await qmp.hmp('frobnicate 1')).toBe("unknown command: 'frobnicate'\r\n");
      expect(await qmp.hmp('info frob')).toBe("unknown command: 'info frob'\r\n");
      const other = image('refuse2.img', 6);
      expect(await qmp.hmp(`drive_add 0 file=${other},format=raw`)).toBe("Can't hot-add drive to type 1\r\n");
      expect(await qmp.hmp('drive_del nosuch')).toBe("Device 'nosuch' not found\r\n");
      expect(await qmp.cmd('human-monitor-command', { 'command-line': 'info status', 'cpu-index': 3 })).toEqual(err("Parameter 'cpu-index' expects a CPU number"));
      // The refused attempts left nothing behind: hd2 is the only backend, attached to d0.
      expect(await qmp.hmp('info block')).toMatch(/^hd2 \(#block\d+\): .*refuse\.img \(raw\)\r\n    Attached to:      \/machine\/peripheral\/d0\/virtio-backend\r\n    Cache mode:       writeback\r\n$/);
    } finally {
      qmp.close();
      expect(await vm.quit()).toBe(0);
    }
  }, 60_000);
});

describe('IDE hotplug (a Spindle extension: QEMU refuses it)', () => {
  it('device_add puts an ide-hd on a free position the guest then finds; device_del takes it at once, DEVICE_DELETED, the backend freed', async () => {
    const img = image('idehot.img', 5);
    const { vm, qmp, pid } = await boot('idehot');
    const { qts } = vm;
    try {
      expect(await qmp.hmp(`drive_add 0 if=none,id=hd3,file=${img},format=raw`)).toBe('OK\r\n');
      expect(await qmp.cmd('device_add', { driver: 'ide-hd', id: 'idehot', drive: 'hd3', bus: 'ide.1', serial: 'HOT3' })).toEqual({ return: {} });
      const [, ide1] = await QAtaChannel.piix(qts, new QPciBus(qts), await GuestAlloc.forPc(qts));
      await ide1.select(0);
      const id = await ide1.identify();
      expect(Buffer.from(id).readUInt32LE(60 * 2)).toBe(SIZE / 512);
      const r = await ide1.pioIn(0x20, { lba: 3, count: 1 }, 512);
      expect(Buffer.from(r.data).equals(pattern(SIZE, 5).subarray(3 * 512, 4 * 512))).toBe(true);
      const data = pattern(512, 11);
      expect((await ide1.pioOut(0x30, { lba: 9, count: 1 }, data)).status & 0x01).toBe(0);
      expect(readFileSync(img).subarray(9 * 512, 10 * 512).equals(data)).toBe(true);
      expect(await qmp.cmd('device_del', { id: 'idehot' })).toEqual({ return: {} });
      expect(await qmp.waitEvent('DEVICE_DELETED')).toEqual([{ device: 'idehot', path: '/machine/peripheral/idehot' }]);
      await eventually(() => openCount(pid, img) === 0, 'the image file to be closed');
      await ide1.select(0);
      expect(await ide1.reg(7)).toBe(0xff); // nobody answers on ide.1 now: a floating bus
      expect(await qmp.hmp('info block')).toBe('');
    } finally {
      qmp.close();
      expect(await vm.quit()).toBe(0);
    }
  }, 60_000);
});

describe('xen-disk over QMP', () => {
  it('device_add plugs a xen-disk on a drive_add backend; device_del takes it at once with DEVICE_DELETED and frees the backend', async () => {
    const img = image('xen.img', 12);
    const { vm, qmp, pid } = await boot('xen');
    try {
      expect(await qmp.hmp(`drive_add 0 if=none,id=xd0,file=${img},format=raw`)).toBe('OK\r\n');
      expect(await qmp.cmd('device_add', { driver: 'xen-disk', id: 'x0', vdev: 'xvda', drive: 'xd0' })).toEqual({ return: {} });
      expect(await qmp.hmp('info block')).toMatch(/^xd0 \(#block\d+\): .*xen\.img \(raw\)\r\n    Attached to:      x0\r\n/);
      expect(await qmp.cmd('device_add', { driver: 'xen-disk', id: 'x1', vdev: 'xvda', drive: 'xd0' })).toMatchObject({ error: { class: 'GenericError' } });
      expect(await qmp.cmd('device_del', { id: 'x0' })).toEqual({ return: {} });
      expect(await qmp.waitEvent('DEVICE_DELETED')).toEqual([{ device: 'x0', path: '/machine/peripheral/x0' }]);
      await eventually(() => openCount(pid, img) === 0, 'the image file to be closed');
      expect(await qmp.hmp('info block')).toBe('');
    } finally {
      qmp.close();
      expect(await vm.quit()).toBe(0);
    }
  }, 60_000);
});

describe('run state over QMP', () => {
  it('stop and cont change query-status and emit STOP and RESUME (once per change)', async () => {
    const { vm, qmp } = await boot('runstate');
    try {
      expect(await qmp.ok('query-status')).toEqual({ status: 'running', singlestep: false, running: true });
      await qmp.ok('stop');
      expect(await qmp.ok('query-status')).toEqual({ status: 'paused', singlestep: false, running: false });
      expect(await qmp.hmp('info status')).toBe('VM status: paused\r\n');
      await qmp.ok('stop');
      await qmp.ok('cont');
      expect(await qmp.ok('query-status')).toEqual({ status: 'running', singlestep: false, running: true });
      await qmp.waitEvent('RESUME');
      expect(qmp.events.map((e) => e['event'])).toEqual(['STOP', 'RESUME']);
    } finally {
      qmp.close();
      expect(await vm.quit()).toBe(0);
    }
  }, 60_000);

  it('werror=stop: a failed write gives BLOCK_IO_ERROR then STOP (status io-error), the request waits; cont retries it and it succeeds', async () => {
    const img = image('faulty.img', 5);
    const blockdev = {
      driver: 'raw', 'node-name': 'n0',
      file: { driver: 'blkdebug', 'inject-error': [{ event: 'write_aio', errno: 5, once: true }], image: { driver: 'file', filename: img } },
    };
    const { vm, qmp } = await boot('werror', ['-blockdev', JSON.stringify(blockdev), '-device', 'virtio-blk-pci,id=vd0,drive=n0,werror=stop,addr=4']);
    const { qts } = vm;
    try {
      const alloc = await GuestAlloc.forPc(qts);
      const blk = await QVirtioBlk.start(qts, alloc);
      const data = pattern(1024, 21);
      const p = await blk.submit(1 /* VIRTIO_BLK_T_OUT */, 32, { out: data });
      await qmp.waitEvent('STOP');
      expect(qmp.events.map((e) => e['event'])).toEqual(['BLOCK_IO_ERROR', 'STOP']);
      expect(qmp.seen('BLOCK_IO_ERROR')).toEqual([{ device: '', 'node-name': 'n0', operation: 'write', action: 'stop', nospace: false, reason: 'Input/output error' }]);
      expect(await qmp.ok('query-status')).toEqual({ status: 'io-error', singlestep: false, running: false });
      expect(await qmp.hmp('info status')).toBe('VM status: paused (io-error)\r\n');
      // The request is held: not completed, not written.
      await new Promise((res) => setTimeout(res, 100));
      expect(await p.vq.getUsed()).toBeNull();
      expect(readFileSync(img).subarray(32 * 512, 34 * 512).equals(pattern(SIZE, 5).subarray(32 * 512, 34 * 512))).toBe(true);

      // The fault fired once and is gone: cont retries the write, which succeeds.
      await qmp.ok('cont');
      expect((await blk.wait(p)).status).toBe(VIRTIO_BLK_S_OK);
      expect(readFileSync(img).subarray(32 * 512, 34 * 512).equals(data)).toBe(true);
      expect(await qmp.ok('query-status')).toEqual({ status: 'running', singlestep: false, running: true });
      expect(qmp.events.map((e) => e['event'])).toEqual(['BLOCK_IO_ERROR', 'STOP', 'RESUME']);
    } finally {
      qmp.close();
      expect(await vm.quit()).toBe(0);
    }
  }, 60_000);
});
