/**
 * qcow2 on-disk format: constants, the header and its extensions, entry encodings.
 * Pure functions over buffers (../shared/specs/qcow2.txt); no I/O here.
 */
import { BlockError } from '../../error.js';

export const QCOW2_MAGIC = 0x514649fb;
export const V2_HEADER_LENGTH = 72;
export const V3_HEADER_LENGTH = 112;
export const MIN_CLUSTER_BITS = 9;
export const MAX_CLUSTER_BITS = 21;

export const EXT_END = 0;
export const EXT_BACKING_FORMAT = 0xe2792aca;
export const EXT_FEATURE_TABLE = 0x6803f857;
export const EXT_BITMAPS = 0x23852875;
export const EXT_CRYPTO = 0x0537be77;
export const EXT_DATA_FILE = 0x44415441;

/** Incompatible feature bits (header offset 72). */
export const INCOMPAT = { DIRTY: 1n << 0n, CORRUPT: 1n << 1n, DATA_FILE: 1n << 2n, COMPRESSION: 1n << 3n, EXTL2: 1n << 4n } as const;
export const INCOMPAT_KNOWN = INCOMPAT.DIRTY | INCOMPAT.CORRUPT | INCOMPAT.EXTL2;
/** Compatible feature bits. */
export const COMPAT = { LAZY_REFCOUNTS: 1n << 0n } as const;
/** Autoclear feature bits. */
export const AUTOCLEAR = { BITMAPS: 1n << 0n, DATA_FILE_RAW: 1n << 1n } as const;

/** L1/L2/refcount-table entry bits. */
export const OFLAG_COPIED = 1n << 63n;
export const OFLAG_COMPRESSED = 1n << 62n;
export const OFLAG_ZERO = 1n;
export const OFFSET_MASK = 0x00fffffffffffe00n;
export const L1E_OFFSET_MASK = 0x00fffffffffffe00n;
export const REFT_OFFSET_MASK = 0xfffffffffffffe00n;

export interface HeaderExtension {
  type: number;
  data: Buffer;
}

export interface FeatureName {
  type: 'incompatible' | 'compatible' | 'autoclear';
  bit: number;
  name: string;
}

export interface Qcow2Header {
  version: 2 | 3;
  backingFileOffset: number;
  backingFileSize: number;
  clusterBits: number;
  size: number;
  cryptMethod: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  nbSnapshots: number;
  snapshotsOffset: number;
  incompatible: bigint;
  compatible: bigint;
  autoclear: bigint;
  refcountOrder: number;
  headerLength: number;
  compressionType: number;
  /** Extensions in file order, unknown ones kept byte for byte. */
  extensions: HeaderExtension[];
  backingFile: string | null;
  backingFormat: string | null;
}

function corrupt(msg: string): BlockError {
  return new BlockError('EINVAL', `qcow2: ${msg}`);
}

function u64(b: Buffer, off: number, what: string): number {
  const v = b.readBigUInt64BE(off);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw corrupt(`${what} (${v}) is too large`);
  return Number(v);
}

