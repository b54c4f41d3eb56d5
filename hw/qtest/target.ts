/**
 * The boundary between the qtest server and the emulated machine. The server only ever talks
 * to the machine through this interface, so the protocol can be tested against a fake and the
 * machine (hw/core) can implement it without knowing the wire format.
 */

/** Width of a port I/O access in bytes (inb/outb, inw/outw, inl/outl). */
export type PortSize = 1 | 2 | 4;

/** What the qtest server drives: the machine, seen from the guest side. */
export interface QtestTarget {
  /** Reads `size` bytes from I/O port `addr` (≤ 0xffff); the value is zero-extended. */
  portRead(addr: number, size: PortSize): number;
  /** Writes the low `size` bytes of `value` to I/O port `addr` (≤ 0xffff). */
  portWrite(addr: number, size: PortSize, value: number): void;
  /** Guest-physical bytes: RAM, MMIO (device registers) or unassigned space (reads 0xff). */
  memRead(addr: number, len: number): Uint8Array;
  memWrite(addr: number, data: Uint8Array): void;
  /** Virtual clock in ns. step(): advances by `ns`, or to the next timer deadline when omitted; runs due timers; returns the new time. */
  clockStep(ns?: number): number;
  /** Advances the virtual clock to `ns` (never backwards), runs due timers and returns the new time. */
  clockSet(ns: number): number;
  /** Sends the GPIO-in lines of the device at `path` (e.g. 'ioapic', '/machine/ioapic') to `cb` instead of the device. Throws QtestError if there is no such device. */
  interceptIn(path: string, cb: (line: number, level: boolean) => void): void;
  /** Likewise for the device's output lines named `name` (all its outputs when omitted). */
  interceptOut(path: string, name: string | undefined, cb: (line: number, level: boolean) => void): void;
  /** Drives input line `line` of the GPIO-in group `name` of the device at `path`. */
  setIrqIn(path: string, name: string, line: number, level: number): void;
}

/** A refusal the server reports as `FAIL <message>` (the connection stays up). */
export class QtestError extends Error {}
