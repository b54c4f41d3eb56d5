/**
 * Guest memory for guest-side drivers (rings, buffers, PRD tables): a first-fit allocator
 * over guest RAM above 1 MiB, as libqos keeps one. The RAM size comes from fw_cfg.
 */
import type { QtestClient } from './qtest-client.js';

export class GuestAlloc {
  /** Free ranges [start, end), sorted, coalesced. */
  private free: [number, number][];

  constructor(start: number, end: number, private readonly align = 4096) {
    this.free = [[start, end]];
  }

  /** The RAM size the machine reports in fw_cfg (key 0x03 at ports 0x510/0x511). */
  static async forPc(qts: QtestClient): Promise<GuestAlloc> {
    await qts.outw(0x510, 0x03);
    let size = 0;
    for (let i = 0; i < 8; i++) size += (await qts.inb(0x511)) * 256 ** i;
    return new GuestAlloc(1 << 20, size);
  }

  alloc(bytes: number, align = this.align): number {
    const n = Math.ceil(bytes / this.align) * this.align;
    for (let i = 0; i < this.free.length; i++) {
      const [s, e] = this.free[i]!;
      const at = Math.ceil(s / align) * align;
      if (at + n > e) continue;
      const parts: [number, number][] = [];
      if (at > s) parts.push([s, at]);
      if (at + n < e) parts.push([at + n, e]);
      this.free.splice(i, 1, ...parts);
      return at;
    }
    throw new Error(`guest memory exhausted (${bytes} bytes wanted)`);
  }

  release(addr: number, bytes: number): void {
    const n = Math.ceil(bytes / this.align) * this.align;
    this.free.push([addr, addr + n]);
    this.free.sort((a, b) => a[0] - b[0]);
    const merged: [number, number][] = [];
    for (const r of this.free) {
      const last = merged[merged.length - 1];
      if (last && last[1] >= r[0]) last[1] = Math.max(last[1], r[1]);
      else merged.push([r[0], r[1]]);
    }
    this.free = merged;
  }
}
