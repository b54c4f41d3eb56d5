/**
 * ATAPI CD-ROM (MMC over the PACKET command): IDENTIFY PACKET DEVICE, the 12-byte packet
 * phase, data-in by PIO (in byte-count-limited DRQ blocks) or DMA, sense data, UNIT
 * ATTENTION after a media change, the tray and its lock, and media events (GET EVENT STATUS
 * NOTIFICATION). The DeviceOps the backend calls for removable media live here.
 */
import type { DeviceOps } from '../../src/backend/device-ops.js';
import type { IdeDrive } from './core.js';
import { startDma, startDmaIo } from './ata.js';
import { ST, identifyToBytes, putString } from './defs.js';

export const SENSE = { NONE: 0, NOT_READY: 2, MEDIUM_ERROR: 3, ILLEGAL_REQUEST: 5, UNIT_ATTENTION: 6 } as const;
/** Media event codes (MMC, GET EVENT STATUS NOTIFICATION, media class). */
export const MEDIA_EVENT = { NONE: 0, EJECT_REQUEST: 1, NEW_MEDIA: 2, MEDIA_REMOVAL: 3 } as const;

const SECTOR = 2048;
/** Commands that run while a unit attention is pending (and do not report it). */
const ALLOW_UA = new Set([0x03, 0x12, 0x46, 0x4a]);
/** Commands that need a readable medium. */
const NEED_MEDIUM = new Set([0x00, 0x25, 0x28, 0xa8, 0x43]);

export class AtapiState {
  trayOpen = false;
  locked = false;
  senseKey = 0;
  asc = 0;
  ascq = 0;
  /** A media change the guest has not been told of (reported once, as UNIT ATTENTION). */
  unitAttention = false;
  /** The pending media event. */
  event = 0;
  /** Whether the current packet asked for DMA. */
  dma = false;

  reset(_d: IdeDrive): void {
    this.trayOpen = false;
    this.locked = false;
    this.senseKey = this.asc = this.ascq = 0;
    this.unitAttention = false;
    this.event = 0;
  }
}

/** What the block layer calls on a CD-ROM. */
export function atapiOps(d: IdeDrive): DeviceOps {
  const s = d.cd!;
  return {
    changeMedia: (load) => {
      s.trayOpen = !load;
      s.event = load ? MEDIA_EVENT.NEW_MEDIA : MEDIA_EVENT.MEDIA_REMOVAL;
      if (load) s.unitAttention = true;
    },
    ejectRequest: (force) => {
      s.event = MEDIA_EVENT.EJECT_REQUEST;
      if (force) s.locked = false;
    },
    isTrayOpen: () => s.trayOpen,
    isMediumLocked: () => s.locked,
  };
}

/** IDENTIFY PACKET DEVICE data. */
export function identifyPacket(d: IdeDrive): Uint8Array {
  const w = new Uint16Array(256);
  w[0] = 0x85c0; // ATAPI, CD-ROM, removable, 50 us DRQ, 12-byte packets
  putString(w, 10, 10, d.serial);
  putString(w, 23, 4, '1.0');
  putString(w, 27, 20, d.model);
  w[49] = 0x0300;
  w[53] = 0x0006;
  w[63] = 0x0007 | (d.mwdmaSel << 8);
  w[64] = 0x0003;
  w[65] = w[66] = w[67] = w[68] = 120;
  w[71] = w[72] = 30;
  w[80] = 0x00f0;
  w[82] = 0x0010;
  w[83] = w[84] = w[87] = 0x4000;
  w[85] = 0x0010;
  w[88] = 0x003f | (d.udmaSel << 8);
  w[93] = 0x6001;
  return identifyToBytes(w);
}

/** PACKET: the device takes 12 command bytes (CoD=1, IO=0), no interrupt before. */
export function atapiPacket(d: IdeDrive): void {
  const s = d.cd!;
  s.dma = (d.feature & 0x01) !== 0;
  const bcl = d.lcyl | (d.hcyl << 8);
  d.nsector = (d.nsector & ~0x07) | 0x01;
  d.pioOut(12, 12, (cdb) => exec(d, cdb.slice(), bcl), () => undefined);
  d.status = ST.DRDY | ST.DRQ;
}

