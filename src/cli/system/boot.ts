/**
 * Booting a guest on the v86 CPU: Spindle's devices sit on its buses (the primary IDE
 * channel's legacy ports, the interrupt lines), COM1 goes to the terminal, and Spindle's own
 * guest program ends the run with its verdict.
 */
import { bridgeIrqs, bridgePorts, startGuest } from '../../../hw/cpu/v86.js';
import type { PcMachine } from '../../../hw/pc/pc.js';

export interface BootOptions {
  kernel: Uint8Array;
  /** Where COM1's bytes go (the terminal), or nowhere. */
  serial: ((chunk: string) => void) | null;
  /** Spindle's guest program: stop at its "spindle guest: PASS" or "FAIL" line. */
  verdict: boolean;
}

/** Boots; resolves with the guest's verdict (true: PASS), or null when stopped first. */
export async function bootGuest(machine: PcMachine, o: BootOptions, stopped: Promise<void>): Promise<boolean | null> {
  let line = '';
  let settle!: (v: boolean | null) => void;
  const verdict = new Promise<boolean | null>((r) => (settle = r));
  const guest = await startGuest({
    memorySize: machine.ram.size,
    multiboot: o.kernel,
    serial: (b) => {
      const ch = String.fromCharCode(b);
      o.serial?.(ch);
      if (!o.verdict) return;
      if (ch !== '\n') {
        line += ch;
        return;
      }
      if (line === 'spindle guest: PASS') settle(true);
      else if (line.startsWith('spindle guest: FAIL')) settle(false);
      line = '';
    },
    beforeRun: (cpu) => {
      // v86's own IDE leaves the primary channel free without a disk of its own.
      bridgePorts(cpu, machine.io, 0x1f0, 8);
      bridgePorts(cpu, machine.io, 0x3f6, 1);
      bridgeIrqs(cpu, machine);
    },
  });
  try {
    return await Promise.race([verdict, stopped.then(() => null)]);
  } finally {
    guest.stop();
  }
}
