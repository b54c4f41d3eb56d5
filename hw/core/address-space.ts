/**
 * Port I/O and MMIO dispatch: devices register regions of an address space; an access is
 * sent to the region that holds it, with the offset inside the region. Unassigned space
 * reads as all ones and ignores writes, as on a PC bus.
 */
import { HwError } from './error.js';
import { hex } from './memory.js';

export type AccessSize = 1 | 2 | 4;

export interface IoRegion {
  /** Who owns it, for error messages: "virtio-blk-pci BAR0". */
  readonly name: string;
  read(offset: number, size: AccessSize): number;
  write(offset: number, size: AccessSize, value: number): void;
}

interface Mapping {
  base: number;
  size: number;
  region: IoRegion;
}

const ONES: Record<AccessSize, number> = { 1: 0xff, 2: 0xffff, 4: 0xffffffff };

/** Told of every map (region set) and unmap (region null), e.g. to mirror them into a CPU. */
export type MapListener = (base: number, size: number, region: IoRegion | null) => void;

export class AddressSpace {
  /** Sorted by base, never overlapping. */
  private readonly maps: Mapping[] = [];
  private readonly listeners: MapListener[] = [];

  constructor(readonly name: string, readonly limit: number) {}

  /** Maps `region` at [base, base+size); refuses overlaps, naming both owners. */
  map(base: number, size: number, region: IoRegion): void {
    if (!Number.isSafeInteger(base) || !Number.isSafeInteger(size) || base < 0 || size <= 0 || base + size > this.limit) {
      throw new HwError('ERANGE', `${region.name}: ${this.name} range ${hex(base)}+${size} is out of bounds`);
    }
    const i = this.indexAfter(base);
    const prev = this.maps[i - 1];
    const next = this.maps[i];
    const clash = prev && prev.base + prev.size > base ? prev : next && next.base < base + size ? next : undefined;
    if (clash) {
      throw new HwError('EBUSY', `${region.name}: ${this.name} range ${hex(base)}+${size} overlaps ${clash.region.name} at ${hex(clash.base)}+${clash.size}`);
    }
    this.maps.splice(i, 0, { base, size, region });
    for (const l of this.listeners) l(base, size, region);
  }

  /** Removes the mapping of `region` at `base` (no-op if it is not there). */
  unmap(base: number, region: IoRegion): void {
    const k = this.maps.findIndex((m) => m.base === base && m.region === region);
    if (k < 0) return;
    const [m] = this.maps.splice(k, 1);
    for (const l of this.listeners) l(base, m!.size, null);
  }

  /** Calls `l` for every current mapping, then for every later map and unmap. */
  listen(l: MapListener): void {
    for (const m of this.maps) l(m.base, m.size, m.region);
    this.listeners.push(l);
  }

  /** The mapping that holds `addr`, if any. */
  find(addr: number): { base: number; size: number; region: IoRegion } | undefined {
    const m = this.maps[this.indexAfter(addr) - 1];
    return m && addr < m.base + m.size ? m : undefined;
  }

  read(addr: number, size: AccessSize): number {
    const m = this.find(addr);
    if (!m || addr + size > m.base + m.size) return ONES[size];
    return m.region.read(addr - m.base, size) >>> 0;
  }

  write(addr: number, size: AccessSize, value: number): void {
    const m = this.find(addr);
    if (!m || addr + size > m.base + m.size) return;
    m.region.write(addr - m.base, size, value >>> 0);
  }

  /** Index of the first mapping whose base is above `addr`. */
  private indexAfter(addr: number): number {
    let lo = 0;
    let hi = this.maps.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (this.maps[mid]!.base <= addr) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }
}
