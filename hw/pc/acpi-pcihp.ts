/**
 * PCI hotplug as QEMU's pc machine offers it to the guest's ACPI code (the PIIX4 interface):
 * registers at 0xae00 (slots plugged "up", slots asked to go "down", an eject register the
 * guest writes when it has let a device go, hot-removable slots, bus select) and the GPE0
 * block at 0xafe0 whose bit 1 signals a hotplug event on the SCI (IRQ 9). An unplug request
 * only asks; the device goes when the guest writes its slot to the eject register.
 */
import type { AddressSpace, IoRegion } from '../core/address-space.js';
import type { GpioIn } from '../core/irq.js';

export const PCIHP_BASE = 0xae00;
export const GPE0_BASE = 0xafe0;
const SCI_IRQ = 9;
const GPE_PCI_HOTPLUG = 0x2;

export class AcpiPciHotplug {
  private up = 0;
  private down = 0;
  private removable = 0;
  private sel = 0;
  private gpeSts = 0;
  private gpeEn = 0;

  constructor(io: AddressSpace, private readonly irqs: GpioIn, private readonly eject: (slot: number) => void) {
    const hp: IoRegion = {
      name: 'acpi-pci-hotplug',
      read: (off) => (off === 0 ? this.up : off === 4 ? this.down : off === 0xc ? this.removable : off === 0x10 ? this.sel : 0) >>> 0,
      write: (off, _size, v) => {
        if (off === 8) this.ejectSlots(v >>> 0);
        else if (off === 0x10) this.sel = v;
      },
    };
    const gpe: IoRegion = {
      name: 'acpi-gpe0',
      read: (off, size) => {
        const word = off < 2 ? this.gpeSts : this.gpeEn;
        const v = size === 4 && off === 0 ? this.gpeSts | (this.gpeEn << 16) : word >> (8 * (off & 1));
        return v & (size === 4 ? 0xffffffff : size === 2 ? 0xffff : 0xff);
      },
      write: (off, size, v) => {
        // Status bits are cleared by writing ones; enable bits are written.
        if (size === 4 && off === 0) {
          this.gpeSts &= ~(v & 0xffff);
          this.gpeEn = (v >>> 16) & 0xffff;
        } else if (off < 2) this.gpeSts &= ~((v << (8 * (off & 1))) & 0xffff);
        else this.gpeEn = size === 2 ? v & 0xffff : (this.gpeEn & ~(0xff << (8 * (off & 1)))) | ((v & 0xff) << (8 * (off & 1)));
        this.sci();
      },
    };
    io.map(PCIHP_BASE, 0x14, hp);
    io.map(GPE0_BASE, 4, gpe);
  }

  /** Slot `slot` may be hot-removed (a device the user plugged, at startup or later). */
  setRemovable(slot: number, on: boolean): void {
    this.removable = on ? this.removable | (1 << slot) : this.removable & ~(1 << slot);
  }

  /** A device arrived in `slot` while the machine runs: tell the guest. */
  plugged(slot: number): void {
    this.up |= 1 << slot;
    this.event();
  }

  /** Asks the guest to let go of the device in `slot`. */
  requestUnplug(slot: number): void {
    this.down |= 1 << slot;
    this.event();
  }

  /** Whether an unplug of `slot` was asked and has not completed. */
  unplugPending(slot: number): boolean {
    return (this.down & (1 << slot)) !== 0;
  }

  private ejectSlots(bits: number): void {
    for (let slot = 0; slot < 32; slot++) {
      const bit = 1 << slot;
      if (!(bits & bit) || !(this.removable & bit)) continue;
      this.up &= ~bit;
      this.down &= ~bit;
      this.removable &= ~bit;
      this.eject(slot);
    }
  }

  private event(): void {
    this.gpeSts |= GPE_PCI_HOTPLUG;
    this.sci();
  }

  private sci(): void {
    this.irqs.set(SCI_IRQ, (this.gpeSts & this.gpeEn) !== 0);
  }
}
