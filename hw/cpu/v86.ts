/**
 * The guest CPU: the npm package v86 (pinned in package.json), run in this process. This
 * folder is the only code that touches v86's internals (its port table, MMIO map, IRQ lines,
 * JIT and guest memory); checkInternals() fails loudly, naming what moved, when a v86
 * version changes them. v86 supplies the CPU, its interrupt controllers, timers, serial port
 * and firmware interface; Spindle's machine (hw/pc) supplies PCI and the disks, mirrored
 * onto v86's buses by attach() (v86-bus.ts).
 */
import { createRequire } from 'node:module';
import { V86 } from 'v86';
import { HwError } from '../core/error.js';
import type { Machine } from '../core/machine.js';
import { wasmMemoryView } from '../../src/native/hostfacts.js';
import { mirrorMachine, type MirrorOptions } from './v86-bus.js';

/** One entry of v86's port table: called with `device` as `this`; reads get the port. */
export interface V86PortEntry {
  read8: (this: unknown, port: number) => number;
  read16: (this: unknown, port: number) => number;
  read32: (this: unknown, port: number) => number;
  write8: (this: unknown, v: number) => void;
  write16: (this: unknown, v: number) => void;
  write32: (this: unknown, v: number) => void;
  device: unknown;
}

/** The parts of v86's CPU object Spindle uses (not in v86's published types). */
export interface V86Cpu {
  io: {
    /** 65536 entries, one per port. */
    ports: V86PortEntry[];
    /** Maps [addr, addr+size) (128 KiB-aligned blocks) above RAM to handlers. */
    mmap_register(addr: number, size: number, r8: (a: number) => number, w8: (a: number, v: number) => void, r32?: (a: number) => number, w32?: (a: number, v: number) => void): void;
  };
  /** What v86's wasm calls for a 16-bit write above RAM (it splits it into bytes). */
  mmap_write16(addr: number, v: number): void;
  device_raise_irq(n: number): void;
  device_lower_irq(n: number): void;
  /** Guest RAM: v86 hands out a proxy that views the wasm memory afresh on every access. */
  mem8: { readonly byteOffset: number; readonly length: number };
  wasm_memory: WebAssembly.Memory;
  /** Throws away compiled code for guest bytes [start, end). */
  jit_dirty_cache(start: number, end: number): void;
}

/** Every internal this adapter relies on: [path, expected typeof]. */
const INTERNALS: [string, string][] = [
  ['v86.cpu', 'object'],
  ['v86.cpu.io.ports', 'object'],
  ['v86.cpu.io.mmap_register', 'function'],
  ['v86.cpu.mmap_write16', 'function'],
  ['v86.cpu.device_raise_irq', 'function'],
  ['v86.cpu.device_lower_irq', 'function'],
  ['v86.cpu.mem8', 'object'],
  ['v86.cpu.wasm_memory', 'object'],
  ['v86.cpu.jit_dirty_cache', 'function'],
];

/** Throws, naming every internal that is missing or changed kind. */
export function checkInternals(emu: object): V86Cpu {
  const moved: string[] = [];
  for (const [path, kind] of INTERNALS) {
    let v: unknown = emu;
    for (const part of path.split('.')) v = v !== null && typeof v === 'object' ? (v as Record<string, unknown>)[part] : undefined;
    if (typeof v !== kind || v === null) moved.push(`${path} (want ${kind}, found ${v === null ? 'null' : typeof v})`);
  }
  const cpu = (emu as { v86?: { cpu?: V86Cpu } }).v86?.cpu;
  if (cpu && !moved.length) {
    if (cpu.io.ports.length !== 0x10000) moved.push(`v86.cpu.io.ports (want 65536 entries, found ${cpu.io.ports.length})`);
    const e = cpu.io.ports[0x80];
    for (const f of ['read8', 'read16', 'read32', 'write8', 'write16', 'write32'] as const) {
      if (typeof e?.[f] !== 'function') moved.push(`v86.cpu.io.ports[n].${f} (want function, found ${typeof e?.[f]})`);
    }
    if (!(cpu.wasm_memory instanceof WebAssembly.Memory)) moved.push('v86.cpu.wasm_memory (want a WebAssembly.Memory)');
    else if (!Number.isSafeInteger(cpu.mem8.byteOffset) || cpu.mem8.byteOffset + cpu.mem8.length > cpu.wasm_memory.buffer.byteLength) {
      moved.push('v86.cpu.mem8 (want a view into v86.cpu.wasm_memory)');
    }
  }
  if (moved.length) throw new Error(`v86 internals moved: ${moved.join(', ')}; Spindle's CPU adapter (hw/cpu/v86.ts) needs updating for this v86 version`);
  return cpu!;
}

