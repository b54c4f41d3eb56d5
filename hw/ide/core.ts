/**
 * The IDE channel and its drives: the task file (with the LBA48 "HOB" second byte of each
 * register), status and error, device selection, the device control register (nIEN, SRST,
 * HOB), the interrupt a channel drives, and PIO data transfers through the data port.
 * Commands are carried out in ata.ts (both kinds of drive) and atapi.ts (CD-ROMs).
 */
import type { IoRegion } from '../core/address-space.js';
import type { BackendIO } from '../../src/backend/io.js';
import type { DeviceHandle, DeviceOps } from '../../src/backend/device-ops.js';
import type { BlockBackend } from '../../src/backend/backend.js';
import { HwError } from '../core/error.js';
import { ataCommand, ataReset, type DriveDma } from './ata.js';
import { AtapiState, atapiOps } from './atapi.js';
import { CTL, ST, type DmaEngine, type DmaRequest } from './defs.js';

export interface IdeDriveOptions {
  id: string;
  kind: 'hd' | 'cd';
  /** The backend; a cd may start empty (null). */
  drive: BlockBackend | null;
  serial?: string;
  model?: string;
}

interface PioState {
  buf: Uint8Array;
  pos: number;
  /** The current DRQ block. */
  blockStart: number;
  blockEnd: number;
  blockSize: number;
  out: boolean;
  /** Called at the start of each block (ATAPI sets its byte count). */
  beforeBlock?: (len: number) => void;
  /** Out: a block arrived (`data`, at byte `start` of the transfer); call next() once stored. */
  onBlock?: (data: Uint8Array, start: number, next: () => void) => void;
  /** Everything moved. */
  finish: () => void;
}

let serialSeq = 0;

/** One ATA or ATAPI device on a channel; the block backend's device. */
export class IdeDrive implements DeviceHandle {
  readonly id: string;
  readonly kind: 'hd' | 'cd';
  readonly serial: string;
  readonly model: string;
  private readonly backend: BlockBackend | null;
  /** The I/O half of the backend while attached. */
  io: BackendIO | null = null;
  channel: IdeChannel | null = null;
  unit: 0 | 1 = 0;

  // The task file, each register with its previous value (the HOB byte for LBA48).
  feature = 0; hobFeature = 0;
  nsector = 0; hobNsector = 0;
  sector = 0; hobSector = 0;
  lcyl = 0; hobLcyl = 0;
  hcyl = 0; hobHcyl = 0;
  select = 0xa0;
  status = 0;
  error = 0;
  irqPending = false;
  /** READ/WRITE MULTIPLE block size in sectors (0: multiple mode off). */
  multCount = 0;
  /** Transfer modes chosen by SET FEATURES (IDENTIFY words 63/88 high bytes). */
  mwdmaSel = 0;
  udmaSel = 0x20;
  /** Bumped on reset: completions of older commands are dropped. */
  gen = 0;
  pio: PioState | null = null;
  dma: DmaRequest | null = null;
  /** The reusable DMA command object (ata.ts startDma); `dma` points at it while pending. */
  dmaCmd: DriveDma | null = null;
  readonly cd: AtapiState | null;

  constructor(opts: IdeDriveOptions) {
    if (opts.kind !== 'hd' && opts.kind !== 'cd') throw new HwError('EINVAL', `ide drive '${opts.id}': kind must be 'hd' or 'cd', not '${String(opts.kind)}'`);
    if (opts.kind === 'hd' && !opts.drive) throw new HwError('EINVAL', `ide-hd '${opts.id}' needs a drive`);
    this.id = opts.id;
    this.kind = opts.kind;
    this.backend = opts.drive;
    this.serial = opts.serial ?? `SP${String(++serialSeq).padStart(8, '0')}`;
    this.model = opts.model ?? (opts.kind === 'cd' ? 'SPINDLE DVD-ROM' : 'SPINDLE HARDDISK');
    this.cd = opts.kind === 'cd' ? new AtapiState() : null;
  }

  /** Plugged into a channel: takes the backend's I/O half. */
  attachTo(ch: IdeChannel, unit: 0 | 1): void {
    if (this.channel) throw new HwError('EBUSY', `ide drive '${this.id}' is already attached`);
    const ops: DeviceOps = this.kind === 'cd' ? atapiOps(this) : { resize: () => undefined };
    if (this.backend) this.io = this.backend.attachDevice(this, ops);
    this.channel = ch;
    this.unit = unit;
    if (this.cd) this.cd.reset(this);
    ataReset(this);
  }

  detach(): void {
    this.gen++;
    this.pio = null;
    this.dma = null;
    if (this.backend && this.io) this.backend.detachDevice(this);
    this.io = null;
    this.channel = null;
  }

