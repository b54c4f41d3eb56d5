/**
 * The emulated machine: guest RAM, the port-I/O and MMIO address spaces, interrupt lines,
 * the virtual clock and the devices plugged into it. Seen from the guest side (what qtest
 * drives) it is a set of bytes and registers; device models register into it on realize.
 */
import { AddressSpace, type AccessSize } from './address-space.js';
import { VirtualClock } from './clock.js';
import { HwError } from './error.js';
import { GpioIn, type LineHandler } from './irq.js';
import { GuestRam } from './memory.js';
import type { QtestTarget } from '../qtest/target.js';

/** A device model's lifecycle, as the machine sees it. */
export interface Device {
  readonly id: string;
  readonly type: string;
  /** Maps its regions and wires its lines; throws HwError (nothing left behind) on bad properties. */
  realize(m: Machine): void;
  /** Undoes realize. */
  unrealize(m: Machine): void;
}

export interface MachineOptions {
  /** Guest RAM in bytes (default 128 MiB). */
  ramSize?: number;
  /** The RAM itself, when a CPU already has it (ramSize bytes). */
  ram?: Uint8Array;
  /** Whether MSI writes reach the CPU (default true); devices fall back to INTx when not. */
  msi?: boolean;
}

/** Above RAM: the 32-bit PCI hole and beyond; MMIO may be mapped anywhere below 2^52. */
const MMIO_LIMIT = 2 ** 52;

/** Also what the qtest server drives (hw/qtest/target.ts). */
export class Machine implements QtestTarget {
  readonly ram: GuestRam;
  readonly io = new AddressSpace('port I/O', 0x10000);
  readonly mmio = new AddressSpace('MMIO', MMIO_LIMIT);
  readonly clock = new VirtualClock();
  /** Whether MSI writes reach the CPU (QEMU's msi_nonbroken): without it, devices use INTx. */
  readonly msi: boolean;
  private readonly devices = new Map<string, Device>();
  /** GPIO-in groups by owner path ('ioapic', or a device id). */
  private readonly gpioIns = new Map<string, GpioIn[]>();
  /** Output lines by owner path, for irq_intercept_out. */
  private readonly gpioOuts = new Map<string, { name: string; lines: { redirect(cb: (level: boolean) => void): void }[] }[]>();

  constructor(opts: MachineOptions = {}) {
    this.ram = new GuestRam(opts.ramSize ?? 128 << 20, opts.ram);
    this.msi = opts.msi ?? true;
  }

  // ---- devices ----

  addDevice(dev: Device): void {
    if (!/^[A-Za-z][A-Za-z0-9._-]*$/.test(dev.id)) throw new HwError('EINVAL', `Parameter 'id' expects an identifier (letters, digits, '-', '.', '_', starting with a letter), not '${dev.id}'`);
    if (this.devices.has(dev.id)) throw new HwError('EEXIST', `Duplicate device ID '${dev.id}'`);
    dev.realize(this);
    this.devices.set(dev.id, dev);
  }

  removeDevice(id: string): void {
    const dev = this.devices.get(id);
    if (!dev) throw new HwError('ENOENT', `Device '${id}' not found`);
    dev.unrealize(this);
    this.devices.delete(id);
    this.gpioIns.delete(id);
    this.gpioOuts.delete(id);
  }

  device(id: string): Device | undefined {
    return this.devices.get(id);
  }

  allDevices(): Device[] {
    return [...this.devices.values()];
  }

  // ---- interrupt lines ----

  /** Registers a group of input lines under `owner` (a device id, or 'ioapic'). */
  addGpioIn(owner: string, name: string, count: number, handler: LineHandler): GpioIn {
    const g = new GpioIn(name, count, handler);
    const list = this.gpioIns.get(owner) ?? [];
    list.push(g);
    this.gpioIns.set(owner, list);
    return g;
  }

  /** Registers named output lines under `owner`, so a test can intercept them. */
  addGpioOut(owner: string, name: string, lines: { redirect(cb: (level: boolean) => void): void }[]): void {
    const list = this.gpioOuts.get(owner) ?? [];
    list.push({ name, lines });
    this.gpioOuts.set(owner, list);
  }

