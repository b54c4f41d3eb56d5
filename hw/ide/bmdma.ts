/**
 * The PIIX bus-master IDE engine of one channel (8 of BAR4's 16 ports): command (start,
 * direction), status (active, error, interrupt, drive DMA-capable bits) and the PRD table
 * pointer. A transfer runs when the drive has a DMA command pending and the guest has set
 * start; the PRD table becomes an iovec of guest-memory views (no copy) for the backend.
 */
import type { IoRegion } from '../core/address-space.js';
import type { GuestRam } from '../core/memory.js';
import type { IdeChannel } from './core.js';
import type { DmaEngine } from './defs.js';

export const BM_CMD = { START: 0x01, READ: 0x08 } as const;
export const BM_ST = { ACTIVE: 0x01, ERROR: 0x02, INTR: 0x04, DMA0: 0x20, DMA1: 0x40 } as const;

/** A PRD table larger than this many entries is refused (64 KiB of table). */
const MAX_PRDS = 8192;

export class BmDma implements DmaEngine {
  cmd = 0;
  status = 0;
  prd = 0;
  /** Guest memory (set when the machine realizes the controller). */
  ram: GuestRam | null = null;
  /** Whether the running transfer used the PRD table up to its last entry exactly. */
  private exhausted = false;
  private running = false;
  /** The running transfer's iovec (see walk). */
  private readonly iov: Uint8Array[] = [];
  readonly region: IoRegion;

  constructor(readonly name: string, private readonly channel: IdeChannel) {
    this.region = { name: `${name} bus master`, read: (off, size) => this.read(off, size), write: (off, size, v) => this.write(off, size, v) };
    channel.dmaEngine = this;
  }

  private read(off: number, size: 1 | 2 | 4): number {
    let v = 0;
    for (let i = 0; i < size; i++) v |= this.readByte(off + i) << (8 * i);
    return v >>> 0;
  }

  private readByte(off: number): number {
    switch (off) {
      case 0: return this.cmd;
      case 2: return this.status;
      case 4: case 5: case 6: case 7: return (this.prd >>> (8 * (off - 4))) & 0xff;
      default: return 0;
    }
  }

  private write(off: number, size: 1 | 2 | 4, v: number): void {
    for (let i = 0; i < size; i++) this.writeByte(off + i, (v >>> (8 * i)) & 0xff);
  }

  private writeByte(off: number, v: number): void {
    switch (off) {
      case 0: {
        const was = this.cmd;
        this.cmd = v & (BM_CMD.START | BM_CMD.READ);
        if (v & BM_CMD.START && !(was & BM_CMD.START)) {
          this.status |= BM_ST.ACTIVE;
          this.kick();
        } else if (!(v & BM_CMD.START)) {
          // Stop: the engine lets go; a request already at the backend still completes.
          this.status &= ~BM_ST.ACTIVE;
        }
        return;
      }
      case 2:
        // Error and interrupt are write-one-to-clear; the DMA-capable bits are plain.
        this.status = (this.status & ~(v & (BM_ST.ERROR | BM_ST.INTR)) & ~(BM_ST.DMA0 | BM_ST.DMA1)) | (v & (BM_ST.DMA0 | BM_ST.DMA1));
        return;
      case 4: case 5: case 6: case 7: {
        const sh = 8 * (off - 4);
        this.prd = ((this.prd & ~(0xff << sh)) | (v << sh)) >>> 0;
        this.prd = (this.prd & ~3) >>> 0;
        return;
      }
    }
  }

  kick(): void {
    const d = this.channel.selected();
    const req = d?.dma;
    if (!req || !(this.cmd & BM_CMD.START) || !(this.status & BM_ST.ACTIVE) || this.running) return;
    const iov = this.walk(req.bytes);
    if (!iov) {
      d.dma = null;
      this.status = (this.status & ~BM_ST.ACTIVE) | BM_ST.ERROR;
      req.prdError();
      return;
    }
    this.running = true;
    req.run(iov);
  }

  finish(_ok: boolean): void {
    this.running = false;
    // A transfer from the drive wrote guest memory (BM_CMD.READ: the bus master writes memory).
    const ram = this.ram;
    if (ram?.onDmaWrite && this.cmd & BM_CMD.READ) for (const v of this.iov) ram.dmaWritten(v);
    if (this.exhausted) this.status &= ~BM_ST.ACTIVE;
  }

  interrupt(): void {
    this.status |= BM_ST.INTR;
  }

  /**
   * The PRD table as views of guest memory covering exactly `bytes` (one view per entry
   * used), or null if it cannot. The array is this engine's, reused from transfer to
   * transfer: the backend holds it only while `running`, and no walk happens then.
   */
  private walk(bytes: number): Uint8Array[] | null {
    const ram = this.ram;
    if (!ram) return null;
    const mem = ram.bytes;
    const iov = this.iov;
    let k = 0;
    let left = bytes;
    let at = this.prd;
    for (let n = 0; n < MAX_PRDS && left > 0; n++, at += 8) {
      if (!ram.contains(at, 8)) return null;
      // The entry, little-endian, read in place: base (bit 0 ignored), count (0: 64 KiB), EOT.
      const addr = (mem[at]! | (mem[at + 1]! << 8) | (mem[at + 2]! << 16) | (mem[at + 3]! << 24)) & ~1;
      const len = (mem[at + 4]! | (mem[at + 5]! << 8)) || 0x10000;
      const eot = (mem[at + 7]! & 0x80) !== 0;
      const take = Math.min(len, left);
      if (!ram.contains(addr, take)) return null;
      iov[k++] = mem.subarray(addr, addr + take);
      left -= take;
      if (left === 0) {
        this.exhausted = eot && take === len;
        if (iov.length !== k) iov.length = k;
        return iov;
      }
      if (eot) return null;
    }
    return null;
  }
}