function checkCondition(d: IdeDrive, key: number, asc: number, ascq: number): void {
  const s = d.cd!;
  s.senseKey = key;
  s.asc = asc;
  s.ascq = ascq;
  d.nsector = (d.nsector & ~0x07) | 0x03;
  d.abort(key << 4);
}

function ok(d: IdeDrive): void {
  const s = d.cd!;
  s.senseKey = s.asc = s.ascq = 0;
  d.nsector = (d.nsector & ~0x07) | 0x03;
  d.pio = null;
  d.status = ST.DRDY;
  d.raiseIrq();
}

const be16 = (b: Uint8Array, o: number): number => (b[o]! << 8) | b[o + 1]!;
const be32 = (b: Uint8Array, o: number): number => ((b[o]! << 24) | (b[o + 1]! << 16) | (b[o + 2]! << 8) | b[o + 3]!) >>> 0;
function put32(b: Uint8Array, o: number, v: number): void {
  b[o] = v >>> 24; b[o + 1] = (v >>> 16) & 0xff; b[o + 2] = (v >>> 8) & 0xff; b[o + 3] = v & 0xff;
}

/** Sends `data` (cut to `alloc`) to the host, by DMA or in PIO blocks of the byte count limit. */
function reply(d: IdeDrive, data: Uint8Array, alloc: number, bcl: number): void {
  const out = data.subarray(0, Math.min(data.length, alloc));
  if (!out.length) return ok(d);
  if (d.cd!.dma) {
    return startDma(d, out.length, (iov, finish) => {
      let at = 0;
      for (const v of iov) {
        v.set(out.subarray(at, at + v.length));
        at += v.length;
      }
      finish(0);
    }, replyDmaDone);
  }
  pioData(d, out, bcl);
}

function replyDmaDone(d: IdeDrive, err: number): void {
  if (err) checkCondition(d, SENSE.ILLEGAL_REQUEST, 0x24, 0);
  else ok(d);
}

function readDmaDone(d: IdeDrive, err: number): void {
  if (err) checkCondition(d, SENSE.MEDIUM_ERROR, 0x11, 0);
  else ok(d);
}

function pioData(d: IdeDrive, out: Uint8Array, bcl: number): void {
  let limit = bcl === 0 || bcl === 0xffff ? 0xfffe : bcl;
  if (limit < out.length && limit & 1) limit--;
  d.pioIn(out, limit, () => ok(d), (len) => {
    d.nsector = (d.nsector & ~0x07) | 0x02;
    d.lcyl = len & 0xff;
    d.hcyl = len >> 8;
  });
}

function sectors2048(d: IdeDrive): number {
  return d.io ? Math.floor(d.io.getLength() / SECTOR) : 0;
}

