/**
 * QEMU's `pc` machine, as far as Spindle builds it: RAM, the IOAPIC's 24 input lines (what
 * qtest intercepts as 'ioapic'), fw_cfg, and the i440FX/PIIX3 chipset on PCI bus 0. There is
 * no CPU here: qtest, or the CPU adapter, plays the guest.
 */
import { FwCfg } from '../core/fw-cfg.js';
import type { Device } from '../core/machine.js';
import { AcpiPciHotplug } from './acpi-pcihp.js';
import type { GpioIn } from '../core/irq.js';
import { Machine } from '../core/machine.js';
import { HwError } from '../core/error.js';
import { I440fx } from '../pci/i440fx.js';

export interface PcOptions {
  /** Guest RAM in bytes (default 128 MiB, as QEMU's). */
  ramSize?: number;
  /** The RAM itself, when a CPU already has it (ramSize bytes). */
  ram?: Uint8Array;
  /** Whether MSI writes reach the CPU (default true). */
  msi?: boolean;
  /** Whether the CPU has system-management mode (default true; v86 has none). */
  smm?: boolean;
}

/** Above this, RAM would run into the 32-bit PCI hole (no high-memory split yet). */
const MAX_RAM = 3 * 2 ** 30;

export class PcMachine extends Machine {
  readonly ioapic: GpioIn;
  readonly chipset: I440fx;
  readonly fwCfg: FwCfg;
  /** Levels of the IOAPIC's input lines (no CPU takes interrupts yet). */
  readonly irqLevels = new Uint8Array(24);
  readonly hotplug: AcpiPciHotplug;
  /** PCI slots by the device that took them when it was added. */
  private readonly slotsOf = new Map<string, number[]>();
  /** Unplugs asked and not yet done, by device id. */
  private readonly unplugging = new Map<string, () => void>();

  constructor(opts: PcOptions = {}) {
    const ramSize = opts.ramSize ?? 128 << 20;
    if (ramSize > MAX_RAM) throw new HwError('ERANGE', `ram size ${ramSize} is above the ${MAX_RAM} bytes the pc machine supports`);
    super({ ramSize, ...(opts.ram ? { ram: opts.ram } : {}), ...(opts.msi !== undefined ? { msi: opts.msi } : {}) });
    this.ioapic = this.addGpioIn('ioapic', 'unnamed-gpio-in', 24, (n, level) => void (this.irqLevels[n] = level ? 1 : 0));
    this.fwCfg = new FwCfg({ ramSize });
    this.fwCfg.attach(this);
    this.chipset = new I440fx(this, this.ioapic, { smm: opts.smm ?? true, biosInRam: opts.smm === false });
    this.hotplug = new AcpiPciHotplug(this.io, this.ioapic, (slot) => this.ejected(slot));
  }

  /** Plugs a device; the PCI slots it takes are remembered (and may be hot-removed). */
  override addDevice(dev: Device): void {
    const before = this.chipset.bus.occupiedSlots();
    super.addDevice(dev);
    const slots = [...this.chipset.bus.occupiedSlots()].filter((s) => !before.has(s));
    this.slotsOf.set(dev.id, slots);
    for (const s of slots) this.hotplug.setRemovable(s, true);
  }

  override removeDevice(id: string): void {
    super.removeDevice(id);
    for (const s of this.slotsOf.get(id) ?? []) this.hotplug.setRemovable(s, false);
    this.slotsOf.delete(id);
    const done = this.unplugging.get(id);
    this.unplugging.delete(id);
    done?.();
  }

  /** Plugs a device into the running machine and tells the guest (ACPI hotplug). */
  hotplugDevice(dev: Device): void {
    this.addDevice(dev);
    for (const s of this.slotsOf.get(dev.id) ?? []) this.hotplug.plugged(s);
  }

  /**
   * Asks for a device to go. A PCI device goes when the guest ejects its slot; anything else
   * goes at once. `deleted` runs when it is gone (QMP's DEVICE_DELETED).
   */
  unplugRequest(id: string, deleted: () => void): void {
    if (!this.device(id)) throw new HwError('ENOENT', `Device '${id}' not found`);
    const slots = this.slotsOf.get(id) ?? [];
    if (!slots.length) {
      this.removeDevice(id);
      deleted();
      return;
    }
    this.unplugging.set(id, deleted);
    for (const s of slots) this.hotplug.requestUnplug(s);
  }

  /** Forgets unplug requests still waiting for the guest (the machine is going away). */
  cancelUnplugRequests(): void {
    this.unplugging.clear();
  }

  private ejected(slot: number): void {
    for (const [id, slots] of this.slotsOf) if (slots.includes(slot)) return this.removeDevice(id);
  }
}
