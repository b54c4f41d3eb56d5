// Slab allocator for I/O buffers.  Slabs are 4 KiB-aligned native memory
// exposed as external ArrayBuffers; requests name a buffer by (slab id,
// offset), so the hot path needs no native call per buffer.  Sizes are rounded
// to 4 KiB and recycled through exact-size free lists, which suits block I/O
// (a handful of distinct sizes, reused constantly).
import { native } from './addon.js';

const PAGE = 4096;
const DEFAULT_SLAB = 16 << 20;
const MAX_SLAB = 1 << 30; // descriptor offsets are int32

const slabBufs: ArrayBuffer[] = [];
const slabIds: number[] = [];
let lastBuf: ArrayBuffer | undefined;
let lastId = -1;

let cur = -1; // index into slabBufs of the bump slab
let bump = 0;
const freeLists = new Map<number, number[]>(); // size -> [index, offset, index, offset, ...]
const live = new Map<number, number>(); // index * 2^30 + offset -> rounded size

/** Native slab id of an ArrayBuffer, or -1 when it is not slab memory. */
export function slabIdOf(ab: ArrayBufferLike): number {
  if (ab === lastBuf) return lastId;
  for (let i = 0; i < slabBufs.length; i++) {
    if (slabBufs[i] === ab) {
      lastBuf = slabBufs[i];
      lastId = slabIds[i]!;
      return lastId;
    }
  }
  return -1;
}

function indexOf(ab: ArrayBufferLike): number {
  for (let i = 0; i < slabBufs.length; i++) if (slabBufs[i] === ab) return i;
  return -1;
}

function newSlab(min: number): void {
  const size = Math.min(MAX_SLAB, Math.max(DEFAULT_SLAB, Math.ceil(min / DEFAULT_SLAB) * DEFAULT_SLAB));
  const [id, ab] = native.allocSlab(size);
  slabBufs.push(ab);
  slabIds.push(id);
  cur = slabBufs.length - 1;
  bump = 0;
}

/** A Buffer of `size` bytes on slab memory, aligned to `align` (a power of two <= 1 MiB). */
export function allocBuffer(size: number, align = PAGE): Buffer {
  if (!Number.isInteger(size) || size <= 0 || size > MAX_SLAB) {
    throw new RangeError(`allocBuffer: size must be an integer in [1, ${MAX_SLAB}], got ${size}`);
  }
  if (!Number.isInteger(align) || align <= 0 || (align & (align - 1)) !== 0 || align > 1 << 20) {
    throw new RangeError(`allocBuffer: align must be a power of two <= 1 MiB, got ${align}`);
  }
  const rounded = Math.ceil(size / PAGE) * PAGE;
  const list = freeLists.get(rounded);
  if (list !== undefined) {
    for (let i = list.length - 2; i >= 0; i -= 2) {
      const off = list[i + 1]!;
      if (off % align !== 0) continue;
      const idx = list[i]!;
      list.splice(i, 2);
      return take(idx, off, rounded, size);
    }
  }
  let off = cur < 0 ? 0 : Math.ceil(bump / align) * align;
  if (cur < 0 || off + rounded > slabBufs[cur]!.byteLength) {
    newSlab(rounded + (align > PAGE ? align : 0));
    off = 0;
  }
  bump = off + rounded;
  return take(cur, off, rounded, size);
}

function take(idx: number, off: number, rounded: number, size: number): Buffer {
  live.set(idx * MAX_SLAB + off, rounded);
  return Buffer.from(slabBufs[idx]!, off, size);
}

/** Returns a buffer from allocBuffer to the allocator; it must not be used afterwards. */
export function freeBuffer(buf: Uint8Array): void {
  const idx = indexOf(buf.buffer);
  const key = idx * MAX_SLAB + buf.byteOffset;
  const rounded = idx < 0 ? undefined : live.get(key);
  if (rounded === undefined) throw new RangeError('freeBuffer: not a live buffer from allocBuffer');
  live.delete(key);
  let list = freeLists.get(rounded);
  if (list === undefined) freeLists.set(rounded, (list = []));
  list.push(idx, buf.byteOffset);
}
