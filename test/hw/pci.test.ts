// PCI config mechanism #1, BAR sizing and mapping, driven through port I/O as a guest does.
import { describe, expect, it } from 'vitest';
import type { AccessSize, IoRegion } from '../../hw/core/address-space.js';
import { Machine } from '../../hw/core/machine.js';
import { PciBus } from '../../hw/pci/host.js';
import { PCI_COMMAND_IO, PCI_COMMAND_MEMORY, PciFunction } from '../../hw/pci/pci-device.js';

function cfgAddr(slot: number, fn: number, reg: number): number {
  return (0x80000000 | (slot << 11) | (fn << 8) | (reg & 0xfc)) >>> 0;
}
function cfgRead(m: Machine, slot: number, fn: number, reg: number, size: AccessSize = 4): number {
  m.portWrite(0xcf8, 4, cfgAddr(slot, fn, reg));
  return m.portRead(0xcfc + (reg & 3), size);
}
function cfgWrite(m: Machine, slot: number, fn: number, reg: number, size: AccessSize, v: number): void {
  m.portWrite(0xcf8, 4, cfgAddr(slot, fn, reg));
  m.portWrite(0xcfc + (reg & 3), size, v);
}
const reg = (name: string, value: number): IoRegion => ({ name, read: () => value, write: () => undefined });

function setup() {
  const m = new Machine({ ramSize: 1 << 20 });
  const bus = new PciBus(m);
  const f = new PciFunction('test-dev', { vendor: 0x1af4, device: 0x1001, classCode: 0x010000, revision: 2, interruptPin: 1 });
  f.addBar(0, { size: 0x40, kind: 'io', region: reg('test-dev BAR0', 0x1234) });
  f.addBar(1, { size: 0x1000, kind: 'mem32', region: reg('test-dev BAR1', 0xabcd) });
  f.addBar(4, { size: 0x4000, kind: 'mem64', region: reg('test-dev BAR4', 0x77) });
  bus.plug(3, 0, f);
  return { m, bus, f };
}

describe('PCI host (config mechanism #1)', () => {
  it('reads identification registers of present functions and all ones elsewhere', () => {
    const { m } = setup();
    expect(cfgRead(m, 3, 0, 0x00)).toBe(0x10011af4);
    expect(cfgRead(m, 3, 0, 0x02, 2)).toBe(0x1001);
    expect(cfgRead(m, 3, 0, 0x08)).toBe(0x01000002); // class 01 00 00, revision 2
    expect(cfgRead(m, 3, 0, 0x3d, 1)).toBe(1);
    expect(cfgRead(m, 4, 0, 0x00)).toBe(0xffffffff);
    expect(cfgRead(m, 3, 1, 0x00, 2)).toBe(0xffff);
    // Without the enable bit, or on another bus, nothing answers.
    m.portWrite(0xcf8, 4, cfgAddr(3, 0, 0) & 0x7fffffff);
    expect(m.portRead(0xcfc, 4)).toBe(0xffffffff);
    m.portWrite(0xcf8, 4, (cfgAddr(3, 0, 0) | (1 << 16)) >>> 0);
    expect(m.portRead(0xcfc, 4)).toBe(0xffffffff);
    expect(m.portRead(0xcf8, 4)).toBe((cfgAddr(3, 0, 0) | (1 << 16)) >>> 0);
  });

  it('keeps read-only registers read-only', () => {
    const { m } = setup();
    cfgWrite(m, 3, 0, 0x00, 4, 0);
    expect(cfgRead(m, 3, 0, 0x00)).toBe(0x10011af4);
    cfgWrite(m, 3, 0, 0x3c, 1, 11);
    expect(cfgRead(m, 3, 0, 0x3c, 1)).toBe(11);
  });

  it('sizes BARs the way firmware does: all ones in, size mask and type bits out', () => {
    const { m } = setup();
    for (const [bar, want] of [[0, 0xffffffc1], [1, 0xfffff000], [4, 0xffffc004], [5, 0xffffffff], [2, 0]] as const) {
      cfgWrite(m, 3, 0, 0x10 + 4 * bar, 4, 0xffffffff);
      expect(cfgRead(m, 3, 0, 0x10 + 4 * bar) >>> 0, `BAR ${bar}`).toBe(want);
    }
  });

  it('maps a BAR only while its space is enabled and it holds an address, and unmaps it on unplug', () => {
    const { m, bus, f } = setup();
    cfgWrite(m, 3, 0, 0x10, 4, 0xc000);
    cfgWrite(m, 3, 0, 0x14, 4, 0xfebf0000);
    cfgWrite(m, 3, 0, 0x20, 4, 0xfe000000);
    cfgWrite(m, 3, 0, 0x24, 4, 0x1);
    expect(m.portRead(0xc000, 2)).toBe(0xffff); // not enabled yet
    cfgWrite(m, 3, 0, 0x04, 2, PCI_COMMAND_IO);
    expect(m.portRead(0xc000, 2)).toBe(0x1234);
    expect(m.memRead(0xfebf0000, 1)[0]).toBe(0xff);
    cfgWrite(m, 3, 0, 0x04, 2, PCI_COMMAND_IO | PCI_COMMAND_MEMORY);
    expect(m.memRead(0xfebf0000, 1)[0]).toBe(0xcd);
    expect(f.barAddress(4)).toBe(0x1fe000000);
    expect(m.memRead(0x1fe000000, 1)[0]).toBe(0x77);
    // Moving a BAR moves its mapping.
    cfgWrite(m, 3, 0, 0x10, 4, 0xd000);
    expect(m.portRead(0xc000, 2)).toBe(0xffff);
    expect(m.portRead(0xd000, 2)).toBe(0x1234);
    cfgWrite(m, 3, 0, 0x04, 2, 0);
    expect(m.portRead(0xd000, 2)).toBe(0xffff);
    cfgWrite(m, 3, 0, 0x04, 2, PCI_COMMAND_IO | PCI_COMMAND_MEMORY);
    bus.unplug(f);
    expect(m.portRead(0xd000, 2)).toBe(0xffff);
    expect(cfgRead(m, 3, 0, 0x00)).toBe(0xffffffff);
  });

  it('refuses taken and out-of-range addresses, naming the user', () => {
    const { bus } = setup();
    const g = new PciFunction('other-dev', { vendor: 0x8086, device: 0x7010, classCode: 0x010180 });
    expect(() => bus.plug(3, 0, g)).toThrow(/other-dev: PCI slot 3 function 0 is in use by test-dev/);
    expect(() => bus.plug(32, 0, g)).toThrow(/out of range/);
    expect(bus.freeSlot(3)).toBe(4);
    expect(() => g.addBar(0, { size: 24, kind: 'io', region: reg('x', 0) })).toThrow(/power of two/);
  });
});