function exec(d: IdeDrive, cdb: Uint8Array, bcl: number): void {
  const s = d.cd!;
  const op = cdb[0]!;
  if (s.unitAttention && !ALLOW_UA.has(op)) {
    s.unitAttention = false;
    return checkCondition(d, SENSE.UNIT_ATTENTION, 0x28, 0x00);
  }
  if (NEED_MEDIUM.has(op) && !d.hasMedium) return checkCondition(d, SENSE.NOT_READY, 0x3a, s.trayOpen ? 0x02 : 0x01);
  switch (op) {
    case 0x00: return ok(d); // TEST UNIT READY
    case 0x03: { // REQUEST SENSE
      const b = new Uint8Array(18);
      if (s.unitAttention) {
        s.unitAttention = false;
        [s.senseKey, s.asc, s.ascq] = [SENSE.UNIT_ATTENTION, 0x28, 0];
      }
      b[0] = 0x70;
      b[2] = s.senseKey;
      b[7] = 10;
      b[12] = s.asc;
      b[13] = s.ascq;
      return reply(d, b, cdb[4]!, bcl);
    }
    case 0x12: { // INQUIRY
      const b = new Uint8Array(36);
      b[0] = 0x05;
      b[1] = 0x80;
      b[2] = 0x00;
      b[3] = 0x21;
      b[4] = 31;
      b.set(new TextEncoder().encode('SPINDLE '), 8);
      b.set(new TextEncoder().encode(d.model.padEnd(16, ' ').slice(0, 16)), 16);
      b.set(new TextEncoder().encode('1.0 '), 32);
      return reply(d, b, be16(cdb, 3), bcl);
    }
    case 0x1b: { // START STOP UNIT
      const loej = (cdb[4]! & 2) !== 0;
      const start = (cdb[4]! & 1) !== 0;
      if (loej) {
        if (!start) {
          if (s.locked) return checkCondition(d, SENSE.ILLEGAL_REQUEST, 0x53, 0x02);
          s.trayOpen = true;
        } else if (s.trayOpen) {
          s.trayOpen = false;
          if (d.io?.isInserted()) s.event = MEDIA_EVENT.NEW_MEDIA;
        }
      }
      return ok(d);
    }
    case 0x1e: // PREVENT ALLOW MEDIUM REMOVAL
      s.locked = (cdb[4]! & 1) !== 0;
      return ok(d);
    case 0x25: { // READ CAPACITY
      const b = new Uint8Array(8);
      put32(b, 0, Math.max(0, sectors2048(d) - 1));
      put32(b, 4, SECTOR);
      return reply(d, b, 8, bcl);
    }
    case 0x28: return read(d, be32(cdb, 2), be16(cdb, 7), bcl);
    case 0xa8: return read(d, be32(cdb, 2), be32(cdb, 6), bcl);
    case 0x43: return readToc(d, cdb, bcl);
    case 0x5a: return modeSense(d, cdb, bcl);
    case 0x46: return getConfiguration(d, cdb, bcl);
    case 0x4a: { // GET EVENT STATUS NOTIFICATION
      if (!(cdb[1]! & 1)) return checkCondition(d, SENSE.ILLEGAL_REQUEST, 0x24, 0);
      const alloc = be16(cdb, 7);
      if (!(cdb[4]! & 0x10)) return reply(d, Uint8Array.of(0, 2, 0x80, 0x10), alloc, bcl);
      const b = Uint8Array.of(0, 6, 0x04, 0x10, s.event, (s.trayOpen ? 1 : 0) | (d.hasMedium ? 2 : 0), 0, 0);
      s.event = MEDIA_EVENT.NONE;
      return reply(d, b, alloc, bcl);
    }
    default:
      return checkCondition(d, SENSE.ILLEGAL_REQUEST, 0x20, 0);
  }
}

function read(d: IdeDrive, lba: number, count: number, bcl: number): void {
  if (count === 0) return ok(d);
  if (lba + count > sectors2048(d)) return checkCondition(d, SENSE.ILLEGAL_REQUEST, 0x21, 0);
  const io = d.io!;
  const bytes = count * SECTOR;
  const gen = d.gen;
  if (d.cd!.dma) return startDmaIo(d, false, lba * SECTOR, bytes, 1, readDmaDone);
  d.status = ST.DRDY | ST.BSY;
  const buf = new Uint8Array(bytes);
  io.readv(lba * SECTOR, bytes, [buf], 0, (err) => {
    if (gen !== d.gen) return;
    if (err) return checkCondition(d, SENSE.MEDIUM_ERROR, 0x11, 0);
    pioData(d, buf, bcl);
  });
}

function msf(b: Uint8Array, o: number, lba: number): void {
  const f = lba + 150;
  b[o] = 0;
  b[o + 1] = Math.floor(f / 4500);
  b[o + 2] = Math.floor(f / 75) % 60;
  b[o + 3] = f % 75;
}