/** Parses the header cluster. `buf` holds at least the first cluster (or the whole file if smaller). */
export function parseHeader(buf: Buffer): Qcow2Header {
  if (buf.length < V2_HEADER_LENGTH) throw corrupt(`image too short for a header (${buf.length} bytes)`);
  if (buf.readUInt32BE(0) !== QCOW2_MAGIC) throw corrupt('bad magic: not a qcow2 image');
  const version = buf.readUInt32BE(4);
  if (version !== 2 && version !== 3) throw new BlockError('ENOTSUP', `qcow2: unsupported version ${version}`);
  const h: Qcow2Header = {
    version,
    backingFileOffset: u64(buf, 8, 'backing file offset'),
    backingFileSize: buf.readUInt32BE(16),
    clusterBits: buf.readUInt32BE(20),
    size: u64(buf, 24, 'virtual size'),
    cryptMethod: buf.readUInt32BE(32),
    l1Size: buf.readUInt32BE(36),
    l1TableOffset: u64(buf, 40, 'L1 table offset'),
    refcountTableOffset: u64(buf, 48, 'refcount table offset'),
    refcountTableClusters: buf.readUInt32BE(56),
    nbSnapshots: buf.readUInt32BE(60),
    snapshotsOffset: u64(buf, 64, 'snapshot table offset'),
    incompatible: 0n,
    compatible: 0n,
    autoclear: 0n,
    refcountOrder: 4,
    headerLength: V2_HEADER_LENGTH,
    compressionType: 0,
    extensions: [],
    backingFile: null,
    backingFormat: null,
  };
  // QEMU counts the disk in 512-byte sectors (total_sectors = size / 512): a size that is not
  // a multiple of 512 reads, and is written back, rounded down.
  h.size -= h.size % 512;
  if (h.clusterBits < MIN_CLUSTER_BITS || h.clusterBits > MAX_CLUSTER_BITS) {
    throw corrupt(`cluster size 2^${h.clusterBits} is outside 512 B to 2 MiB`);
  }
  const cs = 2 ** h.clusterBits;
  if (version === 3) {
    if (buf.length < 104) throw corrupt('image too short for a version 3 header');
    h.incompatible = buf.readBigUInt64BE(72);
    h.compatible = buf.readBigUInt64BE(80);
    h.autoclear = buf.readBigUInt64BE(88);
    h.refcountOrder = buf.readUInt32BE(96);
    h.headerLength = buf.readUInt32BE(100);
    if (h.headerLength < 104 || h.headerLength > cs || h.headerLength > buf.length) throw corrupt(`bad header length ${h.headerLength}`);
    if (h.headerLength > 104) h.compressionType = buf.readUInt8(104);
  }
  if (h.refcountOrder > 6) throw corrupt(`refcount width 2^${h.refcountOrder} bits is more than 64`);
  // Extensions run from the end of the header to the end of the first cluster.
  let off = h.headerLength;
  const limit = Math.min(cs, buf.length);
  while (off + 8 <= limit) {
    const type = buf.readUInt32BE(off);
    const len = buf.readUInt32BE(off + 4);
    if (type === EXT_END) break;
    if (off + 8 + len > limit) throw corrupt(`header extension 0x${type.toString(16)} runs past the first cluster`);
    h.extensions.push({ type, data: Buffer.from(buf.subarray(off + 8, off + 8 + len)) });
    off += 8 + Math.ceil(len / 8) * 8;
  }
  const bf = h.extensions.find((e) => e.type === EXT_BACKING_FORMAT);
  if (bf) h.backingFormat = bf.data.toString('utf8');
  if (h.backingFileOffset) {
    if (h.backingFileSize > 1023 || h.backingFileOffset + h.backingFileSize > limit) {
      throw corrupt(`backing file name (offset ${h.backingFileOffset}, ${h.backingFileSize} bytes) is invalid`);
    }
    h.backingFile = buf.toString('utf8', h.backingFileOffset, h.backingFileOffset + h.backingFileSize);
  }
  return h;
}

/** The feature-name table, if the image has one. */
export function featureNames(h: Qcow2Header): FeatureName[] {
  const ext = h.extensions.find((e) => e.type === EXT_FEATURE_TABLE);
  if (!ext) return [];
  const out: FeatureName[] = [];
  const kinds = ['incompatible', 'compatible', 'autoclear'] as const;
  for (let o = 0; o + 48 <= ext.data.length; o += 48) {
    const kind = kinds[ext.data[o]!];
    if (!kind) continue;
    const raw = ext.data.subarray(o + 2, o + 48);
    const nul = raw.indexOf(0);
    out.push({ type: kind, bit: ext.data[o + 1]!, name: raw.toString('utf8', 0, nul < 0 ? 46 : nul) });
  }
  return out;
}

