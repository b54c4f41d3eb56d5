/**
 * qcow2 image creation: writes a new, empty image through a `file` edge.
 *
 * Layout (the same as qemu-img's for every image whose metadata fits one refcount block):
 *
 *     cluster 0            header, extensions, backing file name
 *     reftable             refcount table (rt clusters)
 *     refblocks            refcount blocks covering every cluster below the end
 *     L1                   L1 table (l1Size entries; the file ends at its last entry
 *                          unless something is preallocated after it)
 *     [L2, data x n]...    preallocation only: each L2 table followed by its data clusters
 *
 * Everything up to the end is allocated exactly once and nothing after it is, so every
 * refcount is 1 below the last cluster and 0 beyond; the refcount structure is sized
 * in advance (a fixed point: blocks must also count themselves and the table).
 * QEMU instead grows its refcount table on demand, so for images needing more than one
 * refcount block the two layouts differ, but both are valid and pass `qemu-img check`.
 */
import { BlockError } from '../../error.js';
import * as io from '../../io.js';
import type { BlockChild } from '../../node.js';
import {
  COMPAT, defaultFeatureTable, EXT_FEATURE_TABLE, INCOMPAT, MAX_CLUSTER_BITS, MAX_L1_BYTES, MAX_REFTABLE_BYTES, MIN_CLUSTER_BITS,
  OFLAG_COPIED, serializeHeader, setRefcount, V2_HEADER_LENGTH, V3_HEADER_LENGTH, type Qcow2Header,
} from './format.js';

export type Qcow2Compat = '0.10' | '1.1' | 'v2' | 'v3';
export type Qcow2Prealloc = 'off' | 'metadata' | 'falloc' | 'full';
export const PREALLOC_MODES: readonly Qcow2Prealloc[] = ['off', 'metadata', 'falloc', 'full'];

export interface Qcow2CreateOptions {
  /** Virtual size in bytes; rounded up to 512 as qemu-img does. Required. */
  size?: number;
  clusterSize?: number;
  compat?: Qcow2Compat | string;
  lazyRefcounts?: boolean;
  refcountBits?: number;
  extendedL2?: boolean;
  preallocation?: Qcow2Prealloc | string;
  /** Stored as given (relative names are relative to the image's directory). */
  backingFile?: string;
  backingFormat?: string;
}

/** Where everything goes; all offsets in bytes, counts in clusters unless named. */
export interface Qcow2Layout {
  header: Qcow2Header;
  clusterSize: number;
  refcountBits: number;
  l2Entries: number;
  l2EntrySize: number;
  dataClusters: number;
  l1Size: number;
  l1Clusters: number;
  rtOffset: number;
  rtClusters: number;
  rbOffset: number;
  rbCount: number;
  /** First preallocated cluster (an L2 table), or the end when nothing is preallocated. */
  preallocOffset: number;
  /** Clusters in use: every one below this has refcount 1. */
  totalClusters: number;
  preallocation: Qcow2Prealloc;
}

function invalid(msg: string): BlockError {
  return new BlockError('EINVAL', msg);
}

const ceilDiv = (a: number, b: number): number => Math.ceil(a / b);

/** qcow2 version for a compat level; qemu-img's message names the QAPI field 'version'. */
function versionOf(compat: string | undefined): 2 | 3 {
  switch (compat ?? '1.1') {
    case '0.10': case 'v2': return 2;
    case '1.1': case 'v3': return 3;
    default: throw invalid(`Parameter 'version' does not accept value '${compat}'`);
  }
}

/**
 * Checks the options as qemu-img does (same messages) and computes the layout, without
 * touching any file: callers validate before creating anything.
 */
