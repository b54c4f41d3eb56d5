/**
 * ATA commands (ATA8-ACS): IDENTIFY DEVICE, PIO and DMA reads and writes (28- and 48-bit,
 * single-sector and MULTIPLE), FLUSH CACHE, SET FEATURES, READ NATIVE MAX ADDRESS, DATA SET
 * MANAGEMENT (TRIM), EXECUTE DEVICE DIAGNOSTIC, and the signatures a reset leaves. A CD-ROM
 * gets the few ATA commands an ATAPI device takes; PACKET goes to atapi.ts.
 */
import type { BackendIO } from '../../src/backend/io.js';
import type { IdeDrive } from './core.js';
import { atapiPacket, identifyPacket } from './atapi.js';
import { CMD, ER, MAX_MULT, ST, identifyToBytes, putString, type DmaEngine, type DmaRequest } from './defs.js';

const HEADS = 16;
const SPT = 63;

/** Signature and idle state after power-on, SRST, DEVICE RESET or diagnostics. */
export function ataReset(d: IdeDrive): void {
  d.gen++;
  d.pio = null;
  d.dma = null;
  d.irqPending = false;
  d.nsector = d.sector = 1;
  d.hobNsector = d.hobSector = d.hobLcyl = d.hobHcyl = d.hobFeature = d.feature = 0;
  d.lcyl = d.kind === 'cd' ? 0x14 : 0;
  d.hcyl = d.kind === 'cd' ? 0xeb : 0;
  d.error = 0x01;
  d.status = d.kind === 'cd' ? 0 : ST.DRDY | ST.DSC;
}

export function ataCommand(d: IdeDrive, cmd: number): void {
  const cd = d.kind === 'cd';
  switch (cmd) {
    case CMD.DIAGNOSTIC:
      for (const x of d.channel!.drives) if (x) ataReset(x);
      return d.raiseIrq();
    case CMD.SET_FEATURES: return setFeatures(d);
    case CMD.CHECK_POWER:
      d.nsector = 0xff;
      return d.done();
    case CMD.IDENTIFY:
      if (cd) {
        ataReset(d);
        return d.abort();
      }
      return d.pioIn(identify(d), 512, () => void (d.status = ST.DRDY | ST.DSC));
  }
  if (cd) {
    switch (cmd) {
      case CMD.DEVICE_RESET: return ataReset(d);
      case CMD.IDENTIFY_PACKET: return d.pioIn(identifyPacket(d), 512, () => void (d.status = ST.DRDY));
      case CMD.PACKET: return atapiPacket(d);
      default: return d.abort();
    }
  }
  switch (cmd) {
    case CMD.READ_SECTORS: case CMD.READ_SECTORS_NR: return pioRw(d, false, false, 1);
    case CMD.READ_SECTORS_EXT: return pioRw(d, false, true, 1);
    case CMD.WRITE_SECTORS: case CMD.WRITE_SECTORS_NR: return pioRw(d, true, false, 1);
    case CMD.WRITE_SECTORS_EXT: return pioRw(d, true, true, 1);
    case CMD.READ_MULTIPLE: return d.multCount ? pioRw(d, false, false, d.multCount) : d.abort();
    case CMD.READ_MULTIPLE_EXT: return d.multCount ? pioRw(d, false, true, d.multCount) : d.abort();
    case CMD.WRITE_MULTIPLE: return d.multCount ? pioRw(d, true, false, d.multCount) : d.abort();
    case CMD.WRITE_MULTIPLE_EXT: return d.multCount ? pioRw(d, true, true, d.multCount) : d.abort();
    case CMD.READ_DMA: case CMD.READ_DMA_NR: return dmaRw(d, false, false);
    case CMD.READ_DMA_EXT: return dmaRw(d, false, true);
    case CMD.WRITE_DMA: case CMD.WRITE_DMA_NR: return dmaRw(d, true, false);
    case CMD.WRITE_DMA_EXT: return dmaRw(d, true, true);
    case CMD.SET_MULTIPLE: {
      const n = d.nsector;
      if (n > MAX_MULT || n & (n - 1)) return d.abort();
      d.multCount = n;
      return d.done();
    }
    case CMD.FLUSH_CACHE: case CMD.FLUSH_CACHE_EXT: {
      d.status = ST.DRDY | ST.BSY;
      const gen = d.gen;
      d.io!.flush().then(
        () => gen === d.gen && d.done(),
        () => gen === d.gen && d.abort(),
      );
      return;
    }
    case CMD.READ_NATIVE_MAX: {
      const max = Math.min(d.sectors, 2 ** 28) - 1;
      setLba(d, Math.max(0, max), false);
      return d.done();
    }
    case CMD.READ_NATIVE_MAX_EXT:
      setLba(d, Math.max(0, d.sectors - 1), true);
      return d.done();
    case CMD.DSM: return dsm(d);
    case CMD.RECALIBRATE: case CMD.INIT_PARAMS: return d.done();
    // Power management: an emulated disk has no spindle to stop (Linux sends STANDBY
    // IMMEDIATE at shutdown); it stays active, as CHECK POWER MODE says.
    case CMD.STANDBY_IMMEDIATE: case CMD.IDLE_IMMEDIATE: case CMD.STANDBY: case CMD.IDLE: return d.done();
    default: return d.abort();
  }
}