  /** QOM-like paths: 'ioapic', '/machine/ioapic', '/machine/peripheral/disk0' all name their last part. */
  private owner(path: string): string {
    const last = path.split('/').filter(Boolean).pop() ?? '';
    return last;
  }

  // ---- the guest side (qtest) ----

  portRead(addr: number, size: AccessSize): number {
    return this.io.read(addr, size);
  }

  portWrite(addr: number, size: AccessSize, value: number): void {
    this.io.write(addr, size, value);
  }

  memRead(addr: number, len: number): Uint8Array {
    const out = new Uint8Array(len);
    if (this.ram.contains(addr, len)) {
      out.set(this.ram.bytes.subarray(addr, addr + len));
      return out;
    }
    const m = this.mmio.find(addr);
    if (m && (len === 1 || len === 2 || len === 4 || len === 8) && addr + len <= m.base + m.size) {
      // One register access (a 64-bit one as two 32-bit halves, low first).
      const dv = new DataView(out.buffer);
      if (len === 8) {
        dv.setUint32(0, m.region.read(addr - m.base, 4) >>> 0, true);
        dv.setUint32(4, m.region.read(addr - m.base + 4, 4) >>> 0, true);
      } else {
        const v = m.region.read(addr - m.base, len) >>> 0;
        for (let i = 0; i < len; i++) out[i] = (v >>> (8 * i)) & 0xff;
      }
      return out;
    }
    for (let i = 0; i < len; i++) out[i] = this.readByte(addr + i);
    return out;
  }

  memWrite(addr: number, data: Uint8Array): void {
    const len = data.length;
    if (this.ram.contains(addr, len)) {
      this.ram.bytes.set(data, addr);
      return;
    }
    const m = this.mmio.find(addr);
    if (m && (len === 1 || len === 2 || len === 4 || len === 8) && addr + len <= m.base + m.size) {
      const dv = new DataView(data.buffer, data.byteOffset, len);
      if (len === 8) {
        m.region.write(addr - m.base, 4, dv.getUint32(0, true));
        m.region.write(addr - m.base + 4, 4, dv.getUint32(4, true));
      } else {
        let v = 0;
        for (let i = len - 1; i >= 0; i--) v = v * 256 + data[i]!;
        m.region.write(addr - m.base, len, v);
      }
      return;
    }
    for (let i = 0; i < len; i++) this.writeByte(addr + i, data[i]!);
  }

  private readByte(addr: number): number {
    if (this.ram.contains(addr, 1)) return this.ram.bytes[addr]!;
    return this.mmio.read(addr, 1);
  }

  private writeByte(addr: number, v: number): void {
    if (this.ram.contains(addr, 1)) this.ram.bytes[addr] = v;
    else this.mmio.write(addr, 1, v);
  }

  clockStep(ns?: number): number {
    return this.clock.step(ns);
  }

  clockSet(ns: number): number {
    return this.clock.set(ns);
  }

  interceptIn(path: string, cb: LineHandler): void {
    const groups = this.gpioIns.get(this.owner(path));
    if (!groups?.length) throw new HwError('ENOENT', `Cannot find '${path}' to intercept its input lines`);
    // Lines of all the device's groups, numbered on as QEMU numbers a device's GPIO-ins.
    let base = 0;
    for (const g of groups) {
      const first = base;
      if (!g.interceptWith((line, level) => cb(first + line, level))) throw new HwError('EBUSY', 'IRQ intercept already enabled');
      base += g.count;
    }
  }

  interceptOut(path: string, name: string | undefined, cb: LineHandler): void {
    const groups = (this.gpioOuts.get(this.owner(path)) ?? []).filter((g) => name === undefined || g.name === name);
    if (!groups.length) throw new HwError('ENOENT', `Cannot find output lines${name ? ` '${name}'` : ''} of '${path}'`);
    let base = 0;
    for (const g of groups) {
      const first = base;
      g.lines.forEach((l, i) => l.redirect((level) => cb(first + i, level)));
      base += g.lines.length;
    }
  }

  setIrqIn(path: string, name: string, line: number, level: number): void {
    const g = this.gpioIns.get(this.owner(path))?.find((x) => x.name === name);
    if (!g) throw new HwError('ENOENT', `No input lines '${name}' on '${path}'`);
    g.set(line, level !== 0);
  }
}
