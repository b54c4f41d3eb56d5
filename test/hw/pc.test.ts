// QEMU's pc machine as Spindle lays it out: the PCI functions where QEMU puts them, fw_cfg
// as libqos reads it, and PCI interrupts routed through the PIIX3 to the IOAPIC's lines.
import { describe, expect, it } from 'vitest';
import type { AccessSize } from '../../hw/core/address-space.js';
import { FW_CFG } from '../../hw/core/fw-cfg.js';
import { PcMachine } from '../../hw/pc/pc.js';
import { PciFunction } from '../../hw/pci/pci-device.js';

function cfg(m: PcMachine, slot: number, fn: number, reg: number, size: AccessSize = 4, write?: number): number {
  m.portWrite(0xcf8, 4, (0x80000000 | (slot << 11) | (fn << 8) | (reg & 0xfc)) >>> 0);
  if (write !== undefined) {
    m.portWrite(0xcfc + (reg & 3), size, write);
    return 0;
  }
  return m.portRead(0xcfc + (reg & 3), size);
}
function fwCfgRead(m: PcMachine, key: number, len: number): Uint8Array {
  m.portWrite(0x510, 2, key);
  return Uint8Array.from({ length: len }, () => m.portRead(0x511, 1));
}

describe('pc machine', () => {
  it('has the i440FX host at 00.0 and the PIIX3 functions at 01.0 and 01.3, nothing at 02.0', () => {
    const m = new PcMachine({ ramSize: 64 << 20 });
    expect(cfg(m, 0, 0, 0)).toBe(0x12378086);
    expect(cfg(m, 0, 0, 0x08) >>> 8).toBe(0x060000);
    expect(cfg(m, 1, 0, 0)).toBe(0x70008086);
    expect(cfg(m, 1, 0, 0x0e, 1)).toBe(0x80); // multi-function
    expect(cfg(m, 1, 3, 0)).toBe(0x71138086);
    expect(cfg(m, 2, 0, 0)).toBe(0xffffffff);
  });

  it('answers fw_cfg as QEMU does: signature, RAM size, CPU count, an empty file directory', () => {
    const m = new PcMachine({ ramSize: 64 << 20 });
    expect(new TextDecoder().decode(fwCfgRead(m, FW_CFG.SIGNATURE, 4))).toBe('QEMU');
    const ram = fwCfgRead(m, FW_CFG.RAM_SIZE, 8);
    expect(Buffer.from(ram).readBigUInt64LE(0)).toBe(64n << 20n);
    expect(fwCfgRead(m, FW_CFG.NB_CPUS, 2)).toEqual(Uint8Array.of(1, 0));
    expect(fwCfgRead(m, FW_CFG.FILE_DIR, 4)).toEqual(Uint8Array.of(0, 0, 0, 0));
    // Past the end of an item, and for an unknown key: zeroes.
    expect(fwCfgRead(m, FW_CFG.SIGNATURE, 6).subarray(4)).toEqual(Uint8Array.of(0, 0));
    expect(fwCfgRead(m, 0x1234, 2)).toEqual(Uint8Array.of(0, 0));
    m.fwCfg.addFile('etc/test', Uint8Array.of(9, 8, 7));
    const dir = Buffer.from(fwCfgRead(m, FW_CFG.FILE_DIR, 4 + 64));
    expect(dir.readUInt32BE(0)).toBe(1);
    expect(dir.readUInt32BE(4)).toBe(3);
    expect(fwCfgRead(m, dir.readUInt16BE(8), 3)).toEqual(Uint8Array.of(9, 8, 7));
    expect(dir.subarray(12, 20).toString()).toBe('etc/test');
    expect(() => new PcMachine({ ramSize: 4 * 2 ** 30 })).toThrow(/ram size/);
  });

  it("maps the PIIX4 PM block where firmware puts it, with a running 24-bit PM timer, ACPI enable and S5 power-off; SMM says 'done' where there is none", () => {
    const m = new PcMachine({ ramSize: 64 << 20, smm: false });
    expect(cfg(m, 1, 3, 0x00)).toBe(0x71138086);
    expect(cfg(m, 1, 3, 0x58) >>> 24).toBe(0x02); // DEVACTB APMC enable: firmware skips SMM setup
    expect(cfg(new PcMachine({ ramSize: 64 << 20 }), 1, 3, 0x58) >>> 24).toBe(0);
    expect(cfg(m, 0, 0, 0x58) >>> 8 & 0xff).toBe(0x10); // PAM0: the BIOS area is RAM under v86
    expect(m.portRead(0xb008, 4)).toBe(0xffffffff); // nothing mapped before PMREGMISC
    cfg(m, 1, 3, 0x40, 4, 0xb000);
    cfg(m, 1, 3, 0x80, 1, 1);
    const t1 = m.portRead(0xb008, 4);
    let t2 = t1;
    const start = performance.now();
    while (t2 === t1 && performance.now() - start < 1000) t2 = m.portRead(0xb008, 4);
    expect(t1).toBeLessThan(2 ** 24);
    expect((t2 - t1) & 0xffffff).toBeGreaterThan(0); // it runs forward
    expect(m.portRead(0xb004, 2) & 1).toBe(0);
    m.portWrite(0xb2, 1, 0xf1); // the OS asks for ACPI mode through APM_CNT: SCI_EN comes on
    expect(m.portRead(0xb004, 2)).toBe(0x0001);
    let off = 0;
    m.chipset.pm.onPowerOff = () => off++;
    m.portWrite(0xb004, 2, 0x2001 | (1 << 10)); // SLP_EN with sleep type 1 (S3): not done, and SLP_EN does not stick
    expect(off).toBe(0);
    expect(m.portRead(0xb004, 2)).toBe(0x0401);
    m.portWrite(0xb004, 2, 0x0001);
    m.portWrite(0xb004, 2, 0x2001); // type 0 is S5 in the firmware's tables: power off
    expect(off).toBe(1);
    expect(m.portRead(0xb004, 2)).toBe(0x0001);
    cfg(m, 1, 3, 0x40, 4, 0xc000); // moved: the old block goes
    expect(m.portRead(0xb004, 2)).toBe(0xffff);
    expect(m.portRead(0xc004, 2)).toBe(0x0001);
    cfg(m, 1, 3, 0x80, 1, 0);
    expect(m.portRead(0xc008, 4)).toBe(0xffffffff);
  });

  it('routes INTx through the PIRQ route registers to the IOAPIC lines, honouring INTx disable', () => {
    const m = new PcMachine({ ramSize: 64 << 20 });
    const dev = new PciFunction('test-dev', { vendor: 0x1af4, device: 0x1001, classCode: 0x010000, interruptPin: 1 });
    m.chipset.bus.plug(5, 0, dev); // slot 5, INTA: PIRQ (5 - 1 + 1 - 1) & 3 = A, as QEMU swizzles
    const seen: string[] = [];
    m.interceptIn('ioapic', (n, l) => seen.push(`${l ? 'raise' : 'lower'} ${n}`));
    dev.setIntx(true);
    expect(seen).toEqual([]); // PIRQA not routed after reset
    expect(cfg(m, 5, 0, 0x06, 2) & 0x08).toBe(0x08); // the status bit says pending
    cfg(m, 1, 0, 0x60, 1, 11); // PIRQA -> IRQ 11, as firmware programs it
    expect(seen).toEqual(['raise 11']);
    cfg(m, 5, 0, 0x04, 2, 0x400); // INTx disable
    expect(seen).toEqual(['raise 11', 'lower 11']);
    cfg(m, 5, 0, 0x04, 2, 0);
    dev.setIntx(false);
    expect(seen).toEqual(['raise 11', 'lower 11', 'raise 11', 'lower 11']);
    // Two functions on one PIRQ: the line stays up until both let go.
    const other = new PciFunction('other-dev', { vendor: 0x1af4, device: 0x1001, classCode: 0x010000, interruptPin: 4 });
    m.chipset.bus.plug(6, 0, other); // slot 6, INTD: (6 - 1 + 4 - 1) & 3 = A
    dev.setIntx(true);
    other.setIntx(true);
    dev.setIntx(false);
    expect(seen.at(-1)).toBe('raise 11');
    other.setIntx(false);
    expect(seen.at(-1)).toBe('lower 11');
    // Re-routing moves an asserted line.
    dev.setIntx(true);
    cfg(m, 1, 0, 0x60, 1, 10);
    expect(seen.slice(-3)).toEqual(['raise 11', 'lower 11', 'raise 10']);
    // Unplugging an asserting device lowers its line.
    m.chipset.bus.unplug(dev);
    expect(seen.at(-1)).toBe('lower 10');
  });
});
