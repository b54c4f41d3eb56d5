/**
 * MSI-X for a PCI function: the capability in config space, the vector table and the
 * pending-bit array in a memory BAR (table at 0, PBA at 0x800, as QEMU lays out virtio's
 * BAR1). A vector's message is delivered as a 32-bit little-endian write of its data to its
 * address through the machine's memory (so a test can aim it at guest RAM and poll).
 */
import type { IoRegion } from '../core/address-space.js';
import type { Machine } from '../core/machine.js';
import type { PciFunction } from '../pci/pci-device.js';

export const PCI_CAP_ID_MSIX = 0x11;
const CTRL_ENABLE = 0x8000;
const CTRL_MASKALL = 0x4000;
export const MSIX_PBA_OFFSET = 0x800;
export const MSIX_BAR_SIZE = 0x1000;

export class Msix {
  private readonly table: Uint8Array;
  private readonly tdv: DataView;
  private readonly pending: Uint8Array;
  private readonly scratch = new Uint8Array(4);
  machine: Machine | null = null;
  /** Enabled state changed (the transport lowers INTx when MSI-X turns on). */
  onEnableChange: ((on: boolean) => void) | null = null;
  readonly region: IoRegion;

  constructor(private readonly fn: PciFunction, readonly vectors: number, private readonly capOff: number, bar: number, nextCap: number) {
    this.table = new Uint8Array(vectors * 16);
    this.tdv = new DataView(this.table.buffer);
    this.pending = new Uint8Array(Math.ceil(vectors / 64) * 8);
    const c = fn.config;
    c[capOff] = PCI_CAP_ID_MSIX;
    c[capOff + 1] = nextCap;
    const dv = new DataView(c.buffer);
    dv.setUint16(capOff + 2, vectors - 1, true);
    dv.setUint32(capOff + 4, 0 | bar, true);
    dv.setUint32(capOff + 8, MSIX_PBA_OFFSET | bar, true);
    fn.setWritable(capOff + 2, 2, CTRL_ENABLE | CTRL_MASKALL);
    this.reset();
    this.region = {
      name: `${fn.name} MSI-X`,
      read: (off, size) => this.read(off, size),
      write: (off, size, v) => this.write(off, size, v),
    };
  }

  reset(): void {
    this.table.fill(0);
    for (let v = 0; v < this.vectors; v++) this.tdv.setUint32(v * 16 + 12, 1, true); // masked
    this.pending.fill(0);
  }

  private ctrl(): number {
    return this.fn.config[this.capOff + 2]! | (this.fn.config[this.capOff + 3]! << 8);
  }

  get enabled(): boolean {
    return (this.ctrl() & CTRL_ENABLE) !== 0;
  }

  private wasEnabled = false;
  private wasMasked = false;

  /** Called after any config write; reacts to the control word. */
  configWritten(off: number, size: number): void {
    if (off > this.capOff + 3 || off + size <= this.capOff + 2) return;
    const on = this.enabled;
    const masked = (this.ctrl() & CTRL_MASKALL) !== 0;
    if (on !== this.wasEnabled) {
      this.wasEnabled = on;
      this.onEnableChange?.(on);
    }
    if (this.wasMasked && !masked) for (let v = 0; v < this.vectors; v++) this.deliverPending(v);
    this.wasMasked = masked;
  }

  private masked(v: number): boolean {
    return (this.ctrl() & CTRL_MASKALL) !== 0 || (this.tdv.getUint32(v * 16 + 12, true) & 1) !== 0;
  }

  isPending(v: number): boolean {
    return (this.pending[v >> 3]! & (1 << (v & 7))) !== 0;
  }

  /** Signals vector `v` (no-op for a vector beyond the table). */
  notify(v: number): void {
    if (v >= this.vectors) return;
    if (this.masked(v)) {
      this.pending[v >> 3]! |= 1 << (v & 7);
      return;
    }
    this.send(v);
  }

  private deliverPending(v: number): void {
    if (this.isPending(v) && !this.masked(v)) {
      this.pending[v >> 3]! &= ~(1 << (v & 7));
      this.send(v);
    }
  }

  private send(v: number): void {
    const addr = this.tdv.getUint32(v * 16 + 4, true) * 2 ** 32 + this.tdv.getUint32(v * 16, true);
    new DataView(this.scratch.buffer).setUint32(0, this.tdv.getUint32(v * 16 + 8, true), true);
    if (!(this.fn.command() & 0x4)) return; // no bus mastering, no message
    try {
      this.machine?.memWrite(addr, this.scratch);
    } catch {
      // An address nothing decodes: the message is lost, as on a real bus.
    }
  }

  private read(off: number, size: number): number {
    let src: Uint8Array;
    if (off < this.table.length) src = this.table;
    else if (off >= MSIX_PBA_OFFSET && off - MSIX_PBA_OFFSET < this.pending.length) {
      src = this.pending;
      off -= MSIX_PBA_OFFSET;
    } else return 0;
    let v = 0;
    for (let i = size - 1; i >= 0; i--) v = v * 256 + (src[off + i] ?? 0);
    return v >>> 0;
  }

  private write(off: number, size: number, value: number): void {
    if (off >= this.table.length) return; // the PBA is read-only
    for (let i = 0; i < size && off + i < this.table.length; i++) this.table[off + i] = (value >>> (8 * i)) & 0xff;
    const v = off >> 4;
    if ((off & 15) + size > 12) this.deliverPending(v);
  }
}
