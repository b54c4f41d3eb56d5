/**
 * The PIIX3 IDE function (00:01.1, 8086:7010): two channels at the legacy ISA ports
 * (0x1f0-0x1f7/0x3f6 on IRQ 14, 0x170-0x177/0x376 on IRQ 15) and the bus-master registers
 * in BAR4. Drives plug in by channel and unit.
 */
import type { IoRegion } from '../core/address-space.js';
import type { GpioIn } from '../core/irq.js';
import type { Device, Machine } from '../core/machine.js';
import { HwError } from '../core/error.js';
import type { PciBus } from '../pci/host.js';
import { PciFunction } from '../pci/pci-device.js';
import { BmDma } from './bmdma.js';
import { IdeChannel, IdeDrive } from './core.js';

export { IdeDrive };

const LEGACY = [
  { cmd: 0x1f0, ctl: 0x3f6, irq: 14 },
  { cmd: 0x170, ctl: 0x376, irq: 15 },
] as const;

export class PiixIde implements Device {
  readonly type = 'piix3-ide';
  readonly id: string;
  readonly pci: PciFunction;
  readonly channels: [IdeChannel, IdeChannel];
  readonly bm: [BmDma, BmDma];
  private readonly bus: PciBus;
  private realized = false;

  constructor(opts: { id: string; bus: PciBus; irqs: GpioIn }) {
    this.id = opts.id;
    this.bus = opts.bus;
    const mk = (n: 0 | 1): IdeChannel => new IdeChannel(`${opts.id} ide.${n}`, (level) => opts.irqs.set(LEGACY[n].irq, level));
    this.channels = [mk(0), mk(1)];
    this.bm = [new BmDma(`${opts.id} ide.0`, this.channels[0]), new BmDma(`${opts.id} ide.1`, this.channels[1])];
    this.pci = new PciFunction(`${opts.id} (piix3-ide)`, { vendor: 0x8086, device: 0x7010, classCode: 0x010180 });
    this.pci.setWritable(0x40, 4, 0xffffffff); // IDETIM primary/secondary
    this.pci.setWritable(0x44, 1, 0xff); // SIDETIM
    this.pci.addBar(4, {
      size: 16,
      kind: 'io',
      region: {
        name: `${opts.id} BAR4`,
        read: (off, size) => this.bm[off >> 3]!.region.read(off & 7, size),
        write: (off, size, v) => this.bm[off >> 3]!.region.write(off & 7, size, v),
      },
    });
  }

  realize(m: Machine): void {
    const mapped: [number, IoRegion][] = [];
    try {
      this.channels.forEach((ch, n) => {
        m.io.map(LEGACY[n]!.cmd, 8, ch.cmdRegion);
        mapped.push([LEGACY[n]!.cmd, ch.cmdRegion]);
        m.io.map(LEGACY[n]!.ctl, 1, ch.ctlRegion);
        mapped.push([LEGACY[n]!.ctl, ch.ctlRegion]);
      });
      this.bus.plug(1, 1, this.pci);
    } catch (e) {
      for (const [base, r] of mapped) m.io.unmap(base, r);
      throw e;
    }
    for (const b of this.bm) b.ram = m.ram;
    this.realized = true;
  }

  unrealize(m: Machine): void {
    for (const n of [0, 1] as const) {
      for (const u of [0, 1] as const) if (this.channels[n].drives[u]) this.channels[n].detach(u);
      m.io.unmap(LEGACY[n].cmd, this.channels[n].cmdRegion);
      m.io.unmap(LEGACY[n].ctl, this.channels[n].ctlRegion);
    }
    this.bus.unplug(this.pci);
    for (const b of this.bm) b.ram = null;
    this.realized = false;
  }

  /** Plugs a drive: bus 0|1 (ide.0/ide.1), unit 0|1 (master/slave). */
  attach(bus: 0 | 1, unit: 0 | 1, drive: IdeDrive): void {
    this.check(bus, unit);
    this.channels[bus].attach(unit, drive);
  }

  detach(bus: 0 | 1, unit: 0 | 1): void {
    this.check(bus, unit);
    this.channels[bus].detach(unit);
  }

  get isRealized(): boolean {
    return this.realized;
  }

  private check(bus: number, unit: number): void {
    if ((bus !== 0 && bus !== 1) || (unit !== 0 && unit !== 1)) throw new HwError('EINVAL', `${this.id}: no IDE position bus ${bus} unit ${unit} (bus 0-1, unit 0-1)`);
  }
}