/** The start LBA of a command, or -1 for an invalid CHS address. */
function lbaOf(d: IdeDrive, ext: boolean): number {
  const low = ((d.hcyl << 16) | (d.lcyl << 8) | d.sector) >>> 0;
  if (ext) return low + (d.hobSector + d.hobLcyl * 256 + d.hobHcyl * 65536) * 2 ** 24;
  if (d.select & 0x40) return low + (d.select & 0x0f) * 2 ** 24;
  const cyl = d.lcyl | (d.hcyl << 8);
  if (d.sector === 0 || d.sector > SPT) return -1;
  return (cyl * HEADS + (d.select & 0x0f)) * SPT + d.sector - 1;
}

function countOf(d: IdeDrive, ext: boolean): number {
  return ext ? ((d.hobNsector << 8) | d.nsector) || 65536 : d.nsector || 256;
}

function setLba(d: IdeDrive, lba: number, ext: boolean): void {
  d.sector = lba & 0xff;
  d.lcyl = (lba >>> 8) & 0xff;
  d.hcyl = (lba >>> 16) & 0xff;
  if (ext) {
    const hi = Math.floor(lba / 2 ** 24);
    d.hobSector = hi & 0xff;
    d.hobLcyl = (hi >>> 8) & 0xff;
    d.hobHcyl = (hi >>> 16) & 0xff;
  } else {
    d.select = (d.select & 0xf0) | ((lba >>> 24) & 0x0f);
  }
}

function inRange(d: IdeDrive, lba: number, count: number): boolean {
  return lba >= 0 && lba + count <= d.sectors;
}

function pioRw(d: IdeDrive, write: boolean, ext: boolean, block: number): void {
  const lba = lbaOf(d, ext);
  const count = countOf(d, ext);
  if (!inRange(d, lba, count)) return d.abort(ER.IDNF);
  const io = d.io!;
  const gen = d.gen;
  if (write) {
    if (io.isReadOnly()) return d.abort();
    d.pioOut(count * 512, block * 512, (data, start, next) => {
      io.writev(lba * 512 + start, data.length, [data], 0, (err) => {
        if (gen !== d.gen) return;
        if (err) return d.abort();
        next();
      });
    }, () => d.done());
    return;
  }
  d.status = ST.DRDY | ST.BSY;
  const buf = new Uint8Array(count * 512);
  io.readv(lba * 512, buf.length, [buf], 0, (err) => {
    if (gen !== d.gen) return;
    if (err) return d.abort(ER.UNC);
    d.pioIn(buf, block * 512, () => void (d.status = ST.DRDY | ST.DSC));
  });
}

/** Moves a DMA command's data given the PRD buffers; calls `finish` (0: success) once done. */
export type DmaRun = (iov: Uint8Array[], finish: (err: number) => void) => void;
/** Ends a DMA command (err: what `finish` was given, or ER.ABRT for an unusable PRD table). */
export type DmaComplete = (d: IdeDrive, err: number) => void;