/** The feature-name table Spindle writes into the images it creates. */
export function defaultFeatureTable(): Buffer {
  const rows: [number, number, string][] = [
    [0, 0, 'dirty bit'], [0, 1, 'corrupt bit'], [0, 2, 'external data file'], [0, 3, 'compression type'],
    [0, 4, 'extended L2 entries'], [1, 0, 'lazy refcounts'], [2, 0, 'bitmaps'], [2, 1, 'raw external data'],
  ];
  const b = Buffer.alloc(48 * rows.length);
  rows.forEach(([t, bit, name], i) => {
    b[i * 48] = t;
    b[i * 48 + 1] = bit;
    b.write(name, i * 48 + 2, 46, 'utf8');
  });
  return b;
}

/**
 * Serialises the header, its extensions and the backing file name into one buffer
 * (to be written at offset 0; must fit in the first cluster).
 */
export function serializeHeader(h: Qcow2Header): Buffer {
  const cs = 2 ** h.clusterBits;
  const headerLength = h.version === 3 ? Math.max(h.headerLength, V3_HEADER_LENGTH) : V2_HEADER_LENGTH;
  const exts = h.extensions.filter((e) => e.type !== EXT_BACKING_FORMAT && e.type !== EXT_END);
  if (h.backingFormat) exts.unshift({ type: EXT_BACKING_FORMAT, data: Buffer.from(h.backingFormat, 'utf8') });
  let len = headerLength;
  for (const e of exts) len += 8 + Math.ceil(e.data.length / 8) * 8;
  len += 8; // end marker
  const name = h.backingFile ? Buffer.from(h.backingFile, 'utf8') : null;
  const total = len + (name ? name.length : 0);
  if (total > cs) throw new BlockError('EFBIG', `qcow2: header, extensions and backing file name (${total} bytes) do not fit in one ${cs}-byte cluster`);
  const b = Buffer.alloc(total);
  b.writeUInt32BE(QCOW2_MAGIC, 0);
  b.writeUInt32BE(h.version, 4);
  b.writeBigUInt64BE(BigInt(name ? len : 0), 8);
  b.writeUInt32BE(name ? name.length : 0, 16);
  b.writeUInt32BE(h.clusterBits, 20);
  b.writeBigUInt64BE(BigInt(h.size), 24);
  b.writeUInt32BE(h.cryptMethod, 32);
  b.writeUInt32BE(h.l1Size, 36);
  b.writeBigUInt64BE(BigInt(h.l1TableOffset), 40);
  b.writeBigUInt64BE(BigInt(h.refcountTableOffset), 48);
  b.writeUInt32BE(h.refcountTableClusters, 56);
  b.writeUInt32BE(h.nbSnapshots, 60);
  b.writeBigUInt64BE(BigInt(h.snapshotsOffset), 64);
  if (h.version === 3) {
    b.writeBigUInt64BE(h.incompatible, 72);
    b.writeBigUInt64BE(h.compatible, 80);
    b.writeBigUInt64BE(h.autoclear, 88);
    b.writeUInt32BE(h.refcountOrder, 96);
    b.writeUInt32BE(headerLength, 100);
    if (headerLength > 104) b.writeUInt8(h.compressionType, 104);
  }
  let off = headerLength;
  for (const e of exts) {
    b.writeUInt32BE(e.type, off);
    b.writeUInt32BE(e.data.length, off + 4);
    e.data.copy(b, off + 8);
    off += 8 + Math.ceil(e.data.length / 8) * 8;
  }
  // End marker: zero type and length, already zero.
  if (name) name.copy(b, len);
  return b;
}

/** Names of the incompatible feature bits set in `bits` that Spindle does not know. */
export function unknownIncompatible(h: Qcow2Header): string[] {
  const unknown = h.incompatible & ~INCOMPAT_KNOWN;
  if (!unknown) return [];
  const table = featureNames(h).filter((f) => f.type === 'incompatible');
  const out: string[] = [];
  for (let bit = 0; bit < 64; bit++) {
    if (unknown & (1n << BigInt(bit))) {
      const named = table.find((f) => f.bit === bit);
      out.push(named ? named.name : `unknown incompatible feature bit ${bit}`);
    }
  }
  return out;
}

