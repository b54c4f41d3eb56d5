/**
 * QEMU's `pc` machine, as far as Spindle builds it: RAM, the IOAPIC's 24 input lines (what
 * qtest intercepts as 'ioapic'), fw_cfg, and the i440FX/PIIX3 chipset on PCI bus 0. There is
 * no CPU here: qtest, or the CPU adapter, plays the guest.
 */
import { FwCfg } from '../core/fw-cfg.js';
import type { GpioIn } from '../core/irq.js';
import { Machine } from '../core/machine.js';
import { HwError } from '../core/error.js';
import { I440fx } from '../pci/i440fx.js';

export interface PcOptions {
  /** Guest RAM in bytes (default 128 MiB, as QEMU's). */
  ramSize?: number;
}

/** Above this, RAM would run into the 32-bit PCI hole (no high-memory split yet). */
const MAX_RAM = 3 * 2 ** 30;

export class PcMachine extends Machine {
  readonly ioapic: GpioIn;
  readonly chipset: I440fx;
  readonly fwCfg: FwCfg;
  /** Levels of the IOAPIC's input lines (no CPU takes interrupts yet). */
  readonly irqLevels = new Uint8Array(24);

  constructor(opts: PcOptions = {}) {
    const ramSize = opts.ramSize ?? 128 << 20;
    if (ramSize > MAX_RAM) throw new HwError('ERANGE', `ram size ${ramSize} is above the ${MAX_RAM} bytes the pc machine supports`);
    super({ ramSize });
    this.ioapic = this.addGpioIn('ioapic', 'unnamed-gpio-in', 24, (n, level) => void (this.irqLevels[n] = level ? 1 : 0));
    this.fwCfg = new FwCfg({ ramSize });
    this.fwCfg.attach(this);
    this.chipset = new I440fx(this, this.ioapic);
  }
}
