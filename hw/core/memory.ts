/**
 * Guest RAM: one flat buffer at guest-physical address 0. Devices do DMA through read()
 * and write(), which refuse anything outside RAM instead of touching host memory. Under a
 * CPU the buffer is the CPU's own memory, and a device that wrote into guest memory through
 * a view tells it (dmaWritten), so code the CPU compiled from those bytes is thrown away.
 */
import { HwError } from './error.js';

export class GuestRam {
  /** The memory RAM lives in: guest address `a` is byte `byteOffset + a` of it. */
  readonly buffer: ArrayBuffer;
  readonly byteOffset: number;
  /** All of RAM, at any size (loads and stores of guest-endian values, single bytes). */
  readonly dv: DataView;
  /** Set by a CPU adapter: guest bytes [addr, addr+len) changed behind the CPU's back. */
  onDmaWrite: ((addr: number, len: number) => void) | null = null;
  private readonly whole: Uint8Array | null;

  /**
   * `memory`: guest RAM that already exists (a CPU's, or a vhost-user front-end's mapping),
   * exactly `size` bytes.
   */
  constructor(readonly size: number, memory?: Uint8Array | ArrayBuffer) {
    if (!Number.isSafeInteger(size) || size <= 0 || size % 4096) {
      throw new HwError('EINVAL', `guest RAM size must be a positive multiple of 4 KiB, not ${size}`);
    }
    const have = memory ? memory.byteLength : size;
    if (have !== size) throw new HwError('EINVAL', `guest RAM of ${have} bytes given for a ${size}-byte machine`);
    if (memory instanceof ArrayBuffer) {
      this.buffer = memory;
      this.byteOffset = 0;
    } else {
      const m = memory ?? new Uint8Array(size);
      this.buffer = m.buffer as ArrayBuffer;
      this.byteOffset = m.byteOffset;
    }
    this.dv = new DataView(this.buffer, this.byteOffset, size);
    this.whole = size <= MAX_TYPED_ARRAY ? new Uint8Array(this.buffer, this.byteOffset, size) : null;
  }

  /**
   * All of RAM as one array, for machines whose RAM fits one (Node 20 caps a typed array at
   * 4 GiB). Code that may see larger RAM (virtio, vhost-user guests) uses dv and viewAt.
   */
  get bytes(): Uint8Array {
    if (!this.whole) throw new HwError('E2BIG', `guest RAM of ${this.size} bytes does not fit one array: use dv or viewAt`);
    return this.whole;
  }

  /** [addr, addr+len) as a view, without the bounds check (for addresses already checked by contains). */
  viewAt(addr: number, len: number): Uint8Array {
    return new Uint8Array(this.buffer, this.byteOffset + addr, len);
  }

  /** After a device wrote into `view` (a view of these bytes). */
  dmaWritten(view: Uint8Array): void {
    if (this.onDmaWrite && view.length) this.onDmaWrite(view.byteOffset - this.byteOffset, view.length);
  }

  /** Whether [addr, addr+len) lies inside RAM. */
  contains(addr: number, len: number): boolean {
    return Number.isSafeInteger(addr) && Number.isSafeInteger(len) && addr >= 0 && len >= 0 && addr + len <= this.size;
  }

  /** A view of guest memory for DMA: no copy; throws ERANGE outside RAM. */
  view(addr: number, len: number): Uint8Array {
    if (!this.contains(addr, len)) throw new HwError('ERANGE', `guest address ${hex(addr)}+${len} is outside RAM (${this.size} bytes)`);
    return this.viewAt(addr, len);
  }

  read(addr: number, dst: Uint8Array): void {
    dst.set(this.view(addr, dst.length));
  }

  write(addr: number, src: Uint8Array): void {
    this.view(addr, src.length).set(src);
    this.onDmaWrite?.(addr, src.length);
  }
}

/** The longest Uint8Array Node 20 makes (2^32 bytes). */
const MAX_TYPED_ARRAY = 2 ** 32;

export function hex(n: number): string {
  return `0x${n.toString(16)}`;
}
