/**
 * Guest RAM: one flat buffer at guest-physical address 0. Devices do DMA through read()
 * and write(), which refuse anything outside RAM instead of touching host memory. Under a
 * CPU the buffer is the CPU's own memory, and a device that wrote into guest memory through
 * a view tells it (dmaWritten), so code the CPU compiled from those bytes is thrown away.
 */
import { HwError } from './error.js';

export class GuestRam {
  readonly bytes: Uint8Array;
  /** Set by a CPU adapter: guest bytes [addr, addr+len) changed behind the CPU's back. */
  onDmaWrite: ((addr: number, len: number) => void) | null = null;

  /** `memory`: guest RAM that already exists (a CPU's), exactly `size` bytes. */
  constructor(readonly size: number, memory?: Uint8Array) {
    if (!Number.isSafeInteger(size) || size <= 0 || size % 4096) {
      throw new HwError('EINVAL', `guest RAM size must be a positive multiple of 4 KiB, not ${size}`);
    }
    if (memory && memory.length !== size) throw new HwError('EINVAL', `guest RAM of ${memory.length} bytes given for a ${size}-byte machine`);
    this.bytes = memory ?? new Uint8Array(size);
  }

  /** After a device wrote into `view` (a view of these bytes). */
  dmaWritten(view: Uint8Array): void {
    if (this.onDmaWrite && view.length) this.onDmaWrite(view.byteOffset - this.bytes.byteOffset, view.length);
  }

  /** Whether [addr, addr+len) lies inside RAM. */
  contains(addr: number, len: number): boolean {
    return Number.isSafeInteger(addr) && Number.isSafeInteger(len) && addr >= 0 && len >= 0 && addr + len <= this.size;
  }

  /** A view of guest memory for DMA: no copy; throws ERANGE outside RAM. */
  view(addr: number, len: number): Uint8Array {
    if (!this.contains(addr, len)) throw new HwError('ERANGE', `guest address ${hex(addr)}+${len} is outside RAM (${this.size} bytes)`);
    return this.bytes.subarray(addr, addr + len);
  }

  read(addr: number, dst: Uint8Array): void {
    dst.set(this.view(addr, dst.length));
  }

  write(addr: number, src: Uint8Array): void {
    this.view(addr, src.length).set(src);
    this.onDmaWrite?.(addr, src.length);
  }
}

export function hex(n: number): string {
  return `0x${n.toString(16)}`;
}
