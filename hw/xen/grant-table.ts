/**
 * A simulated grant table, version 1: the frontend registers guest pages holding an array of
 * 8-byte entries { u16 flags; u16 domid; u32 frame } and grants a page to a domain by
 * filling an entry. The backend maps a grant reference: the entry must permit access
 * (GTF_permit_access), name the mapping domain, not be read-only if the backend will write
 * the page, and name a frame inside guest RAM. Mapping yields a GuestRam view of the page.
 * Entries are read at map time only; the GTF_reading/GTF_writing bits are not maintained.
 */
import { HwError } from '../core/error.js';
import type { GuestRam } from '../core/memory.js';

export const XEN_PAGE_SIZE = 4096;
export const GTF_permit_access = 1 << 0;
export const GTF_readonly = 1 << 2;
export const GNTTAB_ENTRY_SIZE = 8;
/** Most frames a table may span (Xen's default max_grant_frames is 32 or 64). */
export const GNTTAB_MAX_FRAMES = 64;

export class GrantError extends HwError {}

export class GrantTable {
  /** Guest-physical address of each table frame. */
  private frames: number[] = [];

  constructor(private readonly ram: GuestRam) {}

  /** Number of grant references the registered table holds. */
  get size(): number {
    return (this.frames.length * XEN_PAGE_SIZE) / GNTTAB_ENTRY_SIZE;
  }

  /**
   * Registers the table: `count` frames, contiguous in guest memory from `addr`
   * (page aligned). count 0 unregisters it.
   */
  setup(addr: number, count: number): void {
    if (!Number.isInteger(count) || count < 0 || count > GNTTAB_MAX_FRAMES) throw new GrantError('EINVAL', `grant table: ${count} frames (at most ${GNTTAB_MAX_FRAMES})`);
    if (count > 0 && (addr % XEN_PAGE_SIZE || !this.ram.contains(addr, count * XEN_PAGE_SIZE))) {
      throw new GrantError('ERANGE', `grant table: frames at 0x${addr.toString(16)} x${count} are not page-aligned guest RAM`);
    }
    this.frames = Array.from({ length: count }, (_, i) => addr + i * XEN_PAGE_SIZE);
  }

  /** The entry for `ref` as the guest wrote it. */
  entry(ref: number): { flags: number; domid: number; frame: number } {
    if (!Number.isInteger(ref) || ref < 0 || ref >= this.size) throw new GrantError('EINVAL', `grant ref ${ref} is outside the grant table (${this.size} entries)`);
    const at = this.frames[Math.floor((ref * GNTTAB_ENTRY_SIZE) / XEN_PAGE_SIZE)]! + ((ref * GNTTAB_ENTRY_SIZE) % XEN_PAGE_SIZE);
    const b = this.ram.view(at, GNTTAB_ENTRY_SIZE);
    const dv = new DataView(b.buffer, b.byteOffset, GNTTAB_ENTRY_SIZE);
    return { flags: dv.getUint16(0, true), domid: dv.getUint16(2, true), frame: dv.getUint32(4, true) };
  }

  /**
   * Maps grant `ref` for domain `domid`; `write` when the mapper will write the page.
   * Returns a view of the whole page; throws GrantError on any bad entry.
   */
  map(ref: number, domid: number, write: boolean): Uint8Array {
    const e = this.entry(ref);
    if (!(e.flags & GTF_permit_access)) throw new GrantError('EINVAL', `grant ref ${ref} does not permit access (flags 0x${e.flags.toString(16)})`);
    if (e.domid !== domid) throw new GrantError('EINVAL', `grant ref ${ref} is granted to domain ${e.domid}, not ${domid}`);
    if (write && e.flags & GTF_readonly) throw new GrantError('EINVAL', `grant ref ${ref} is read-only`);
    const addr = e.frame * XEN_PAGE_SIZE;
    if (!this.ram.contains(addr, XEN_PAGE_SIZE)) throw new GrantError('ERANGE', `grant ref ${ref} names frame 0x${e.frame.toString(16)}, outside guest RAM`);
    return this.ram.view(addr, XEN_PAGE_SIZE);
  }
}
