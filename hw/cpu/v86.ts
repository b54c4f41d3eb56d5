/**
 * The guest CPU: the npm package v86 (pinned in package.json), run in this process. This
 * module is the only code that touches v86's internals (its CPU's port-I/O and MMIO
 * registration, PCI registration, IRQ lines and guest memory); checkInternals() fails
 * loudly, naming what moved, when a v86 version changes them.
 */
import { createRequire } from 'node:module';
import { V86 } from 'v86';
import type { AddressSpace } from '../core/address-space.js';
import type { Machine } from '../core/machine.js';

/** The parts of v86's CPU object Spindle uses (not in v86's published types). */
export interface V86Cpu {
  io: {
    register_read(port: number, dev: object, r8?: () => number, r16?: () => number, r32?: () => number): void;
    register_write(port: number, dev: object, w8?: (v: number) => void, w16?: (v: number) => void, w32?: (v: number) => void): void;
    mmap_register(addr: number, size: number, r8: (a: number) => number, w8: (a: number, v: number) => void, r32?: (a: number) => number, w32?: (a: number, v: number) => void): void;
  };
  devices: { pci: { register_device(dev: object): void } };
  device_raise_irq(n: number): void;
  device_lower_irq(n: number): void;
  /** Guest RAM; writes that may hit code must go through write_blob (it invalidates the JIT). */
  mem8: Uint8Array;
  write_blob(blob: Uint8Array, offset: number): void;
}

/** Every internal this adapter relies on: [path, expected typeof]. */
const INTERNALS: [string, string][] = [
  ['v86.cpu', 'object'],
  ['v86.cpu.io.register_read', 'function'],
  ['v86.cpu.io.register_write', 'function'],
  ['v86.cpu.io.mmap_register', 'function'],
  ['v86.cpu.devices.pci.register_device', 'function'],
  ['v86.cpu.device_raise_irq', 'function'],
  ['v86.cpu.device_lower_irq', 'function'],
  ['v86.cpu.mem8', 'object'],
  ['v86.cpu.write_blob', 'function'],
];

/** Throws, naming every internal that is missing or changed kind. */
export function checkInternals(emu: object): V86Cpu {
  const moved: string[] = [];
  for (const [path, kind] of INTERNALS) {
    let v: unknown = emu;
    for (const part of path.split('.')) v = v !== null && typeof v === 'object' ? (v as Record<string, unknown>)[part] : undefined;
    if (typeof v !== kind || v === null) moved.push(`${path} (want ${kind}, found ${v === null ? 'null' : typeof v})`);
  }
  if (moved.length) throw new Error(`v86 internals moved: ${moved.join(', ')}; Spindle's CPU adapter (hw/cpu/v86.ts) needs updating for this v86 version`);
  return (emu as { v86: { cpu: V86Cpu } }).v86.cpu;
}

export interface GuestOptions {
  /** Guest RAM in bytes. */
  memorySize: number;
  /** A multiboot kernel (ELF), booted without firmware. */
  multiboot?: Uint8Array;
  /** Firmware image (SeaBIOS) for disk and CD boots. */
  bios?: Uint8Array;
  /** Each byte the guest writes to COM1. */
  serial?: (byte: number) => void;
  /** Plugs Spindle's devices in: runs once v86 is ready, before the guest's first instruction. */
  beforeRun?: (cpu: V86Cpu) => void;
}

export interface V86Guest {
  readonly cpu: V86Cpu;
  stop(): void;
}

const own = (b: Uint8Array): ArrayBuffer => b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength) as ArrayBuffer;

/** Starts a v86 CPU with the image given; resolves once v86 is ready and its internals check out. */
export function startGuest(o: GuestOptions): Promise<V86Guest> {
  const require = createRequire(import.meta.url);
  const emu = new V86({
    wasm_path: require.resolve('v86/build/v86.wasm'),
    memory_size: o.memorySize,
    ...(o.multiboot ? { multiboot: { buffer: own(o.multiboot) } } : {}),
    ...(o.bios ? { bios: { buffer: own(o.bios) } } : {}),
    autostart: false,
    disable_keyboard: true,
    disable_mouse: true,
    disable_speaker: true,
  });
  return new Promise((resolve, reject) => {
    emu.add_listener('emulator-ready', () => {
      let cpu: V86Cpu;
      try {
        cpu = checkInternals(emu);
      } catch (e) {
        emu.destroy();
        reject(e);
        return;
      }
      if (o.serial) emu.add_listener('serial0-output-byte', o.serial);
      try {
        o.beforeRun?.(cpu);
      } catch (e) {
        emu.destroy();
        reject(e);
        return;
      }
      void emu.run();
      resolve({ cpu, stop: () => void emu.destroy() });
    });
  });
}

/**
 * Sends the guest's port accesses in [base, base+len) to Spindle's port space. For a PCI
 * I/O BAR this must happen before the device is registered with v86's PCI (v86 moves the
 * port entries it finds there when the guest moves the BAR).
 */
export function bridgePorts(cpu: V86Cpu, io: AddressSpace, base: number, len: number): void {
  const owner = { name: `spindle ports ${base.toString(16)}+${len}` };
  for (let port = base; port < base + len; port++) {
    cpu.io.register_read(port, owner, () => io.read(port, 1), () => io.read(port, 2), () => io.read(port, 4));
    cpu.io.register_write(port, owner, (v) => io.write(port, 1, v), (v) => io.write(port, 2, v), (v) => io.write(port, 4, v));
  }
}

/** Spindle's interrupt lines (the machine's `ioapic` group) drive v86's interrupt controllers. */
export function bridgeIrqs(cpu: V86Cpu, m: Machine): void {
  m.interceptIn('ioapic', (line, level) => (level ? cpu.device_raise_irq(line) : cpu.device_lower_irq(line)));
}

