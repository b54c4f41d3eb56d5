/**
 * Booting a guest on the v86 CPU. The CPU and its RAM come first (prepareGuest), the machine
 * is built on that RAM and its devices plugged, then runGuest puts Spindle's machine on the
 * CPU's buses and runs it: firmware (SeaBIOS) boots disks, CDs and Linux kernels; a multiboot
 * program (Spindle's roms/guest) runs without firmware. COM1 goes to the terminal.
 */
import { existsSync, readFileSync } from 'node:fs';
import { createGuest, type V86Guest } from '../../../hw/cpu/v86.js';
import type { PcMachine } from '../../../hw/pc/pc.js';
import { CliError } from '../fail.js';
import type { SystemConfig } from './args.js';

/** Where Debian's `seabios` package puts the firmware. */
export const SEABIOS_PATHS = ['/usr/share/seabios/bios-256k.bin', '/usr/share/seabios/bios.bin'];
/** v86 loads an initrd at this address, so RAM must reach past it. */
const INITRD_AT = 64 << 20;
/** v86's port for QEMU's fw_cfg, which carries its Linux loader to the firmware. */
const FW_CFG_PORTS: [number, number] = [0x510, 12];

function readImage(opt: string, path: string): Uint8Array {
  try {
    return readFileSync(path);
  } catch (e) {
    throw new CliError(`${opt}: could not read '${path}': ${(e as NodeJS.ErrnoException).code === 'ENOENT' ? 'No such file or directory' : (e as Error).message}`);
  }
}

/** A multiboot header in the first 8 KiB (magic, flags, checksum summing to zero). */
function isMultiboot(b: Uint8Array): boolean {
  const dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
  for (let off = 0; off + 12 <= Math.min(b.length, 8192); off += 4) {
    if (dv.getUint32(off, true) === 0x1badb002 && ((dv.getUint32(off, true) + dv.getUint32(off + 4, true) + dv.getUint32(off + 8, true)) | 0) === 0) return true;
  }
  return false;
}

function firmware(cfg: SystemConfig): Uint8Array {
  if (cfg.bios) return readImage('-bios', cfg.bios);
  const path = SEABIOS_PATHS.find((p) => existsSync(p));
  if (!path) throw new CliError("no firmware to boot with: install Debian's 'seabios' package (apt-get install seabios) or pass -bios FILE");
  return readFileSync(path);
}

/** Reads the images the command line names and makes the CPU, not yet running. */
export async function prepareGuest(cfg: SystemConfig, onSerial: (byte: number) => void): Promise<V86Guest> {
  const memorySize = cfg.ramSize;
  if (memorySize % (128 << 10)) throw new CliError(`-m: the v86 CPU needs RAM in multiples of 128 KiB, not ${memorySize} bytes`);
  const kernel = cfg.kernel ? readImage('-kernel', cfg.kernel) : null;
  if (kernel && isMultiboot(kernel)) {
    if (cfg.initrd || cfg.append) throw new CliError('-initrd and -append: a multiboot -kernel takes neither (they are for Linux kernels)');
    return createGuest({ memorySize, multiboot: kernel, serial: onSerial });
  }
  if (kernel && !(kernel.length > 0x206 && Buffer.from(kernel.subarray(0x202, 0x206)).toString('latin1') === 'HdrS')) {
    throw new CliError(`-kernel: '${cfg.kernel}' is neither a multiboot kernel nor a Linux bzImage`);
  }
  const initrd = cfg.initrd ? readImage('-initrd', cfg.initrd) : null;
  if (initrd && INITRD_AT + initrd.length > memorySize) {
    throw new CliError(`-initrd: the initrd is loaded at 64 MiB, so -m must be at least ${Math.ceil((INITRD_AT + initrd.length) / 2 ** 20) + 1}M`);
  }
  return createGuest({
    memorySize,
    bios: firmware(cfg),
    ...(kernel ? { bzimage: kernel, cmdline: cfg.append ?? '' } : {}),
    ...(initrd ? { initrd } : {}),
    serial: onSerial,
  });
}

/** How a guest run ended. */
export type GuestEnd = 'pass' | 'fail' | 'poweroff' | 'stopped';

/**
 * Watches COM1 line by line for the end of a run: Spindle's guest program's verdict, or a
 * Linux kernel that halted without ACPI (its last line is the signal; with ACPI the PM
 * block's S5 ends the run, as QEMU exits on power-off).
 */
export class SerialWatch {
  private line = '';
  private settle: (e: GuestEnd) => void = () => {};
  readonly ended = new Promise<GuestEnd>((r) => (this.settle = r));

  constructor(private readonly out: ((s: string) => void) | null) {}

  /** Ends the run from elsewhere (the machine powered off). */
  finish(e: GuestEnd): void {
    this.settle(e);
  }

  readonly byte = (b: number): void => {
    const ch = String.fromCharCode(b);
    this.out?.(ch);
    if (ch === '\r') return;
    if (ch !== '\n') {
      if (this.line.length < 4096) this.line += ch;
      return;
    }
    const l = this.line;
    this.line = '';
    if (l === 'spindle guest: PASS') this.settle('pass');
    else if (l.startsWith('spindle guest: FAIL')) this.settle('fail');
    else if (/\breboot: (Power down|System halted)$/.test(l)) this.settle('poweroff');
  };
}

/**
 * Puts the machine on the CPU and runs it until the guest ends or `stopped` settles. With
 * `input` (-serial stdio), what arrives there is typed at COM1.
 */
export async function runGuest(guest: V86Guest, machine: PcMachine, watch: SerialWatch, stopped: Promise<void>, input: NodeJS.ReadableStream | null): Promise<GuestEnd> {
  guest.attach(machine, { keepPorts: [FW_CFG_PORTS] });
  machine.chipset.pm.onPowerOff = () => watch.finish('poweroff');
  const typed = (d: Buffer | string): void => guest.sendSerial(typeof d === 'string' ? Buffer.from(d, 'latin1') : d);
  input?.on('data', typed);
  guest.run();
  try {
    return await Promise.race([watch.ended, stopped.then((): GuestEnd => 'stopped')]);
  } finally {
    input?.off('data', typed);
    input?.pause();
    guest.stop();
  }
}