/** The default end of an ATA DMA command. */
function ataDmaDone(d: IdeDrive, err: number): void {
  if (err) d.abort(err);
  else d.done();
}

/**
 * A drive's DMA command as the bus master sees it, reused from command to command so the
 * hot path allocates nothing: run/prdError are methods, the completions are bound once. Its
 * fields must not change while it is at the backend (`inFlight`), so a command started then
 * (a reset made the old one stale) gets a fresh object.
 */
export class DriveDma implements DmaRequest {
  bytes = 0;
  inFlight = false;
  private gen = 0;
  private engine: DmaEngine = null!;
  private io: BackendIO | null = null;
  /** A backend transfer (`write`, at `offset`, failing with `ioErr`), unless `custom` is set. */
  private custom: DmaRun | null = null;
  private write = false;
  private offset = 0;
  private ioErr = 0;
  private complete: DmaComplete = ataDmaDone;
  private readonly finish = (err: number): void => {
    this.inFlight = false;
    // The engine is released even if a reset made the command stale.
    this.engine.finish(err === 0);
    if (this.gen === this.d.gen) this.complete(this.d, err);
  };
  private readonly ioDone = (err: unknown): void => this.finish(err ? this.ioErr : 0);

  constructor(private readonly d: IdeDrive) {}

  set(engine: DmaEngine, bytes: number, custom: DmaRun | null, write: boolean, offset: number, ioErr: number, complete: DmaComplete): void {
    this.gen = this.d.gen;
    this.engine = engine;
    this.io = this.d.io;
    this.bytes = bytes;
    this.custom = custom;
    this.write = write;
    this.offset = offset;
    this.ioErr = ioErr;
    this.complete = complete;
  }

  run(iov: Uint8Array[]): void {
    this.d.dma = null;
    this.inFlight = true;
    if (this.custom) this.custom(iov, this.finish);
    else if (this.write) this.io!.writev(this.offset, this.bytes, iov, 0, this.ioDone);
    else this.io!.readv(this.offset, this.bytes, iov, 0, this.ioDone);
  }

  /** Its backend request was dropped (stopped by the error policy, then a reset): release the engine. */
  abandon(): void {
    this.inFlight = false;
    this.engine.finish(false);
  }

  prdError(): void {
    if (this.gen === this.d.gen) this.complete(this.d, ER.ABRT);
  }
}

/** Sets up a DMA transfer for the bus master; the drive is BSY until it ends. */
export function startDma(d: IdeDrive, bytes: number, run: DmaRun, complete: DmaComplete = ataDmaDone): void {
  beginDma(d, bytes, run, false, 0, 0, complete);
}

/**
 * A DMA transfer straight between the PRD buffers and the backend, `bytes` at byte `offset`;
 * a backend error ends it with `ioErr`. No per-command closure.
 */
export function startDmaIo(d: IdeDrive, write: boolean, offset: number, bytes: number, ioErr: number, complete: DmaComplete = ataDmaDone): void {
  beginDma(d, bytes, null, write, offset, ioErr, complete);
}

function beginDma(d: IdeDrive, bytes: number, run: DmaRun | null, write: boolean, offset: number, ioErr: number, complete: DmaComplete): void {
  const engine = d.channel?.dmaEngine;
  if (!engine) return d.abort();
  let r = d.dmaCmd;
  if (!r || r.inFlight) r = d.dmaCmd = new DriveDma(d);
  r.set(engine, bytes, run, write, offset, ioErr, complete);
  d.status = ST.DRDY | ST.BSY | ST.DSC;
  d.dma = r;
  engine.kick();
}

function dmaRw(d: IdeDrive, write: boolean, ext: boolean): void {
  const lba = lbaOf(d, ext);
  const count = countOf(d, ext);
  if (!inRange(d, lba, count)) return d.abort(ER.IDNF);
  if (write && d.io!.isReadOnly()) return d.abort();
  startDmaIo(d, write, lba * 512, count * 512, write ? ER.ABRT : ER.UNC);
}

