/**
 * Guest RAM: one flat buffer at guest-physical address 0. Devices do DMA through read()
 * and write(), which refuse anything outside RAM instead of touching host memory.
 */
import { HwError } from './error.js';

export class GuestRam {
  readonly bytes: Uint8Array;

  constructor(readonly size: number) {
    if (!Number.isSafeInteger(size) || size <= 0 || size % 4096) {
      throw new HwError('EINVAL', `guest RAM size must be a positive multiple of 4 KiB, not ${size}`);
    }
    this.bytes = new Uint8Array(size);
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
  }
}

export function hex(n: number): string {
  return `0x${n.toString(16)}`;
}