  /** Whether a medium is there to read (a cd's tray closed and loaded). */
  get hasMedium(): boolean {
    return this.io?.isInserted() === true && !(this.cd?.trayOpen ?? false);
  }

  /** Sectors of 512 bytes on the medium. */
  get sectors(): number {
    return this.io && this.io.isInserted() ? Math.floor(this.io.getLength() / 512) : 0;
  }

  raiseIrq(): void {
    this.irqPending = true;
    this.channel?.irqRaised(this);
  }

  /** Ends a command with ABRT (or the given error bits). */
  abort(err = 0x04): void {
    this.pio = null;
    this.dma = null;
    this.error = err;
    this.status = ST.DRDY | ST.ERR;
    this.raiseIrq();
  }

  /** Ends a command without error, with an interrupt. */
  done(): void {
    this.pio = null;
    this.status = ST.DRDY | ST.DSC;
    this.raiseIrq();
  }

  /** Data to the host in DRQ blocks of `blockSize`, an interrupt before each. */
  pioIn(buf: Uint8Array, blockSize: number, finish: () => void, beforeBlock?: (len: number) => void): void {
    this.pio = { buf, pos: 0, blockStart: 0, blockEnd: 0, blockSize, out: false, finish, ...(beforeBlock ? { beforeBlock } : {}) };
    this.nextBlock(true);
  }

  /** Data from the host in DRQ blocks; `onBlock` stores each. No interrupt before the first. */
  pioOut(bytes: number, blockSize: number, onBlock: (data: Uint8Array, start: number, next: () => void) => void, finish: () => void): void {
    this.pio = { buf: new Uint8Array(bytes), pos: 0, blockStart: 0, blockEnd: 0, blockSize, out: true, onBlock, finish };
    this.nextBlock(false);
  }

  private nextBlock(irq: boolean): void {
    const p = this.pio!;
    if (p.pos >= p.buf.length) {
      this.pio = null;
      p.finish();
      return;
    }
    const len = Math.min(p.blockSize, p.buf.length - p.pos);
    p.blockStart = p.pos;
    p.blockEnd = p.pos + len;
    p.beforeBlock?.(len);
    this.status = ST.DRDY | ST.DSC | ST.DRQ;
    if (irq) this.raiseIrq();
  }

  /** The data port, read by the host. */
  dataRead(size: 1 | 2 | 4): number {
    const p = this.pio;
    if (!p || p.out || !(this.status & ST.DRQ)) return 0xffffffff >>> (32 - 8 * size);
    let v = 0;
    for (let i = 0; i < size && p.pos < p.blockEnd; i++) v |= p.buf[p.pos++]! << (8 * i);
    if (p.pos >= p.blockEnd) this.blockDone(p);
    return v >>> 0;
  }

  dataWrite(size: 1 | 2 | 4, v: number): void {
    const p = this.pio;
    if (!p || !p.out || !(this.status & ST.DRQ)) return;
    for (let i = 0; i < size && p.pos < p.blockEnd; i++) p.buf[p.pos++] = (v >>> (8 * i)) & 0xff;
    if (p.pos >= p.blockEnd) this.blockDone(p);
  }

  private blockDone(p: PioState): void {
    if (!p.out) return this.nextBlock(true);
    this.status = ST.DRDY | ST.BSY;
    const gen = this.gen;
    p.onBlock!(p.buf.subarray(p.blockStart, p.blockEnd), p.blockStart, () => {
      if (gen !== this.gen || this.pio !== p) return;
      if (p.pos >= p.buf.length) {
        this.pio = null;
        p.finish();
        return;
      }
      this.nextBlock(true);
    });
  }
}

/** One IDE channel (ide.0, ide.1): two drive positions, shared registers, one interrupt. */
export class IdeChannel {
  readonly drives: [IdeDrive | null, IdeDrive | null] = [null, null];
  /** The drive the device register selects. */
  unit: 0 | 1 = 0;
  devctl = 0;
  dmaEngine: DmaEngine | null = null;
  private level = false;

  /** The command block (8 ports) and the control block (device control / alternate status). */
  readonly cmdRegion: IoRegion;
  readonly ctlRegion: IoRegion;

  constructor(readonly name: string, private readonly setLine: (level: boolean) => void) {
    this.cmdRegion = { name: `${name} command block`, read: (off, size) => this.readReg(off, size), write: (off, size, v) => this.writeReg(off, size, v) };
    this.ctlRegion = {
      name: `${name} control block`,
      read: () => this.selected()?.status ?? (this.empty() ? 0xff : 0),
      write: (_off, _size, v) => this.writeCtl(v & 0xff),
    };
  }