export interface GuestOptions {
  /** Guest RAM in bytes: a multiple of 128 KiB (v86's memory-map granule). */
  memorySize: number;
  /** A multiboot kernel (ELF), booted without firmware. */
  multiboot?: Uint8Array;
  /** Firmware image (SeaBIOS) for disk, CD and Linux boots. */
  bios?: Uint8Array;
  /** A Linux bzImage, with its initrd and command line, booted through the firmware. */
  bzimage?: Uint8Array;
  initrd?: Uint8Array;
  cmdline?: string;
  /** Each byte the guest writes to COM1. */
  serial?: (byte: number) => void;
}

export interface V86Guest {
  readonly cpu: V86Cpu;
  /**
   * Guest RAM, as a view the wasm memory's growth (v86's JIT grows it as it runs) does not
   * detach: the machine's RAM must be this (PcMachine's `ram` option).
   */
  readonly memory: Uint8Array;
  /** Puts `m`'s ports, MMIO, interrupt lines and DMA on this CPU. */
  attach(m: Machine, o?: MirrorOptions): void;
  /** Starts the CPU (once). */
  run(): void;
  /** Bytes into COM1's receiver, as typed at the guest's serial console. */
  sendSerial(data: Uint8Array): void;
  /** Pauses a running CPU (QMP `stop`, werror=stop); `resume` runs it on. No-ops when stopped for good. */
  pause(): void;
  resume(): void;
  stop(): void;
}

const own = (b: Uint8Array): ArrayBuffer => b.buffer.slice(b.byteOffset, b.byteOffset + b.byteLength) as ArrayBuffer;
const MEM_GRANULE = 128 << 10;

/** Makes a v86 CPU with the images given; resolves, not yet running, once its internals check out. */
export function createGuest(o: GuestOptions): Promise<V86Guest> {
  if (!Number.isSafeInteger(o.memorySize) || o.memorySize <= 0 || o.memorySize % MEM_GRANULE) {
    return Promise.reject(new HwError('EINVAL', `guest RAM for the v86 CPU must be a positive multiple of 128 KiB, not ${o.memorySize}`));
  }
  const require = createRequire(import.meta.url);
  const emu = new V86({
    wasm_path: require.resolve('v86/build/v86.wasm'),
    memory_size: o.memorySize,
    ...(o.multiboot ? { multiboot: { buffer: own(o.multiboot) } } : {}),
    ...(o.bios ? { bios: { buffer: own(o.bios) } } : {}),
    ...(o.bzimage ? { bzimage: { buffer: own(o.bzimage) } } : {}),
    ...(o.initrd ? { initrd: { buffer: own(o.initrd) } } : {}),
    ...(o.cmdline !== undefined ? { cmdline: o.cmdline } : {}),
    autostart: false,
    disable_keyboard: true,
    disable_mouse: true,
    disable_speaker: true,
  } as ConstructorParameters<typeof V86>[0]);
  return new Promise((resolve, reject) => {
    emu.add_listener('emulator-ready', () => {
      let cpu: V86Cpu;
      try {
        cpu = checkInternals(emu);
        if (cpu.mem8.length !== o.memorySize) throw new HwError('EINVAL', `v86 made ${cpu.mem8.length} bytes of RAM, not the ${o.memorySize} asked`);
      } catch (e) {
        emu.destroy();
        reject(e);
        return;
      }
      if (o.serial) emu.add_listener('serial0-output-byte', o.serial);
      let started = false;
      let stopped = false;
      resolve({
        cpu,
        memory: wasmMemoryView(cpu.wasm_memory, cpu.mem8.byteOffset, o.memorySize),
        attach: (m, mo) => mirrorMachine(cpu, m, mo),
        sendSerial: (data) => {
          if (!stopped) emu.serial0_send(Buffer.from(data).toString('latin1'));
        },
        run: () => {
          if (started || stopped) return;
          started = true;
          void emu.run();
        },
        pause: () => {
          if (started && !stopped) void emu.stop();
        },
        resume: () => {
          if (started && !stopped) void emu.run();
        },
        stop: () => {
          if (stopped) return;
          stopped = true;
          void emu.destroy();
        },
      });
    });
  });
}
