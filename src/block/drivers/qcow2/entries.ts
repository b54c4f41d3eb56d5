/**
 * L1/L2 entry decoding with plain numbers: two 32-bit reads, no BigInt on the I/O path.
 * Host offsets fit in 53 bits (8 PiB), which covers every image Spindle opens.
 */


const TWO32 = 4294967296;

/** Host offset bits 9..55 of an L1 or standard L2 entry at `pos`. */
export function entryOffset(buf: Buffer, pos: number): number {
  const hi = buf.readUInt32BE(pos) & 0x00ffffff;
  const lo = buf.readUInt32BE(pos + 4) & 0xfffffe00;
  return hi * TWO32 + (lo >>> 0);
}

export function entryCopied(buf: Buffer, pos: number): boolean {
  return (buf.readUInt32BE(pos) & 0x80000000) !== 0;
}

export function entryCompressed(buf: Buffer, pos: number): boolean {
  return (buf.readUInt32BE(pos) & 0x40000000) !== 0;
}

export function entryZeroFlag(buf: Buffer, pos: number): boolean {
  return (buf.readUInt32BE(pos + 4) & 1) !== 0;
}

/** Bits of an entry that must be zero (reserved); non-zero means a corrupt table. */
export function l2ReservedBits(buf: Buffer, pos: number): boolean {
  const hi = buf.readUInt32BE(pos);
  if (hi & 0x40000000) return false; // compressed entries use the bits differently
  const lo = buf.readUInt32BE(pos + 4);
  return (hi & 0x3f000000) !== 0 || (lo & 0x1fe) !== 0;
}

export function writeEntry(buf: Buffer, pos: number, offset: number, copied: boolean, zero = false): void {
  const hi = Math.floor(offset / TWO32);
  const lo = offset - hi * TWO32;
  buf.writeUInt32BE(((copied ? 0x80000000 : 0) | hi) >>> 0, pos);
  buf.writeUInt32BE((lo | (zero ? 1 : 0)) >>> 0, pos + 4);
}

/** Compressed entry: host offset and the number of bytes to read (a 512-byte-sector bound). */
export function compressedLocation(buf: Buffer, pos: number, clusterBits: number): { offset: number; bytes: number } {
  const x = 62 - (clusterBits - 8);
  const v = buf.readBigUInt64BE(pos);
  const offMask = (1n << BigInt(x)) - 1n;
  const offset = Number(v & offMask);
  const sectors = Number((v >> BigInt(x)) & ((1n << BigInt(clusterBits - 8)) - 1n)) + 1;
  // The data starts at `offset` and ends inside sector (offset/512 + sectors).
  const end = (Math.floor(offset / 512) + sectors) * 512;
  return { offset, bytes: end - offset };
}

/** Encodes a compressed L2 entry for `bytes` of compressed data at host `offset`. */
export function encodeCompressed(buf: Buffer, pos: number, clusterBits: number, offset: number, bytes: number): void {
  const x = 62 - (clusterBits - 8);
  const sectors = Math.floor((offset + bytes - 1) / 512) - Math.floor(offset / 512);
  const v = (1n << 62n) | (BigInt(sectors) << BigInt(x)) | BigInt(offset);
  buf.writeBigUInt64BE(v, pos);
}

/** Extended L2: the allocation and zero bitmaps of the entry at `pos` (16-byte entries). */
export function subclusterBitmaps(buf: Buffer, pos: number): { alloc: number; zero: number } {
  const v = buf.readBigUInt64BE(pos + 8);
  return { alloc: Number(v & 0xffffffffn), zero: Number(v >> 32n) };
}

export function writeSubclusterBitmaps(buf: Buffer, pos: number, alloc: number, zero: number): void {
  buf.writeUInt32BE(zero >>> 0, pos + 8);
  buf.writeUInt32BE(alloc >>> 0, pos + 12);
}

/** Refcount `i` of a refcount block whose entries are `bits` wide. */
export function rcGet(block: Buffer, i: number, bits: number): number {
  if (bits >= 8) {
    const bytes = bits / 8;
    const o = i * bytes;
    if (bytes === 1) return block[o]!;
    if (bytes === 2) return block.readUInt16BE(o);
    if (bytes === 4) return block.readUInt32BE(o);
    return Number(block.readBigUInt64BE(o));
  }
  const per = 8 / bits;
  return (block[Math.floor(i / per)]! >> ((i % per) * bits)) & ((1 << bits) - 1);
}

export function rcSet(block: Buffer, i: number, bits: number, v: number): void {
  if (bits >= 8) {
    const bytes = bits / 8;
    const o = i * bytes;
    if (bytes === 1) block[o] = v;
    else if (bytes === 2) block.writeUInt16BE(v, o);
    else if (bytes === 4) block.writeUInt32BE(v, o);
    else block.writeBigUInt64BE(BigInt(v), o);
    return;
  }
  const per = 8 / bits;
  const shift = (i % per) * bits;
  const mask = ((1 << bits) - 1) << shift;
  const b = Math.floor(i / per);
  block[b] = (block[b]! & ~mask) | ((v << shift) & mask);
}
