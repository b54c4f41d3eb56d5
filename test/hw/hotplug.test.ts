// PCI hotplug on the pc machine as the guest's ACPI code sees it: an unplug request raises
// the SCI and sets the slot's "down" bit; the device goes only when the guest writes the
// eject register. Hotplugged devices show in "up". Driven over in-process qtest.
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { VirtioBlkPci } from '../../hw/block/virtio-blk.js';
import { PcMachine } from '../../hw/pc/pc.js';
import { createBackend } from '../../src/backend/backend.js';
import { openNode, unref } from '../../src/block/graph.js';
import { QPciBus } from '../../src/qos/pci.js';
import { QtestClient } from '../../src/qos/qtest-client.js';
import { scratchDir } from '../helpers/tmp.js';

const dir = scratchDir('spindle-hotplug-');

async function backend(name: string) {
  const path = join(dir, `${name}.img`);
  writeFileSync(path, Buffer.alloc(1 << 20));
  const node = await openNode({ driver: 'raw', file: { driver: 'file', filename: path } });
  const be = createBackend({ name }, node);
  unref(node);
  return be;
}

describe('ACPI PCI hotplug (pc)', () => {
  it('unplug is a request the guest completes by ejecting the slot; hotplug shows in the up register', async () => {
    const m = new PcMachine({ ramSize: 32 << 20 });
    const be = await backend('hp0');
    m.addDevice(new VirtioBlkPci({ id: 'disk0', drive: be, bus: m.chipset.bus, slot: 4 }));
    const qts = QtestClient.inProcess(m);
    await qts.irqInterceptIn('ioapic');
    await qts.outw(0xafe2, 0x2); // the guest enables the hotplug GPE
    expect(await qts.inl(0xae0c) & (1 << 4)).toBe(1 << 4); // slot 4 is hot-removable
    expect(await qts.inl(0xae0c) & (1 << 1)).toBe(0); // the PIIX3 is not
    let deleted = 0;
    m.unplugRequest('disk0', () => deleted++);
    expect(qts.getIrq(9)).toBe(true);
    expect(await qts.inl(0xae04)).toBe(1 << 4);
    expect(await qts.inw(0xafe0) & 0x2).toBe(0x2);
    // Asked, not gone: the device and its backend stay until the guest ejects.
    expect(m.device('disk0')).toBeDefined();
    expect(be.device).not.toBeNull();
    expect(deleted).toBe(0);
    // The guest acknowledges the event (SCI goes down) and ejects slot 4.
    await qts.outw(0xafe0, 0x2);
    expect(qts.getIrq(9)).toBe(false);
    await qts.outl(0xae08, 1 << 4);
    expect(deleted).toBe(1);
    expect(m.device('disk0')).toBeUndefined();
    expect(be.device).toBeNull();
    expect(await qts.inl(0xae04)).toBe(0);
    expect((await new QPciBus(qts).enumerate()).some(([devfn]) => devfn >> 3 === 4)).toBe(false);
    // Ejecting a slot that is not removable does nothing.
    await qts.outl(0xae08, 1 << 1);
    expect((await new QPciBus(qts).enumerate()).some(([devfn]) => devfn === 0x08)).toBe(true);
    // Hotplug: the new device is in "up" and raises the SCI.
    m.hotplugDevice(new VirtioBlkPci({ id: 'disk1', drive: be, bus: m.chipset.bus, slot: 5 }));
    expect(await qts.inl(0xae00)).toBe(1 << 5);
    expect(qts.getIrq(9)).toBe(true);
    expect((await new QPciBus(qts).enumerate()).some(([devfn]) => devfn >> 3 === 5)).toBe(true);
    expect(() => m.unplugRequest('nosuch', () => undefined)).toThrow(/Device 'nosuch' not found/);
    m.removeDevice('disk1');
    be.unref();
  });
});
