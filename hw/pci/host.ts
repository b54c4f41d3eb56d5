/**
 * The PCI host bridge's configuration mechanism #1: the address at port 0xCF8 (enable bit,
 * bus, device, function, register), the data at 0xCFC..0xCFF. Bus 0 only, as on QEMU's pc
 * machine without bridges. Absent functions read as all ones.
 */
import type { AccessSize, IoRegion } from '../core/address-space.js';
import { HwError } from '../core/error.js';
import type { Machine } from '../core/machine.js';
import type { PciFunction } from './pci-device.js';

export class PciBus {
  /** Functions by devfn (slot << 3 | fn). */
  private readonly fns = new Map<number, PciFunction>();
  private address = 0;
  /** How many functions assert each of PIRQ A-D (the lines are wired-OR). */
  private readonly pirqCount = [0, 0, 0, 0];
  /** Where a PIRQ line's level goes (the chipset's routing); set by the machine. */
  onPirq: ((pirq: number, level: boolean) => void) | null = null;

  constructor(private readonly machine: Machine) {
    const addrPort: IoRegion = {
      name: 'pci-conf-addr',
      read: (off, size) => (size === 4 && off === 0 ? this.address >>> 0 : 0xffffffff >>> (32 - 8 * size)),
      write: (off, size, v) => {
        if (size === 4 && off === 0) this.address = v >>> 0;
      },
    };
    const dataPort: IoRegion = {
      name: 'pci-conf-data',
      read: (off, size) => this.dataRead(off, size),
      write: (off, size, v) => this.dataWrite(off, size, v),
    };
    machine.io.map(0xcf8, 4, addrPort);
    machine.io.map(0xcfc, 4, dataPort);
  }

  /** Plugs `f` in at slot.fn; refuses a taken address. */
  plug(slot: number, fn: number, f: PciFunction): void {
    if (!Number.isInteger(slot) || slot < 0 || slot > 31 || !Number.isInteger(fn) || fn < 0 || fn > 7) {
      throw new HwError('EINVAL', `${f.name}: PCI address ${slot}.${fn} is out of range (slot 0-31, function 0-7)`);
    }
    const devfn = (slot << 3) | fn;
    const other = this.fns.get(devfn);
    if (other) throw new HwError('EBUSY', `${f.name}: PCI slot ${slot} function ${fn} is in use by ${other.name}`);
    this.fns.set(devfn, f);
    f.attach(this.machine, (fn, level) => this.intx(devfn, fn, level));
  }

  /**
   * INTx of the function at devfn: pin swizzled by slot onto PIRQ A-D as QEMU's i440FX does
   * (and firmware's routing tables say): slot 1 INTA is PIRQA.
   */
  private intx(devfn: number, f: PciFunction, level: boolean): void {
    const pin = f.config[0x3d]!;
    if (pin < 1 || pin > 4) return;
    const pirq = ((devfn >> 3) + pin - 2) & 3;
    const before = this.pirqCount[pirq]! > 0;
    this.pirqCount[pirq]! += level ? 1 : -1;
    const after = this.pirqCount[pirq]! > 0;
    if (before !== after) this.onPirq?.(pirq, after);
  }

  /** Whether PIRQ `n` is asserted. */
  pirqLevel(n: number): boolean {
    return this.pirqCount[n]! > 0;
  }

  unplug(f: PciFunction): void {
    for (const [k, v] of this.fns) {
      if (v === f) {
        this.fns.delete(k);
        f.detach();
      }
    }
  }

  /** Slots with at least one function plugged. */
  occupiedSlots(): Set<number> {
    const out = new Set<number>();
    for (const devfn of this.fns.keys()) out.add(devfn >> 3);
    return out;
  }

  /** The lowest free slot from `from` (function 0 free), or -1. */
  freeSlot(from = 0): number {
    for (let s = from; s < 32; s++) if (!this.fns.has(s << 3)) return s;
    return -1;
  }

  private target(): { f: PciFunction; reg: number } | undefined {
    const a = this.address;
    if (!(a & 0x80000000) || ((a >>> 16) & 0xff) !== 0) return undefined;
    const f = this.fns.get((a >>> 8) & 0xff);
    return f ? { f, reg: a & 0xfc } : undefined;
  }

  private dataRead(off: number, size: AccessSize): number {
    const t = this.target();
    if (!t) return 0xffffffff >>> (32 - 8 * size);
    return t.f.configRead(t.reg + off, size);
  }

  private dataWrite(off: number, size: AccessSize, v: number): void {
    const t = this.target();
    if (t) t.f.configWrite(t.reg + off, size, v);
  }
}