  attach(unit: 0 | 1, d: IdeDrive): void {
    if (this.drives[unit]) throw new HwError('EBUSY', `${this.name} unit ${unit} is in use by '${this.drives[unit]!.id}'`);
    d.attachTo(this, unit);
    this.drives[unit] = d;
  }

  detach(unit: 0 | 1): void {
    const d = this.drives[unit];
    if (!d) throw new HwError('ENOENT', `${this.name} unit ${unit} has no drive`);
    this.drives[unit] = null;
    d.detach();
    this.updateIrq();
  }

  selected(): IdeDrive | null {
    return this.drives[this.unit];
  }

  private empty(): boolean {
    return !this.drives[0] && !this.drives[1];
  }

  private each(fn: (d: IdeDrive) => void): void {
    for (const d of this.drives) if (d) fn(d);
  }

  /** A drive asserted INTRQ. */
  irqRaised(d: IdeDrive): void {
    if (d === this.selected() && !(this.devctl & CTL.NIEN)) this.dmaEngine?.interrupt();
    this.updateIrq();
  }

  updateIrq(): void {
    const d = this.selected();
    const level = !!d && d.irqPending && !(this.devctl & CTL.NIEN);
    if (level === this.level) return;
    this.level = level;
    this.setLine(level);
  }

  private readReg(off: number, size: 1 | 2 | 4): number {
    const d = this.selected();
    if (off === 0) return d ? d.dataRead(size) : 0xffffffff >>> (32 - 8 * size);
    if (!d) return this.empty() ? 0xff : 0;
    const hob = (this.devctl & CTL.HOB) !== 0;
    switch (off) {
      case 1: return d.error;
      case 2: return hob ? d.hobNsector : d.nsector;
      case 3: return hob ? d.hobSector : d.sector;
      case 4: return hob ? d.hobLcyl : d.lcyl;
      case 5: return hob ? d.hobHcyl : d.hcyl;
      case 6: return d.select;
      default:
        d.irqPending = false;
        this.updateIrq();
        return d.status;
    }
  }

  private writeReg(off: number, size: 1 | 2 | 4, v: number): void {
    if (off === 0) return void this.selected()?.dataWrite(size, v);
    v &= 0xff;
    if (off !== 7) this.devctl &= ~CTL.HOB;
    switch (off) {
      case 1: case 2: case 3: case 4: case 5: return this.latch(off, v);
      case 6:
        this.latch(6, v);
        this.unit = ((v >> 4) & 1) as 0 | 1;
        return this.updateIrq();
      default: {
        const d = this.selected();
        if (!d || this.devctl & CTL.SRST) return;
        if (d.status & ST.BSY && !(d.kind === 'cd' && v === 0x08)) return;
        d.irqPending = false;
        this.updateIrq();
        d.pio = null;
        d.dma = null;
        d.error = 0;
        ataCommand(d, v);
      }
    }
  }

  /** A task-file register write reaches both drives (no per-write closure). */
  private latch(off: number, v: number): void {
    const d0 = this.drives[0];
    if (d0) latchReg(d0, off, v);
    const d1 = this.drives[1];
    if (d1) latchReg(d1, off, v);
  }

  private writeCtl(v: number): void {
    const was = this.devctl;
    this.devctl = v;
    if (v & CTL.SRST && !(was & CTL.SRST)) {
      this.each((d) => {
        d.gen++;
        d.pio = null;
        d.dma = null;
        // The reset forgets commands: one the error policy stopped must not be retried, and
        // its bus master, which waited for it, is free again.
        if (d.io && d.io.dropStopped() > 0 && d.dmaCmd?.inFlight) d.dmaCmd.abandon();
        d.irqPending = false;
        d.status = ST.BSY | ST.DSC;
      });
    } else if (!(v & CTL.SRST) && was & CTL.SRST) {
      this.unit = 0;
      this.each((d) => {
        d.select = 0xa0;
        ataReset(d);
      });
    }
    this.updateIrq();
  }
}

/** Register `off` (1-6) of one drive takes `v`; the old byte of 1-5 becomes its HOB byte. */
function latchReg(d: IdeDrive, off: number, v: number): void {
  switch (off) {
    case 1: d.hobFeature = d.feature; d.feature = v; return;
    case 2: d.hobNsector = d.nsector; d.nsector = v; return;
    case 3: d.hobSector = d.sector; d.sector = v; return;
    case 4: d.hobLcyl = d.lcyl; d.lcyl = v; return;
    case 5: d.hobHcyl = d.hcyl; d.hcyl = v; return;
    case 6: d.select = v | 0xa0; return;
  }
}
