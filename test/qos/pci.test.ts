// The guest-side PCI driver and memory allocator against the pc machine, in process.
import { describe, expect, it } from 'vitest';
import { PcMachine } from '../../hw/pc/pc.js';
import { PciFunction } from '../../hw/pci/pci-device.js';
import { GuestAlloc } from '../../src/qos/alloc.js';
import { QPciBus } from '../../src/qos/pci.js';
import { QtestClient, QtestFailure } from '../../src/qos/qtest-client.js';

describe('qos: PCI and guest memory', () => {
  it('enumerates the pc machine, sizes and places BARs, and enables decoding', async () => {
    const m = new PcMachine({ ramSize: 64 << 20 });
    const f = new PciFunction('test-dev', { vendor: 0x1af4, device: 0x1042, classCode: 0x010000, interruptPin: 1 });
    f.addBar(0, { size: 0x40, kind: 'io', region: { name: 'io', read: () => 0x5a, write: () => undefined } });
    f.addBar(4, { size: 0x4000, kind: 'mem64', region: { name: 'mem', read: () => 0xa5, write: () => undefined } });
    m.chipset.bus.plug(4, 0, f);
    const qts = QtestClient.inProcess(m);
    const bus = new QPciBus(qts);
    expect(await bus.enumerate()).toEqual([[0x00, 0x8086, 0x1237], [0x08, 0x8086, 0x7000], [0x0b, 0x8086, 0x7113], [0x20, 0x1af4, 0x1042]]);
    const dev = (await bus.find(0x1af4, 0x1042))!;
    expect(dev.slot).toBe(4);
    expect(await bus.find(0x1234, 0x1111)).toBeUndefined();
    const io = await dev.mapBar(0);
    const mem = await dev.mapBar(4);
    expect(io).toMatchObject({ kind: 'io', size: 0x40 });
    expect(mem).toMatchObject({ kind: 'mem', size: 0x4000 });
    expect(io.addr % 0x40).toBe(0);
    expect(mem.addr % 0x4000).toBe(0);
    expect(await qts.inb(io.addr)).toBe(0xff); // not enabled yet
    await dev.enable();
    expect(await qts.inb(io.addr)).toBe(0x5a);
    expect(await qts.readb(mem.addr)).toBe(0xa5);
    await expect(dev.mapBar(1)).rejects.toThrow(/BAR 1 is not implemented/);
    await expect(qts.command('bogus')).rejects.toThrow(QtestFailure);
  });

  it('allocates guest memory from fw_cfg\'s RAM size, aligned, and reuses what is released', async () => {
    const m = new PcMachine({ ramSize: 8 << 20 });
    const qts = QtestClient.inProcess(m);
    const a = await GuestAlloc.forPc(qts);
    const x = a.alloc(100);
    const y = a.alloc(8192, 8192);
    expect(x).toBe(1 << 20);
    expect(y % 8192).toBe(0);
    expect(y).toBeGreaterThan(x);
    a.release(x, 100);
    expect(a.alloc(4096)).toBe(x);
    expect(() => a.alloc(16 << 20)).toThrow(/exhausted/);
    await qts.memwrite(y, Uint8Array.of(1, 2, 3));
    expect([...(await qts.memread(y, 3))]).toEqual([1, 2, 3]);
    expect([...m.ram.bytes.subarray(y, y + 3)]).toEqual([1, 2, 3]);
  });
});