export function planQcow2(opts: Qcow2CreateOptions): Qcow2Layout {
  if (opts.size === undefined) throw invalid('Image creation needs a size parameter');
  if (!Number.isSafeInteger(opts.size) || opts.size < 0) throw invalid(`Invalid image size ${opts.size}`);
  const size = Math.ceil(opts.size / 512) * 512;
  const version = versionOf(opts.compat);
  const cs = opts.clusterSize ?? 65536;
  const clusterBits = Math.log2(cs);
  if (!Number.isInteger(clusterBits) || clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS) {
    throw invalid('Cluster size must be a power of two between 512 and 2048k');
  }
  const refcountBits = opts.refcountBits ?? 16;
  const refcountOrder = Math.log2(refcountBits);
  if (!Number.isInteger(refcountOrder) || refcountOrder < 0 || refcountOrder > 6) {
    throw invalid('Refcount width must be a power of two and may not exceed 64 bits');
  }
  const v3Only = '(use version=v3 or greater)';
  if (version === 2 && refcountBits !== 16) {
    throw invalid(`Different refcount widths than 16 bits require compatibility level 1.1 or above ${v3Only}`);
  }
  if (version === 2 && opts.lazyRefcounts) throw invalid(`Lazy refcounts only supported with compatibility level 1.1 and above ${v3Only}`);
  const ext = opts.extendedL2 === true;
  if (ext && version === 2) throw invalid(`Extended L2 entries are only supported with compatibility level 1.1 and above ${v3Only}`);
  if (ext && cs < 16384) throw invalid('Extended L2 entries are only supported with cluster sizes of at least 16384 bytes');
  if (opts.backingFormat && !opts.backingFile) throw invalid('Backing format cannot be used without backing file');
  const prealloc = (opts.preallocation ?? 'off') as Qcow2Prealloc;
  if (!PREALLOC_MODES.includes(prealloc)) throw invalid(`Parameter 'preallocation' does not accept value '${opts.preallocation}'`);
  // Preallocated clusters would hide the backing file unless subclusters can stay unallocated.
  if (opts.backingFile && prealloc !== 'off' && !ext) {
    throw invalid('Backing file and preallocation can only be used at the same time if extended_l2 is on');
  }
  if (opts.backingFile !== undefined && Buffer.byteLength(opts.backingFile) > 1023) {
    throw invalid(`Backing file name '${opts.backingFile}' is too long (at most 1023 bytes)`);
  }

  const l2EntrySize = ext ? 16 : 8;
  const l2Entries = cs / l2EntrySize;
  const dataClusters = ceilDiv(size, cs);
  const l1Size = ceilDiv(dataClusters, l2Entries);
  if (l1Size > MAX_L1_BYTES / 8) throw invalid("The image size is too large for file format 'qcow2' (try using a larger cluster size)");
  const l1Clusters = ceilDiv(l1Size * 8, cs);
  const preallocClusters = prealloc === 'off' ? 0 : l1Size + dataClusters;
  const fixed = 1 + l1Clusters + preallocClusters;
  const perBlock = (cs * 8) / refcountBits;
  // Refcount blocks cover themselves and the table too: iterate to the fixed point.
  let rt = 0;
  let rb = 0;
  for (;;) {
    const nrb = ceilDiv(fixed + rt + rb, perBlock);
    const nrt = ceilDiv(nrb * 8, cs);
    if (nrb === rb && nrt === rt) break;
    rb = nrb;
    rt = nrt;
  }
  if (rt * cs > MAX_REFTABLE_BYTES) {
    throw invalid(`The refcount table would be larger than ${MAX_REFTABLE_BYTES} bytes (try using a larger cluster size or fewer refcount bits)`);
  }
  const rtOffset = cs;
  const rbOffset = (1 + rt) * cs;
  const l1Offset = l1Size ? rbOffset + rb * cs : 0;
  const header: Qcow2Header = {
    version,
    backingFileOffset: 0,
    backingFileSize: 0,
    clusterBits,
    size,
    cryptMethod: 0,
    l1Size,
    l1TableOffset: l1Offset,
    refcountTableOffset: rtOffset,
    refcountTableClusters: rt,
    nbSnapshots: 0,
    snapshotsOffset: 0,
    incompatible: ext ? INCOMPAT.EXTL2 : 0n,
    compatible: opts.lazyRefcounts ? COMPAT.LAZY_REFCOUNTS : 0n,
    autoclear: 0n,
    refcountOrder,
    headerLength: version === 3 ? V3_HEADER_LENGTH : V2_HEADER_LENGTH,
    compressionType: 0,
    // qemu-img leaves the feature-name table out of small clusters (room for a backing name).
    extensions: version === 3 && cs > 4096 ? [{ type: EXT_FEATURE_TABLE, data: defaultFeatureTable() }] : [],
    backingFile: opts.backingFile ?? null,
    backingFormat: opts.backingFile ? opts.backingFormat ?? null : null,
  };
  serializeHeader(header); // throws now if the name and extensions do not fit cluster 0
  return {
    header, clusterSize: cs, refcountBits, l2Entries, l2EntrySize, dataClusters, l1Size, l1Clusters,
    rtOffset, rtClusters: rt, rbOffset, rbCount: rb,
    preallocOffset: rbOffset + (rb + l1Clusters) * cs,
    totalClusters: fixed + rt + rb,
    preallocation: prealloc,
  };
}

/** Host offset of the L2 table for L1 index `i` (preallocation): each is followed by its data. */
function l2Offset(p: Qcow2Layout, i: number): number {
  return p.preallocOffset + i * (p.l2Entries + 1) * p.clusterSize;
}

const ZERO_CHUNK = 1 << 20;

/** Writes zero buffers (preallocation=full): really allocates, unlike write-zeroes. */
async function writeZeroBuffers(file: BlockChild, offset: number, bytes: number): Promise<void> {
  const zero = new Uint8Array(Math.min(ZERO_CHUNK, bytes));
  for (let pos = offset; pos < offset + bytes; pos += ZERO_CHUNK) {
    const n = Math.min(ZERO_CHUNK, offset + bytes - pos);
    await io.write(file, pos, n === zero.length ? zero : zero.subarray(0, n));
  }
}

