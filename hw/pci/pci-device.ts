/**
 * A PCI function: its 256-byte configuration space with the type-0 header, BAR sizing and
 * mapping. A BAR is mapped into port I/O or MMIO only while the command register enables
 * that space and the BAR holds a real address, as the PCI spec has it.
 */
import type { IoRegion } from '../core/address-space.js';
import type { Machine } from '../core/machine.js';

export const PCI_COMMAND_IO = 0x1;
export const PCI_COMMAND_MEMORY = 0x2;
export const PCI_COMMAND_MASTER = 0x4;
export const PCI_COMMAND_INTX_DISABLE = 0x400;

export interface BarSpec {
  /** Bytes, a power of two (at least 4 for I/O, 16 for memory). */
  size: number;
  kind: 'io' | 'mem32' | 'mem64';
  region: IoRegion;
}

export interface PciIds {
  vendor: number;
  device: number;
  /** class << 16 | subclass << 8 | prog-if */
  classCode: number;
  revision?: number;
  subsystemVendor?: number;
  subsystem?: number;
  /** 1..4 for INTA..INTD; 0 for none. */
  interruptPin?: number;
}

interface Bar extends BarSpec {
  /** Where it is mapped now (-1: not mapped). */
  mapped: number;
}

export class PciFunction {
  readonly config = new Uint8Array(256);
  /** Bits of the config space the guest may change (1 = writable). */
  private readonly wmask = new Uint8Array(256);
  private readonly bars: (Bar | undefined)[] = [];
  private machine: Machine | null = null;
  /** Where INTx goes (set by the bus when plugged). */
  private intxSink: ((f: PciFunction, level: boolean) => void) | null = null;
  private intxLevel = false;
  /** Device-specific registers react here to guest writes (after the write mask applied). */
  onConfigWrite: ((off: number, size: number) => void) | null = null;

  constructor(readonly name: string, ids: PciIds) {
    const c = new DataView(this.config.buffer);
    c.setUint16(0x00, ids.vendor, true);
    c.setUint16(0x02, ids.device, true);
    c.setUint8(0x08, ids.revision ?? 0);
    c.setUint8(0x09, ids.classCode & 0xff);
    c.setUint16(0x0a, ids.classCode >>> 8, true);
    c.setUint16(0x2c, ids.subsystemVendor ?? 0, true);
    c.setUint16(0x2e, ids.subsystem ?? 0, true);
    c.setUint8(0x3d, ids.interruptPin ?? 0);
    this.setWritable(0x04, 2, PCI_COMMAND_IO | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_INTX_DISABLE);
    this.setWritable(0x0c, 1, 0xff); // cache line size
    this.setWritable(0x0d, 1, 0xff); // latency timer
    this.setWritable(0x3c, 1, 0xff); // interrupt line (firmware's note to the OS)
  }

  /** Makes `bytes` bytes at `off` writable under `mask` (little-endian). */
  setWritable(off: number, bytes: number, mask: number): void {
    for (let i = 0; i < bytes; i++) this.wmask[off + i] = (mask >>> (8 * i)) & 0xff;
  }

  /** Declares BAR `n` (0..5; a 64-bit BAR takes n and n+1). */
  addBar(n: number, spec: BarSpec): void {
    const { size, kind } = spec;
    if (n < 0 || n > 5 || (kind === 'mem64' && n > 4)) throw new RangeError(`${this.name}: no BAR ${n} for a ${kind} BAR`);
    if (size & (size - 1) || size < (kind === 'io' ? 4 : 16)) throw new RangeError(`${this.name}: BAR ${n} size ${size} is not a power of two of at least ${kind === 'io' ? 4 : 16}`);
    this.bars[n] = { ...spec, mapped: -1 };
    const off = 0x10 + 4 * n;
    const low = kind === 'io' ? 0x1 : kind === 'mem64' ? 0x4 : 0x0;
    new DataView(this.config.buffer).setUint32(off, low, true);
    // The address bits above the size are writable; sizing reads back ~(size-1) | flags.
    const mask = size >= 2 ** 32 ? 0 : ~(size - 1) >>> 0;
    this.setWritable(off, 4, mask & (kind === 'io' ? ~0x3 : ~0xf));
    if (kind === 'mem64') this.setWritable(off + 4, 4, size > 2 ** 32 ? ~(size / 2 ** 32 - 1) >>> 0 : 0xffffffff);
  }

