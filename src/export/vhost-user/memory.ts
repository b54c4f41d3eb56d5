/**
 * The guest memory table of a vhost-user session (specs/vhost-user.rst, "Memory access" and
 * SET_MEM_TABLE): each region is an fd from the front-end mapped MAP_SHARED here, with two base
 * addresses, the guest-physical one and the front-end's user (virtual) one. Translation of
 * either kind of address returns a view of the mapping, or null unless the whole range lies
 * inside one region: guest and front-end input never reaches a view unchecked.
 */
import { fstatSync } from 'node:fs';
import { mmapFd, unmapFd } from '../../native/unix-fd.js';

/** One region as SET_MEM_TABLE describes it (all safe integers). */
export interface MemoryRegionDesc {
  guestPhysAddr: number;
  size: number;
  userAddr: number;
  /** Offset of the region's start in its fd. */
  mmapOffset: number;
}

/** A mapped region. */
export interface MappedRegion extends Readonly<MemoryRegionDesc> {
  /** The mapping (MAP_SHARED of [mmapOffset, mmapOffset + size) of the fd); detached once unmapped. */
  readonly buffer: ArrayBuffer;
}

/** A translated range: which region, where in it, and a view of exactly the range. */
export interface GuestView {
  readonly region: number;
  readonly offset: number;
  readonly bytes: Uint8Array;
}

export class MemoryTableError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'MemoryTableError';
  }
}

function validate(descs: readonly MemoryRegionDesc[]): void {
  descs.forEach((d, i) => {
    for (const k of ['guestPhysAddr', 'size', 'userAddr', 'mmapOffset'] as const) {
      const v = d[k];
      if (!Number.isSafeInteger(v) || v < 0) throw new MemoryTableError(`region ${i}: ${k} ${v} is not a safe non-negative integer`);
    }
    if (d.size === 0) throw new MemoryTableError(`region ${i}: size is 0`);
    for (const k of ['guestPhysAddr', 'userAddr', 'mmapOffset'] as const) {
      if (!Number.isSafeInteger(d[k] + d.size)) throw new MemoryTableError(`region ${i}: ${k} + size overflows`);
    }
  });
  for (let i = 0; i < descs.length; i++) {
    for (let j = i + 1; j < descs.length; j++) {
      const a = descs[i]!;
      const b = descs[j]!;
      const overlaps = (x: number, y: number): boolean => x < y + b.size && y < x + a.size;
      if (overlaps(a.guestPhysAddr, b.guestPhysAddr)) throw new MemoryTableError(`regions ${i} and ${j} overlap in guest-physical space`);
      if (overlaps(a.userAddr, b.userAddr)) throw new MemoryTableError(`regions ${i} and ${j} overlap in user address space`);
    }
  }
}

/** A set of mapped regions. Immutable once built; close() unmaps every region at once. */
export class GuestMemoryTable {
  private closedFlag = false;

  private constructor(readonly regions: readonly MappedRegion[]) {}

  /** An empty table (before SET_MEM_TABLE): every translation fails. */
  static empty(): GuestMemoryTable {
    return new GuestMemoryTable([]);
  }

  /**
   * Map each region from its fd (fds[i] for descs[i]) read-write. The fds stay the caller's
   * (a mapping outlives its fd). On any failure nothing stays mapped and MemoryTableError or
   * the mmap's EngineError is thrown.
   */
  static map(descs: readonly MemoryRegionDesc[], fds: readonly number[]): GuestMemoryTable {
    if (descs.length !== fds.length) throw new MemoryTableError(`${descs.length} regions but ${fds.length} fds`);
    validate(descs);
    const mapped: MappedRegion[] = [];
    try {
      descs.forEach((d, i) => {
        // A mapping past the end of a file is accepted by mmap but touching it raises SIGBUS,
        // which would kill the process: the fd must cover the region (memfd, hugetlbfs, shm).
        const st = fstatSync(fds[i]!);
        if (st.isFile() && st.size < d.mmapOffset + d.size) {
          throw new MemoryTableError(`region ${i}: [${d.mmapOffset}, +${d.size}) runs past the end of its fd (${st.size} bytes)`);
        }
        const buffer = mmapFd(fds[i]!, d.size, d.mmapOffset, true);
        if (buffer.byteLength !== d.size) {
          unmapFd(buffer);
          throw new MemoryTableError(`region ${i}: mapping of ${d.size} bytes came back with ${buffer.byteLength}`);
        }
        mapped.push({ guestPhysAddr: d.guestPhysAddr, size: d.size, userAddr: d.userAddr, mmapOffset: d.mmapOffset, buffer });
      });
    } catch (e) {
      for (const r of mapped) unmapFd(r.buffer);
      throw e;
    }
    return new GuestMemoryTable(mapped);
  }

  get closed(): boolean {
    return this.closedFlag;
  }

  private find(addr: number, len: number, base: 'guestPhysAddr' | 'userAddr'): GuestView | null {
    if (this.closedFlag || !Number.isSafeInteger(addr) || !Number.isSafeInteger(len) || addr < 0 || len < 0) return null;
    for (let i = 0; i < this.regions.length; i++) {
      const r = this.regions[i]!;
      const start = r[base];
      if (addr < start || addr >= start + r.size) continue;
      const offset = addr - start;
      if (len > r.size - offset) return null; // straddles the region's end: regions are not contiguous for us
      return { region: i, offset, bytes: new Uint8Array(r.buffer, offset, len) };
    }
    return null;
  }

  /** [gpa, gpa+len) as a view, or null unless it lies inside one region. */
  gpa(gpa: number, len: number): GuestView | null {
    return this.find(gpa, len, 'guestPhysAddr');
  }

  /** [uva, uva+len) in the front-end's address space as a view, or null unless inside one region. */
  uva(uva: number, len: number): GuestView | null {
    return this.find(uva, len, 'userAddr');
  }

  /** The guest-physical address of a front-end user address, or null. */
  uvaToGpa(uva: number): number | null {
    const v = this.find(uva, 0, 'userAddr');
    return v ? this.regions[v.region]!.guestPhysAddr + v.offset : null;
  }

  /** Unmap every region (views of them become length 0); idempotent. */
  close(): void {
    if (this.closedFlag) return;
    this.closedFlag = true;
    for (const r of this.regions) unmapFd(r.buffer);
  }
}