/** Geometry derived from the header. */
export interface Geometry {
  clusterBits: number;
  clusterSize: number;
  /** L2 entry size in bytes (8, or 16 with extended L2). */
  l2EntrySize: number;
  l2Bits: number;
  l2Size: number;
  subclusterBits: number;
  refcountBits: number;
  /** Refcount entries per refcount block. */
  rbEntries: number;
}

export function geometry(h: Qcow2Header): Geometry {
  const ext = (h.incompatible & INCOMPAT.EXTL2) !== 0n;
  const clusterSize = 2 ** h.clusterBits;
  const l2EntrySize = ext ? 16 : 8;
  const l2Size = clusterSize / l2EntrySize;
  const refcountBits = 2 ** h.refcountOrder;
  return {
    clusterBits: h.clusterBits,
    clusterSize,
    l2EntrySize,
    l2Bits: Math.log2(l2Size),
    l2Size,
    subclusterBits: ext ? h.clusterBits - 5 : h.clusterBits,
    refcountBits,
    rbEntries: (clusterSize * 8) / refcountBits,
  };
}

/** L1 entries needed for a virtual size. */
export function l1EntriesFor(size: number, g: Geometry): number {
  const perL2 = g.l2Size * g.clusterSize;
  return Math.ceil(size / perL2);
}

/** QEMU's implementation limits (qcow2.txt notes): images beyond them are refused by QEMU. */
export const MAX_L1_BYTES = 32 * 1024 * 1024;
export const MAX_REFTABLE_BYTES = 8 * 1024 * 1024;

/**
 * Reads refcount entry `index` of a refcount block whose entries are `bits` wide (a power of
 * two, 1..64). Sub-byte entries pack from the least significant bits of each byte; wider
 * ones are big-endian. 64-bit counts beyond 2^53 cannot be a Number and are refused.
 */
export function getRefcount(block: Uint8Array, index: number, bits: number): number {
  if (bits < 8) {
    checkWidth(bits);
    const perByte = 8 / bits;
    const byte = block[Math.floor(index / perByte)]!;
    return (byte >> ((index % perByte) * bits)) & ((1 << bits) - 1);
  }
  const off = index * (bits / 8);
  const dv = new DataView(block.buffer, block.byteOffset, block.byteLength);
  switch (bits) {
    case 8: return dv.getUint8(off);
    case 16: return dv.getUint16(off);
    case 32: return dv.getUint32(off);
    case 64: {
      const v = dv.getBigUint64(off);
      if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw corrupt(`refcount ${v} is too large`);
      return Number(v);
    }
    default: throw new RangeError(`refcount width ${bits} is not a power of two up to 64`);
  }
}

function checkWidth(bits: number): void {
  if (bits !== 1 && bits !== 2 && bits !== 4) throw new RangeError(`refcount width ${bits} is not a power of two up to 64`);
}

/** Writes refcount entry `index`; a value that does not fit the width is a caller bug. */
export function setRefcount(block: Uint8Array, index: number, bits: number, value: number): void {
  if (!Number.isSafeInteger(value) || value < 0 || (bits < 53 && value >= 2 ** bits)) {
    throw new RangeError(`refcount ${value} does not fit in ${bits} bits`);
  }
  if (bits < 8) {
    checkWidth(bits);
    const perByte = 8 / bits;
    const i = Math.floor(index / perByte);
    const shift = (index % perByte) * bits;
    const mask = ((1 << bits) - 1) << shift;
    block[i] = (block[i]! & ~mask) | (value << shift);
    return;
  }
  const off = index * (bits / 8);
  const dv = new DataView(block.buffer, block.byteOffset, block.byteLength);
  switch (bits) {
    case 8: dv.setUint8(off, value); return;
    case 16: dv.setUint16(off, value); return;
    case 32: dv.setUint32(off, value); return;
    case 64: dv.setBigUint64(off, BigInt(value)); return;
    default: throw new RangeError(`refcount width ${bits} is not a power of two up to 64`);
  }
}