/**
 * Writes a new, empty qcow2 image through `file` (an edge to an opened `file` node with
 * WRITE and RESIZE). Context: main loop (it awaits I/O on the edge).
 */
export async function createQcow2(file: BlockChild, opts: Qcow2CreateOptions): Promise<void> {
  const p = planQcow2(opts);
  const cs = p.clusterSize;
  const end = p.totalClusters * cs;
  if (io.getLength(file) !== 0) await io.truncate(file, 0);

  // Data first: falloc/full work on the whole preallocated range, metadata is written over it.
  if (p.preallocation !== 'off') {
    await io.truncate(file, end);
    const bytes = end - p.preallocOffset;
    if (p.preallocation === 'falloc') await io.writeZeroes(file, p.preallocOffset, bytes, 0);
    else if (p.preallocation === 'full') await writeZeroBuffers(file, p.preallocOffset, bytes);
  }

  const rt = Buffer.alloc(p.rtClusters * cs);
  for (let j = 0; j < p.rbCount; j++) rt.writeBigUInt64BE(BigInt(p.rbOffset + j * cs), j * 8);
  await io.write(file, p.rtOffset, rt);

  const perBlock = (cs * 8) / p.refcountBits;
  let full: Buffer | null = null; // a block of all ones, shared by every full block
  for (let j = 0; j < p.rbCount; j++) {
    const used = Math.min(perBlock, p.totalClusters - j * perBlock);
    let block: Buffer;
    if (used === perBlock && full) block = full;
    else {
      block = Buffer.alloc(cs);
      for (let k = 0; k < used; k++) setRefcount(block, k, p.refcountBits, 1);
      if (used === perBlock) full = block;
    }
    await io.write(file, p.rbOffset + j * cs, block);
  }

  if (p.l1Size) {
    const l1 = Buffer.alloc(p.l1Size * 8);
    if (p.preallocation !== 'off') {
      for (let i = 0; i < p.l1Size; i++) {
        const l2 = l2Offset(p, i);
        l1.writeBigUInt64BE(BigInt(l2) | OFLAG_COPIED, i * 8);
        await io.write(file, l2, l2Table(p, i, l2));
      }
    }
    // Only the entries: qemu-img's files end here too when nothing is preallocated.
    await io.write(file, p.header.l1TableOffset, l1);
  }

  // The header last, so an interrupted creation does not look like an image.
  await io.write(file, 0, serializeHeader(p.header));
  await io.flush(file);
}

/**
 * A preallocated L2 table: each entry points at the data cluster that follows, COPIED set.
 * Extended entries keep a zero subcluster bitmap (unallocated: reads fall through to the
 * backing file or zeroes), as qemu-img writes them.
 */
function l2Table(p: Qcow2Layout, i: number, l2: number): Buffer {
  const b = Buffer.alloc(p.clusterSize);
  const n = Math.min(p.l2Entries, p.dataClusters - i * p.l2Entries);
  for (let k = 0; k < n; k++) {
    b.writeBigUInt64BE(BigInt(l2 + (1 + k) * p.clusterSize) | OFLAG_COPIED, k * p.l2EntrySize);
  }
  return b;
}

/**
 * `qemu-img measure -O qcow2 --size N` for a new image: bytes needed by an empty image
 * (`required`) and by a fully allocated one. QEMU's estimate (the metadata for a fully
 * allocated image, data left out for `required`), independent of preallocation.
 */
export function measureQcow2(opts: Qcow2CreateOptions): { required: number; fullyAllocated: number } {
  const p = planQcow2({ ...opts, preallocation: 'off', backingFile: undefined, backingFormat: undefined });
  const cs = p.clusterSize;
  const aligned = ceilDiv(p.header.size, cs) * cs;
  let meta = cs; // header
  const l2e = ceilDiv(aligned / cs, p.l2Entries) * p.l2Entries;
  meta += l2e * p.l2EntrySize;
  const l1e = ceilDiv((l2e * p.l2EntrySize) / cs, cs / 8) * (cs / 8);
  meta += l1e * 8;
  const clusters = (meta + aligned) / cs;
  const perBlock = (cs * 8) / p.refcountBits;
  let table = 0;
  let blocks = 0;
  for (let n = -1, last = -2; n !== last; ) {
    last = n;
    blocks = ceilDiv(clusters + table + blocks, perBlock);
    table = ceilDiv(blocks, cs / 8);
    n = clusters + blocks + table;
  }
  const fullyAllocated = meta + (blocks + table) * cs + aligned;
  return { required: fullyAllocated - aligned, fullyAllocated };
}
