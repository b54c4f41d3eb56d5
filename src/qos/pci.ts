/**
 * PCI from the guest side: configuration space through mechanism #1 (ports 0xCF8/0xCFC),
 * enumeration of bus 0, and BAR assignment the way firmware does it (size by writing all
 * ones, place, enable). Only qtest commands are used.
 */
import type { QtestClient } from './qtest-client.js';

export interface BarMapping {
  bar: number;
  kind: 'io' | 'mem';
  addr: number;
  size: number;
}

export class QPciBus {
  /** Next free I/O port and MMIO address for BARs. */
  private ioNext = 0xc000;
  private memNext = 0xe0000000;

  constructor(readonly qts: QtestClient) {}

  private async select(devfn: number, reg: number): Promise<void> {
    await this.qts.outl(0xcf8, (0x80000000 | (devfn << 8) | (reg & 0xfc)) >>> 0);
  }

  async configRead(devfn: number, reg: number, size: 1 | 2 | 4): Promise<number> {
    await this.select(devfn, reg);
    const port = 0xcfc + (reg & 3);
    return size === 1 ? this.qts.inb(port) : size === 2 ? this.qts.inw(port) : this.qts.inl(port);
  }

  async configWrite(devfn: number, reg: number, size: 1 | 2 | 4, v: number): Promise<void> {
    await this.select(devfn, reg);
    const port = 0xcfc + (reg & 3);
    if (size === 1) await this.qts.outb(port, v);
    else if (size === 2) await this.qts.outw(port, v);
    else await this.qts.outl(port, v);
  }

  /** Every function on bus 0 as [devfn, vendor, device]. */
  async enumerate(): Promise<[number, number, number][]> {
    const out: [number, number, number][] = [];
    for (let slot = 0; slot < 32; slot++) {
      for (let fn = 0; fn < 8; fn++) {
        const devfn = (slot << 3) | fn;
        const id = await this.configRead(devfn, 0, 4);
        if (id === 0xffffffff || (id & 0xffff) === 0xffff) {
          if (fn === 0) break;
          continue;
        }
        out.push([devfn, id & 0xffff, id >>> 16]);
        if (fn === 0 && !((await this.configRead(devfn, 0x0e, 1)) & 0x80)) break;
      }
    }
    return out;
  }

  /** The first function with these ids, or undefined. */
  async find(vendor: number, device: number): Promise<QPciDevice | undefined> {
    const hit = (await this.enumerate()).find(([, v, d]) => v === vendor && d === device);
    return hit ? new QPciDevice(this, hit[0]) : undefined;
  }

  /** @internal Places a BAR of `size` bytes. */
  place(kind: 'io' | 'mem', size: number): number {
    if (kind === 'io') {
      const at = Math.ceil(this.ioNext / size) * size;
      this.ioNext = at + size;
      return at;
    }
    const at = Math.ceil(this.memNext / size) * size;
    this.memNext = at + size;
    return at;
  }
}

export class QPciDevice {
  constructor(readonly bus: QPciBus, readonly devfn: number) {}

  get slot(): number {
    return this.devfn >> 3;
  }

  config(reg: number, size: 1 | 2 | 4): Promise<number> {
    return this.bus.configRead(this.devfn, reg, size);
  }

  setConfig(reg: number, size: 1 | 2 | 4, v: number): Promise<void> {
    return this.bus.configWrite(this.devfn, reg, size, v);
  }

  /** Turns on I/O and memory decoding and bus mastering (DMA). */
  async enable(): Promise<void> {
    const cmd = await this.config(0x04, 2);
    await this.setConfig(0x04, 2, cmd | 0x7);
  }

  /** Sizes BAR `bar`, gives it an address, and returns where it is (enable() to decode it). */
  async mapBar(bar: number): Promise<BarMapping> {
    const reg = 0x10 + 4 * bar;
    const orig = await this.config(reg, 4);
    await this.setConfig(reg, 4, 0xffffffff);
    const probe = await this.config(reg, 4);
    const io = (orig & 1) === 1;
    const mask = io ? probe & ~0x3 : probe & ~0xf;
    if (mask === 0) throw new Error(`PCI ${this.slot}.${this.devfn & 7}: BAR ${bar} is not implemented`);
    const size = (~mask >>> 0) + 1;
    const addr = this.bus.place(io ? 'io' : 'mem', size);
    await this.setConfig(reg, 4, addr);
    if (!io && (orig & 0x6) === 0x4) await this.setConfig(reg + 4, 4, 0); // 64-bit: high half
    return { bar, kind: io ? 'io' : 'mem', addr, size };
  }

  /** Offsets of the capabilities with this id (vendor-specific 0x09 may repeat). */
  async capabilities(id: number): Promise<number[]> {
    const out: number[] = [];
    if (!((await this.config(0x06, 2)) & 0x10)) return out;
    for (let p = (await this.config(0x34, 1)) & 0xfc, n = 0; p && n < 48; n++) {
      if ((await this.config(p, 1)) === id) out.push(p);
      p = (await this.config(p + 1, 1)) & 0xfc;
    }
    return out;
  }
}
