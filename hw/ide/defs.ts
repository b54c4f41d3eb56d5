/**
 * ATA/ATAPI register bits, command opcodes and the shapes the IDE modules share (ATA8-ACS,
 * MMC). Kept apart from core.ts so the command modules depend on it and not on each other.
 */

/** Status register. */
export const ST = { ERR: 0x01, DRQ: 0x08, DSC: 0x10, DF: 0x20, DRDY: 0x40, BSY: 0x80 } as const;
/** Error register. */
export const ER = { AMNF: 0x01, ABRT: 0x04, MCR: 0x08, IDNF: 0x10, MC: 0x20, UNC: 0x40 } as const;
/** Device control register. */
export const CTL = { NIEN: 0x02, SRST: 0x04, HOB: 0x80 } as const;

export const CMD = {
  NOP: 0x00,
  DSM: 0x06,
  DEVICE_RESET: 0x08,
  RECALIBRATE: 0x10,
  READ_SECTORS: 0x20,
  READ_SECTORS_NR: 0x21,
  READ_SECTORS_EXT: 0x24,
  READ_DMA_EXT: 0x25,
  READ_NATIVE_MAX_EXT: 0x27,
  READ_MULTIPLE_EXT: 0x29,
  WRITE_SECTORS: 0x30,
  WRITE_SECTORS_NR: 0x31,
  WRITE_SECTORS_EXT: 0x34,
  WRITE_DMA_EXT: 0x35,
  WRITE_MULTIPLE_EXT: 0x39,
  DIAGNOSTIC: 0x90,
  INIT_PARAMS: 0x91,
  PACKET: 0xa0,
  IDENTIFY_PACKET: 0xa1,
  READ_MULTIPLE: 0xc4,
  WRITE_MULTIPLE: 0xc5,
  SET_MULTIPLE: 0xc6,
  READ_DMA: 0xc8,
  READ_DMA_NR: 0xc9,
  WRITE_DMA: 0xca,
  WRITE_DMA_NR: 0xcb,
  STANDBY_IMMEDIATE: 0xe0,
  IDLE_IMMEDIATE: 0xe1,
  STANDBY: 0xe2,
  IDLE: 0xe3,
  CHECK_POWER: 0xe5,
  FLUSH_CACHE: 0xe7,
  IDENTIFY: 0xec,
  FLUSH_CACHE_EXT: 0xea,
  SET_FEATURES: 0xef,
  READ_NATIVE_MAX: 0xf8,
} as const;

/** The largest READ/WRITE MULTIPLE block this device offers (IDENTIFY word 47). */
export const MAX_MULT = 16;

/**
 * A DMA transfer a drive has set up and waits for the bus master to run. `run` gets the
 * guest memory (views, no copies) the PRD table describes, exactly `bytes` long.
 */
export interface DmaRequest {
  readonly bytes: number;
  run(iov: Uint8Array[]): void;
  /** The PRD table was unusable (outside RAM, too short): the command ends with an error. */
  prdError(): void;
}

/** What a drive needs of the bus master of its channel. */
export interface DmaEngine {
  /** A drive has a DMA request ready (or the guest started the engine): run it if both are. */
  kick(): void;
  /** The transfer ended (ok or not); the engine updates its status bits. */
  finish(ok: boolean): void;
  /** Sets the interrupt bit (INTRQ asserted). */
  interrupt(): void;
}

/** ATA strings: space padded, two characters a word, the first in the high byte. */
export function putString(words: Uint16Array, first: number, count: number, s: string): void {
  const padded = s.padEnd(count * 2, ' ').slice(0, count * 2);
  for (let i = 0; i < count; i++) words[first + i] = (padded.charCodeAt(2 * i) & 0xff) << 8 | (padded.charCodeAt(2 * i + 1) & 0xff);
}

/** Fills word 255 (signature 0xA5 and a checksum making the 512 bytes sum to 0 mod 256). */
export function identifyToBytes(words: Uint16Array): Uint8Array {
  words[255] = 0x00a5;
  const out = new Uint8Array(512);
  for (let i = 0; i < 256; i++) {
    out[2 * i] = words[i]! & 0xff;
    out[2 * i + 1] = words[i]! >> 8;
  }
  let sum = 0;
  for (let i = 0; i < 511; i++) sum += out[i]!;
  out[511] = (256 - (sum & 0xff)) & 0xff;
  return out;
}