/** DATA SET MANAGEMENT with TRIM: 8-byte range entries (48-bit LBA, 16-bit length) by DMA. */
function dsm(d: IdeDrive): void {
  const blocks = countOf(d, true);
  if (!(d.feature & 0x01) || blocks > 64) return d.abort();
  const io = d.io!;
  if (io.isReadOnly()) return d.abort();
  startDma(d, blocks * 512, (iov, finish) => {
    const data = new Uint8Array(blocks * 512);
    let at = 0;
    for (const v of iov) {
      data.set(v, at);
      at += v.length;
    }
    const dv = new DataView(data.buffer);
    const ranges: [number, number][] = [];
    for (let off = 0; off < data.length; off += 8) {
      const lba = dv.getUint32(off, true) + (dv.getUint16(off + 4, true) * 2 ** 32);
      const len = dv.getUint16(off + 6, true);
      if (len === 0) continue;
      if (!inRange(d, lba, len)) return finish(ER.IDNF | ER.ABRT);
      ranges.push([lba, len]);
    }
    (async () => {
      for (const [lba, len] of ranges) await io.discard(lba * 512, len * 512);
    })().then(() => finish(0), () => finish(ER.ABRT));
  });
}

function setFeatures(d: IdeDrive): void {
  switch (d.feature) {
    case 0x02: case 0x82:
      if (d.kind === 'cd' || !d.io) return d.abort();
      d.io.setWriteCache(d.feature === 0x02);
      return d.done();
    case 0x03: {
      const mode = d.nsector & 7;
      switch (d.nsector >> 3) {
        case 0: case 1: break;
        case 4:
          if (mode > 2) return d.abort();
          d.mwdmaSel = 1 << mode;
          d.udmaSel = 0;
          break;
        case 8:
          if (mode > 5) return d.abort();
          d.udmaSel = 1 << mode;
          d.mwdmaSel = 0;
          break;
        default: return d.abort();
      }
      return d.done();
    }
    case 0xaa: case 0x55: case 0x66: case 0xcc: return d.done();
    default: return d.abort();
  }
}

/** IDENTIFY DEVICE data. */
function identify(d: IdeDrive): Uint8Array {
  const w = new Uint16Array(256);
  const total = d.sectors;
  const cyls = Math.max(1, Math.min(16383, Math.floor(total / (HEADS * SPT))));
  const chs = cyls * HEADS * SPT;
  const lba28 = Math.min(total, 0x0fffffff);
  w[0] = 0x0040;
  w[1] = cyls;
  w[3] = HEADS;
  w[6] = SPT;
  putString(w, 10, 10, d.serial);
  putString(w, 23, 4, '1.0');
  putString(w, 27, 20, d.model);
  w[47] = 0x8000 | MAX_MULT;
  w[49] = 0x0300; // LBA, DMA
  w[50] = 0x4000;
  w[53] = 0x0007; // words 54-58, 64-70 and 88 valid
  w[54] = cyls;
  w[55] = HEADS;
  w[56] = SPT;
  w[57] = chs & 0xffff;
  w[58] = chs >>> 16;
  w[59] = 0x0100 | d.multCount;
  w[60] = lba28 & 0xffff;
  w[61] = lba28 >>> 16;
  w[63] = 0x0007 | (d.mwdmaSel << 8);
  w[64] = 0x0003;
  w[65] = w[66] = w[67] = w[68] = 120;
  w[80] = 0x01f0; // ATA/ATAPI-4 to ATA8-ACS
  const wc = d.io?.isWriteCacheEnabled() ? 0x0020 : 0;
  w[82] = 0x4020; // NOP, write cache
  w[83] = 0x7400; // FLUSH CACHE, FLUSH CACHE EXT, 48-bit
  w[84] = 0x4000;
  w[85] = 0x4000 | wc;
  w[86] = 0x3400;
  w[87] = 0x4000;
  w[88] = 0x003f | (d.udmaSel << 8);
  w[93] = 0x6001 | (d.unit ? 0 : 0x0008);
  for (let i = 0; i < 4; i++) w[100 + i] = Math.floor(total / 2 ** (16 * i)) & 0xffff;
  w[105] = 1; // DSM: one 512-byte block of ranges
  w[169] = 0x0001; // TRIM
  return identifyToBytes(w);
}
