/**
 * The i440FX chipset of QEMU's `pc` machine: the host bridge at 00.0 and the PIIX3 ISA
 * bridge at 01.0 (a multi-function device; its IDE function, 01.1, lives in hw/ide), with
 * the PIIX4 power-management function at 01.3. PCI interrupts reach the interrupt
 * controller through the PIIX3's PIRQ route registers (0x60-0x63: an ISA IRQ, or bit 7 set
 * for none, the value after reset).
 */
import type { GpioIn } from '../core/irq.js';
import type { Machine } from '../core/machine.js';
import { PciBus } from './host.js';
import { PciFunction } from './pci-device.js';
import { Piix4Pm } from './piix4-pm.js';

export const PIIX3_SLOT = 1;

export class I440fx {
  readonly bus: PciBus;
  readonly host: PciFunction;
  readonly isa: PciFunction;
  readonly pm: Piix4Pm;
  /** ISA IRQ levels driven by PCI interrupts, so a route change lowers what it no longer drives. */
  private readonly driven = new Uint8Array(16);

  constructor(machine: Machine, private readonly irqs: GpioIn, o: { smm?: boolean; biosInRam?: boolean } = {}) {
    this.bus = new PciBus(machine);
    this.host = new PciFunction('i440FX', { vendor: 0x8086, device: 0x1237, classCode: 0x060000, revision: 2 });
    // PAM (0x59-0x5f) and SMRAM (0x72): firmware's shadow-RAM and SMM windows. Where the
    // BIOS area is always RAM (v86), PAM0 says so, or firmware runs its shadowing code from a
    // flash alias that is not there.
    this.host.setWritable(0x59, 4, 0xffffffff);
    this.host.setWritable(0x5d, 3, 0xffffff);
    this.host.setWritable(0x72, 1, 0x78);
    this.host.config[0x72] = 0x02;
    if (o.biosInRam) this.host.config[0x59] = 0x10;
    this.isa = new PciFunction('PIIX3', { vendor: 0x8086, device: 0x7000, classCode: 0x060100 });
    this.isa.config[0x0e] = 0x80; // multi-function: the IDE and PM functions follow
    for (let r = 0x60; r <= 0x63; r++) this.isa.config[r] = 0x80;
    this.isa.setWritable(0x60, 4, 0x8f8f8f8f);
    this.pm = new Piix4Pm(machine, { smm: o.smm ?? true });
    this.bus.plug(0, 0, this.host);
    this.bus.plug(PIIX3_SLOT, 0, this.isa);
    this.bus.plug(PIIX3_SLOT, 3, this.pm.fn);
    this.bus.onPirq = () => this.route();
    // A write to the route registers re-routes at once.
    this.isa.onConfigWrite = (off, size) => {
      if (off < 0x64 && off + size > 0x60) this.route();
    };
  }

  /** The ISA IRQ PIRQ `n` goes to, or -1. */
  pirqRoute(n: number): number {
    const r = this.isa.config[0x60 + n]!;
    return r & 0x80 ? -1 : r & 0x0f;
  }

  private route(): void {
    const want = new Uint8Array(16);
    for (let p = 0; p < 4; p++) {
      const irq = this.pirqRoute(p);
      if (irq >= 0 && this.bus.pirqLevel(p)) want[irq] = 1;
    }
    // Lines that lose their source go down before new ones come up.
    for (const level of [0, 1]) {
      for (let irq = 0; irq < 16; irq++) {
        if (want[irq] === level && this.driven[irq] !== level) {
          this.driven[irq] = level;
          this.irqs.set(irq, level === 1);
        }
      }
    }
  }
}