  /** Called by the bus when the function is plugged in. */
  attach(m: Machine, intx: (f: PciFunction, level: boolean) => void): void {
    this.machine = m;
    this.intxSink = intx;
  }

  detach(): void {
    for (const b of this.bars) if (b) this.unmapBar(b);
    if (this.intxLevel) this.intxSink?.(this, false);
    this.intxLevel = false;
    this.machine = null;
    this.intxSink = null;
  }

  /**
   * The device's interrupt condition. The status register's interrupt bit follows it; the
   * pin is asserted only while the command register does not disable INTx.
   */
  setIntx(level: boolean): void {
    this.config[0x06] = level ? this.config[0x06]! | 0x08 : this.config[0x06]! & ~0x08;
    this.driveIntx();
  }

  private driveIntx(): void {
    const want = (this.config[0x06]! & 0x08) !== 0 && !(this.command() & PCI_COMMAND_INTX_DISABLE) && this.config[0x3d] !== 0;
    if (want === this.intxLevel) return;
    this.intxLevel = want;
    this.intxSink?.(this, want);
  }

  command(): number {
    return this.config[0x04]! | (this.config[0x05]! << 8);
  }

  configRead(off: number, size: 1 | 2 | 4): number {
    let v = 0;
    for (let i = size - 1; i >= 0; i--) v = v * 256 + (off + i < 256 ? this.config[off + i]! : 0xff);
    return v >>> 0;
  }

  configWrite(off: number, size: 1 | 2 | 4, value: number): void {
    for (let i = 0; i < size && off + i < 256; i++) {
      const m = this.wmask[off + i]!;
      const b = (value >>> (8 * i)) & 0xff;
      this.config[off + i] = (this.config[off + i]! & ~m) | (b & m);
    }
    if (off < 0x28 && off + size > 0x04) this.updateMappings();
    if (off <= 0x05 && off + size > 0x04) this.driveIntx();
    this.onConfigWrite?.(off, size);
  }

  /** The guest-programmed address of BAR `n`, or -1 if unset. */
  barAddress(n: number): number {
    const b = this.bars[n];
    if (!b) return -1;
    const dv = new DataView(this.config.buffer);
    const lo = dv.getUint32(0x10 + 4 * n, true);
    if (b.kind === 'io') return lo & ~0x3;
    const addr = (lo & ~0xf) >>> 0;
    return b.kind === 'mem64' ? addr + dv.getUint32(0x14 + 4 * n, true) * 2 ** 32 : addr;
  }

  private updateMappings(): void {
    if (!this.machine) return;
    const cmd = this.command();
    this.bars.forEach((b, n) => {
      if (!b) return;
      const on = b.kind === 'io' ? cmd & PCI_COMMAND_IO : cmd & PCI_COMMAND_MEMORY;
      const addr = this.barAddress(n);
      // All ones written for sizing, or zero: not a place to decode.
      const valid = addr > 0 && addr + b.size <= (b.kind === 'io' ? 0x10000 : 2 ** 52) && addr !== ((~(b.size - 1) >>> 0) & (b.kind === 'io' ? ~0x3 : ~0xf)) >>> 0;
      const want = on && valid ? addr : -1;
      if (want === b.mapped) return;
      this.unmapBar(b);
      if (want >= 0) {
        try {
          (b.kind === 'io' ? this.machine!.io : this.machine!.mmio).map(want, b.size, b.region);
          b.mapped = want;
        } catch {
          // Overlapping another device: left unmapped, as a real bus would decode neither sanely.
        }
      }
    });
  }

  private unmapBar(b: Bar): void {
    if (b.mapped < 0 || !this.machine) return;
    (b.kind === 'io' ? this.machine.io : this.machine.mmio).unmap(b.mapped, b.region);
    b.mapped = -1;
  }
}
