/**
 * Spindle's machine on v86's buses. Every region Spindle's machine maps in port space takes
 * over v86's port-table entries for its ports (v86's own entries come back when it is
 * unmapped), so the guest's config accesses at 0xCF8/0xCFC reach Spindle's PCI host and
 * v86's own PCI functions drop out of sight; BARs the guest programs then map into Spindle's
 * spaces and follow here. MMIO goes to Spindle in v86's 128 KiB blocks, dispatched by
 * Spindle's map. Interrupt lines drive v86's PIC and IOAPIC; DMA into guest RAM drops the
 * JIT's code for those bytes.
 */
import type { AddressSpace, IoRegion } from '../core/address-space.js';
import { HwError } from '../core/error.js';
import type { Machine } from '../core/machine.js';
import type { V86Cpu, V86PortEntry } from './v86.js';

export interface MirrorOptions {
  /** Port ranges [base, size] v86 keeps even where Spindle maps something (its fw_cfg). */
  keepPorts?: [number, number][];
}

/** `this` of a mirrored port's handlers: which port of which space. */
interface PortTarget {
  space: AddressSpace;
  port: number;
}

// One set of handlers for every port; v86 calls them with the entry's `device` as `this`.
function r8(this: PortTarget): number {
  return this.space.read(this.port, 1);
}
function r16(this: PortTarget): number {
  return this.space.read(this.port, 2);
}
function r32(this: PortTarget): number {
  return this.space.read(this.port, 4) | 0;
}
function w8(this: PortTarget, v: number): void {
  this.space.write(this.port, 1, v);
}
function w16(this: PortTarget, v: number): void {
  this.space.write(this.port, 2, v);
}
function w32(this: PortTarget, v: number): void {
  this.space.write(this.port, 4, v);
}

const BLOCK_SHIFT = 17;
/** v86's own MMIO blocks: IOAPIC, local APIC, and the firmware's top 1 MiB. */
const V86_OWNED = (block: number): boolean => block === 0xfec00000 >>> BLOCK_SHIFT || block === 0xfee00000 >>> BLOCK_SHIFT || block >= 0xfff00000 >>> BLOCK_SHIFT;

export function mirrorMachine(cpu: V86Cpu, m: Machine, o: MirrorOptions = {}): void {
  // The machine's RAM must be the CPU's bytes: a byte written through one shows in the other.
  const probe = new Uint8Array(cpu.wasm_memory.buffer, cpu.mem8.byteOffset, 1);
  const was = probe[0]!;
  probe[0] = was ^ 0xff;
  const same = m.ram.bytes[0] === (was ^ 0xff) && m.ram.size === cpu.mem8.length;
  probe[0] = was;
  if (!same) throw new HwError('EINVAL', "the machine's RAM is not the CPU's: build the machine with the guest's memory");
  mirrorPorts(cpu, m.io, o.keepPorts ?? []);
  mirrorMmio(cpu, m.mmio, m.ram.size);
  m.interceptIn('ioapic', (line, level) => (level ? cpu.device_raise_irq(line) : cpu.device_lower_irq(line)));
  m.ram.onDmaWrite = (addr, len) => cpu.jit_dirty_cache(addr, addr + len);
}

function mirrorPorts(cpu: V86Cpu, space: AddressSpace, keep: [number, number][]): void {
  const ports = cpu.io.ports;
  /** v86's entries for the ports Spindle has taken. */
  const saved = new Map<number, V86PortEntry>();
  const kept = (p: number): boolean => keep.some(([b, n]) => p >= b && p < b + n);
  space.listen((base: number, size: number, region: IoRegion | null) => {
    for (let p = base; p < base + size && p < 0x10000; p++) {
      if (kept(p)) continue;
      if (region) {
        if (!saved.has(p)) saved.set(p, ports[p]!);
        const device: PortTarget = { space, port: p };
        ports[p] = { read8: r8, read16: r16, read32: r32, write8: w8, write16: w16, write32: w32, device } as V86PortEntry;
      } else {
        const prev = saved.get(p);
        if (prev) ports[p] = prev;
        saved.delete(p);
      }
    }
  });
}

function mirrorMmio(cpu: V86Cpu, space: AddressSpace, ramSize: number): void {
  const hooked = new Set<number>();
  // v86 splits a 16-bit MMIO write into two byte writes, which registers 16 bits wide (virtio's
  // queue_select, its notify doorbell) must not see: Spindle's blocks take it whole.
  const split16 = cpu.mmap_write16.bind(cpu);
  cpu.mmap_write16 = (a: number, v: number): void => {
    if (hooked.has(a >>> BLOCK_SHIFT)) space.write(a >>> 0, 2, v & 0xffff);
    else split16(a, v);
  };
  const rd8 = (a: number): number => space.read(a >>> 0, 1);
  const wr8 = (a: number, v: number): void => space.write(a >>> 0, 1, v);
  const rd32 = (a: number): number => space.read(a >>> 0, 4) | 0;
  const wr32 = (a: number, v: number): void => space.write(a >>> 0, 4, v);
  space.listen((base, size, region) => {
    // Unmapped addresses in a hooked block read as all ones through Spindle's map, so a
    // block stays hooked for good.
    if (!region || base >= 2 ** 32) return;
    const last = Math.min(base + size, 2 ** 32) - 1;
    for (let b = Math.floor(base / 2 ** BLOCK_SHIFT); b <= last / 2 ** BLOCK_SHIFT; b++) {
      const at = b * 2 ** BLOCK_SHIFT;
      if (hooked.has(b) || at < ramSize || V86_OWNED(b)) continue;
      hooked.add(b);
      cpu.io.mmap_register(at, 1 << BLOCK_SHIFT, rd8, wr8, rd32, wr32);
    }
  });
}
