/**
 * The guest memory table of a vhost-user session (specs/vhost-user.rst, "Memory access" and
 * SET_MEM_TABLE): each region is an fd from the front-end, with two base addresses, the
 * guest-physical one and the front-end's user (virtual) one. All regions are mapped MAP_SHARED
 * into one reservation at their guest-physical addresses, so a guest-physical address is an
 * offset into one buffer (`ram`, what the virtio code walks rings and buffers in); the holes
 * between regions are PROT_NONE and `ram.contains` refuses them, so guest and front-end input
 * never reaches memory the front-end did not give.
 */
import { fstatSync } from 'node:fs';
import { GuestRam } from '../../../hw/core/memory.js';
import { mmapLayout, unmapFd } from '../../native/unix-fd.js';
import { DeferredClose } from './deferred-close.js';

const PAGE = 4096;
/**
 * The layout is indexed by guest-physical address, so its reservation spans the highest one (the
 * holes cost address space, not memory): 1 TiB of guest-physical space is plenty for a guest's
 * RAM and leaves most of the process's address space alone.
 */
const MAX_GPA = 2 ** 40;

/** One region as SET_MEM_TABLE describes it (all safe integers). */
export interface MemoryRegionDesc {
  guestPhysAddr: number;
  size: number;
  userAddr: number;
  /** Offset of the region's start in its fd. */
  mmapOffset: number;
}

/** A mapped region: its bytes are `ram.viewAt(guestPhysAddr, size)`. */
export type MappedRegion = Readonly<MemoryRegionDesc>;

/**
 * Guest RAM as the regions of one table: the layout is indexed by guest-physical address, and a
 * range is inside RAM only if every byte of it is in some region (adjacent regions join). RAM
 * above 4 GiB is reached through `dv` and `viewAt` (a typed array cannot span it).
 */
export class RegionRam extends GuestRam {
  /** Sorted, merged [start, end) guest-physical spans. */
  private readonly spans: Float64Array;

  constructor(layout: ArrayBuffer, regions: readonly MappedRegion[]) {
    super(layout.byteLength, layout);
    const sorted = [...regions].sort((a, b) => a.guestPhysAddr - b.guestPhysAddr);
    const out: number[] = [];
    for (const r of sorted) {
      const n = out.length;
      if (n > 0 && out[n - 1] === r.guestPhysAddr) out[n - 1] = r.guestPhysAddr + r.size;
      else out.push(r.guestPhysAddr, r.guestPhysAddr + r.size);
    }
    this.spans = Float64Array.from(out);
  }

  override contains(addr: number, len: number): boolean {
    if (!(addr >= 0 && len >= 0) || !Number.isSafeInteger(addr) || !Number.isSafeInteger(len)) return false;
    const s = this.spans;
    for (let i = 0; i < s.length; i += 2) {
      if (addr < s[i]!) return false;
      if (addr < s[i + 1]!) return addr + len <= s[i + 1]!;
    }
    return false;
  }
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
  private unmapped = false;
  private readonly life = new DeferredClose(() => this.unmap());
  /** Guest RAM for the virtio code (null for the empty table). */
  readonly ram: RegionRam | null;

  private constructor(readonly regions: readonly MappedRegion[], private readonly buffer: ArrayBuffer | null) {
    this.ram = buffer ? new RegionRam(buffer, regions) : null;
  }

  /** The mapping itself (guest-physical address = offset), for native code; null if empty or unmapped. */
  get layout(): ArrayBuffer | null {
    return this.unmapped ? null : this.buffer;
  }

  /** An empty table (before SET_MEM_TABLE): every translation fails. */
  static empty(): GuestMemoryTable {
    return new GuestMemoryTable([], null);
  }

  /**
   * Map each region from its fd (fds[i] for descs[i]) read-write. The fds stay the caller's
   * (a mapping outlives its fd). On any failure nothing stays mapped and MemoryTableError or
   * the mmap's EngineError is thrown.
   */
  static map(descs: readonly MemoryRegionDesc[], fds: readonly number[]): GuestMemoryTable {
    if (descs.length !== fds.length) throw new MemoryTableError(`${descs.length} regions but ${fds.length} fds`);
    validate(descs);
    let end = 0;
    descs.forEach((d, i) => {
      if (d.guestPhysAddr % PAGE || d.size % PAGE || d.mmapOffset % PAGE) {
        throw new MemoryTableError(`region ${i}: guest address, size and mmap offset must be multiples of ${PAGE}`);
      }
      if (d.guestPhysAddr + d.size > MAX_GPA) {
        throw new MemoryTableError(`region ${i}: guest memory above 1 TiB (up to 0x${(d.guestPhysAddr + d.size).toString(16)}) is not supported`);
      }
      // A mapping past the end of a file is accepted by mmap but touching it raises SIGBUS,
      // which would kill the process: the fd must cover the region (memfd, hugetlbfs, shm).
      const st = fstatSync(fds[i]!);
      if (st.isFile() && st.size < d.mmapOffset + d.size) {
        throw new MemoryTableError(`region ${i}: [${d.mmapOffset}, +${d.size}) runs past the end of its fd (${st.size} bytes)`);
      }
      end = Math.max(end, d.guestPhysAddr + d.size);
    });
    const buffer = mmapLayout(end, descs.map((d, i) => ({ fd: fds[i]!, offset: d.mmapOffset, at: d.guestPhysAddr, size: d.size })));
    const regions = descs.map((d) => ({ guestPhysAddr: d.guestPhysAddr, size: d.size, userAddr: d.userAddr, mmapOffset: d.mmapOffset }));
    return new GuestMemoryTable(regions, buffer);
  }

  get closed(): boolean {
    return this.life.closed;
  }

  private find(addr: number, len: number, base: 'guestPhysAddr' | 'userAddr'): GuestView | null {
    if (this.life.closed || !Number.isSafeInteger(addr) || !Number.isSafeInteger(len) || addr < 0 || len < 0) return null;
    for (let i = 0; i < this.regions.length; i++) {
      const r = this.regions[i]!;
      const start = r[base];
      if (addr < start || addr >= start + r.size) continue;
      const offset = addr - start;
      if (len > r.size - offset) return null; // straddles the region's end: regions are not contiguous for us
      return { region: i, offset, bytes: new Uint8Array(this.buffer!, r.guestPhysAddr + offset, len) };
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

  /**
   * Keep the mapping while requests still use `ram` (I/O into guest buffers in flight): close()
   * then waits for the last release to unmap. Returns the release function (call it once).
   */
  hold(): () => void {
    return this.life.hold();
  }

  /**
   * Unmap every region (views of them become length 0), or after the last hold is released;
   * translations fail from now on. Idempotent.
   */
  close(): void {
    this.life.close();
  }

  private unmap(): void {
    if (this.unmapped) return;
    this.unmapped = true;
    if (this.buffer) unmapFd(this.buffer);
  }
}