function readToc(d: IdeDrive, cdb: Uint8Array, bcl: number): void {
  const useMsf = (cdb[1]! & 2) !== 0;
  const format = (cdb[2]! & 0x0f) || (cdb[9]! >> 6);
  const track = cdb[6]!;
  const alloc = be16(cdb, 7);
  const addr = (b: Uint8Array, o: number, lba: number): void => (useMsf ? msf(b, o, lba) : put32(b, o, lba));
  if (format === 0) {
    if (track > 1 && track !== 0xaa) return checkCondition(d, SENSE.ILLEGAL_REQUEST, 0x24, 0);
    const tracks: [number, number][] = track <= 1 ? [[1, 0], [0xaa, sectors2048(d)]] : [[0xaa, sectors2048(d)]];
    const b = new Uint8Array(4 + 8 * tracks.length);
    b[1] = b.length - 2;
    b[2] = 1;
    b[3] = 1;
    tracks.forEach(([n, lba], i) => {
      b[4 + 8 * i + 1] = 0x14; // ADR 1, data track
      b[4 + 8 * i + 2] = n;
      addr(b, 4 + 8 * i + 4, lba);
    });
    return reply(d, b, alloc, bcl);
  }
  if (format === 1) {
    const b = new Uint8Array(12);
    b[1] = 10;
    b[2] = 1;
    b[3] = 1;
    b[5] = 0x14;
    b[6] = 1;
    addr(b, 8, 0);
    return reply(d, b, alloc, bcl);
  }
  checkCondition(d, SENSE.ILLEGAL_REQUEST, 0x24, 0);
}

function modeSense(d: IdeDrive, cdb: Uint8Array, bcl: number): void {
  const s = d.cd!;
  const page = cdb[2]! & 0x3f;
  if (cdb[2]! >> 6 === 3) return checkCondition(d, SENSE.ILLEGAL_REQUEST, 0x39, 0);
  const recovery = Uint8Array.of(0x01, 0x06, 0x00, 0x05, 0, 0, 0, 0);
  const caps = new Uint8Array(20);
  caps.set([0x2a, 0x12, 0x00, 0x00, 0x71, 0x60, 0x29 | (s.locked ? 0x02 : 0), 0x03]);
  caps.set([0x1b, 0x90, 0x01, 0x00, 0x02, 0x00, 0x1b, 0x90], 8); // speeds, volume levels, buffer
  const pages = page === 0x01 ? [recovery] : page === 0x2a ? [caps] : page === 0x3f ? [recovery, caps] : null;
  if (!pages) return checkCondition(d, SENSE.ILLEGAL_REQUEST, 0x24, 0);
  const len = 8 + pages.reduce((n, p) => n + p.length, 0);
  const b = new Uint8Array(len);
  b[0] = (len - 2) >> 8;
  b[1] = (len - 2) & 0xff;
  b[2] = d.hasMedium ? 0x01 : 0x70;
  let at = 8;
  for (const p of pages) {
    b.set(p, at);
    at += p.length;
  }
  reply(d, b, be16(cdb, 7), bcl);
}

function getConfiguration(d: IdeDrive, cdb: Uint8Array, bcl: number): void {
  const rt = cdb[1]! & 3;
  if (rt === 3) return checkCondition(d, SENSE.ILLEGAL_REQUEST, 0x24, 0);
  const from = be16(cdb, 2);
  const cur = d.hasMedium ? 1 : 0;
  const features: [number, boolean, number[]][] = [
    [0x0000, true, [0x03, 4, 0x00, 0x08, cur, 0]], // profile list: CD-ROM
    [0x0001, true, [0x0b, 8, 0, 0, 0, 2, 1, 0, 0, 0]], // core: ATAPI
    [0x0003, true, [0x03, 4, 0x29, 0, 0, 0]], // removable medium: tray, eject, lock
    [0x001e, cur === 1, [0x08 | cur, 4, 0, 0, 0, 0]], // CD read
  ];
  const chosen = features.filter(([code, current]) => (rt === 2 ? code === from : code >= from && (rt === 0 || current)));
  const body = chosen.flatMap(([code, , rest]) => [code >> 8, code & 0xff, ...rest]);
  const b = new Uint8Array(8 + body.length);
  put32(b, 0, b.length - 4);
  b[7] = cur ? 0x08 : 0;
  b.set(body, 8);
  reply(d, b, be16(cdb, 7), bcl);
}
