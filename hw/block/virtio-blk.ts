/**
 * virtio-blk (virtio 1.0 section 5.2) on virtio-pci. Requests go to the BackendIO with
 * callbacks; the guest's buffers are the iovec (views of guest RAM, no copies); request
 * objects are pooled. Status codes as the spec has them: UNSUPP for unknown types, IOERR for
 * failures, out-of-range sectors, writes to a read-only disk and malformed chains.
 */
import type { BlockBackend } from '../../src/backend/backend.js';
import type { DeviceOps } from '../../src/backend/device-ops.js';
import type { BackendIO } from '../../src/backend/io.js';
import { HwError } from '../core/error.js';
import type { Device, Machine } from '../core/machine.js';
import type { GuestRam } from '../core/memory.js';
import type { PciBus } from '../pci/host.js';
import { bit, VIRTIO_CONFIG_S_DRIVER_OK, VirtioDevice } from '../virtio/virtio.js';
import { VirtioPciProxy } from '../virtio/virtio-pci.js';
import { VIRTQUEUE_MAX_SIZE, VirtQueueElement, type VirtQueue } from '../virtio/virtqueue.js';
import {
  VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_GEOMETRY, VIRTIO_BLK_F_RO,
  VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_CONFIG_WCE,
  VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_T_IN,
  VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_DISCARD,
  VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP,
  VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP, VIRTIO_BLK_ID_BYTES,
} from '../virtio/virtio-blk-abi.js';

export const VIRTIO_ID_BLOCK = 2;
export * from '../virtio/virtio-blk-abi.js';

/** Size of struct virtio_blk_config up to write_zeroes_may_unmap and its padding. */
export const VIRTIO_BLK_CONFIG_SIZE = 60;
export const VIRTIO_BLK_SIZE_MAX = 4 << 20;
export const VIRTIO_BLK_MAX_DISCARD_SECTORS = 0x3fffff;

const SECTOR = 512;

/** One request in flight; pooled and reused. */
class BlkReq {
  readonly elem = new VirtQueueElement();
  vq: VirtQueue = null!;
  /**
   * The data buffers (views of guest RAM), reused: entries [0, iovNum) are this request's, and
   * the array is exactly that long whenever it is handed to the backend (iovNum > 0).
   */
  readonly iov: Uint8Array[] = [];
  iovNum = 0;
  /** The guest address of the status byte (-1: the chain has none). */
  statusAt = -1;
  readonly done = (err: unknown): void => this.dev.finish(this, err ? VIRTIO_BLK_S_IOERR : VIRTIO_BLK_S_OK);
  readonly ok = (): void => this.dev.finish(this, VIRTIO_BLK_S_OK);
  readonly failed = (): void => this.dev.finish(this, VIRTIO_BLK_S_IOERR);
  constructor(private readonly dev: VirtioBlk) {}
}

export interface VirtioBlkConfigOptions {
  numQueues: number;
  queueSize: number;
  serial: string;
  /**
   * The logical block size the guest sees (config blk_size; QEMU's logical_block_size), a power
   * of 2 from 512: requests must start and end on it. Default 512.
   */
  blockSize?: number;
}

/** The virtio-blk device proper (transport-independent). */
export class VirtioBlk extends VirtioDevice {
  readonly config = new Uint8Array(VIRTIO_BLK_CONFIG_SIZE);
  private readonly cdv = new DataView(this.config.buffer);
  private readonly hdr = new Uint8Array(16);
  private readonly hdv = new DataView(this.hdr.buffer);
  private readonly pool: BlkReq[] = [];
  /** Guest RAM, for the header, the status byte and the data views. */
  private readonly serial: Uint8Array;
  private drained = false;
  /** The backend's write-cache setting before the driver changed it (restored on reset). */
  private readonly wceDefault: boolean;
  private capacity = 0;
  /** Logical block size in sectors, less one: a request's start and length must clear these bits. */
  private readonly blockMask: number;
  private readonly ram: GuestRam;
  /** Called after each request completes (a vhost-user back-end waits for a ring to go idle). */
  onFinish: ((vq: VirtQueue) => void) | null = null;

  constructor(ram: GuestRam, private readonly io: BackendIO, o: VirtioBlkConfigOptions) {
    super(VIRTIO_ID_BLOCK,
      bit(VIRTIO_BLK_F_SIZE_MAX) | bit(VIRTIO_BLK_F_SEG_MAX) | bit(VIRTIO_BLK_F_GEOMETRY) | bit(VIRTIO_BLK_F_BLK_SIZE) |
      bit(VIRTIO_BLK_F_FLUSH) | bit(VIRTIO_BLK_F_TOPOLOGY) | bit(VIRTIO_BLK_F_CONFIG_WCE) | bit(VIRTIO_BLK_F_MQ) |
      bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES) | (io.isReadOnly() ? bit(VIRTIO_BLK_F_RO) : 0n),
      ram, o.numQueues, o.queueSize);
    this.ram = ram;
    this.serial = new TextEncoder().encode(o.serial);
    this.wceDefault = io.isWriteCacheEnabled();
    const bs = o.blockSize ?? SECTOR;
    if (!Number.isInteger(bs) || bs < SECTOR || bs > 2 ** 21 || (bs & (bs - 1)) !== 0) {
      throw new RangeError(`logical block size ${bs} is not a power of 2 from 512 to 2 MiB`);
    }
    this.blockMask = bs / SECTOR - 1;
    const c = this.cdv;
    c.setUint32(8, VIRTIO_BLK_SIZE_MAX, true);
    c.setUint32(12, o.queueSize - 2, true);
    c.setUint8(18, 16); // geometry: cylinders (le16 at 16, from capacity), heads, sectors
    c.setUint8(19, 63);
    c.setUint32(20, bs, true);
    // topology: physical_block_exp 0, alignment_offset 0, min_io_size 0, opt_io_size 0
    c.setUint16(34, o.numQueues, true);
    c.setUint32(36, VIRTIO_BLK_MAX_DISCARD_SECTORS, true);
    c.setUint32(40, 1, true);
    c.setUint32(44, bs / SECTOR, true); // discard_sector_alignment
    c.setUint32(48, VIRTIO_BLK_MAX_DISCARD_SECTORS, true);
    c.setUint32(52, 1, true);
    c.setUint8(56, 1);
    this.updateCapacity();
    this.config[32] = this.wceDefault ? 1 : 0;
  }

  /** Refreshes capacity (and geometry) from the backend; true if it changed. */
  updateCapacity(): boolean {
    const sectors = Math.floor(this.io.getLength() / SECTOR);
    const changed = sectors !== this.capacity;
    this.capacity = sectors;
    this.cdv.setUint32(0, sectors % 2 ** 32, true);
    this.cdv.setUint32(4, Math.floor(sectors / 2 ** 32), true);
    this.cdv.setUint16(16, Math.min(Math.floor(sectors / (16 * 63)), 65535), true);
    return changed;
  }

  /** DeviceOps.resize: the new capacity, and a configuration-change interrupt. */
  resized(): void {
    if (this.updateCapacity()) this.notifyConfig();
  }

  drainedBegin(): void {
    this.drained = true;
  }

  drainedEnd(): void {
    this.drained = false;
    this.kickAll();
  }

  override configWrite(off: number, size: number, value: number): void {
    // Only `writeback` (wce) is writable, and only with CONFIG_WCE.
    if (off <= 32 && off + size > 32 && this.has(VIRTIO_BLK_F_CONFIG_WCE)) {
      const on = ((value >>> (8 * (32 - off))) & 0xff) !== 0;
      this.config[32] = on ? 1 : 0;
      this.io.setWriteCache(on);
    }
  }

  protected override featuresSet(): void {
    // Without FLUSH the driver cannot make writes stable: write through (as QEMU does).
    if (!this.has(VIRTIO_BLK_F_FLUSH)) {
      this.io.setWriteCache(false);
      this.config[32] = 0;
    }
  }

  protected override resetDevice(): void {
    // The guest forgot its requests: those the error policy stopped must not be retried.
    this.io.dropStopped();
    this.io.setWriteCache(this.wceDefault);
    this.config[32] = this.wceDefault ? 1 : 0;
  }

  protected override handleQueue(vq: VirtQueue): void {
    if (this.drained) return;
    // Every available chain is popped (at most a queue's worth can be: heads in flight are not
    // reusable); then, having asked for the next kick, look once more, or a chain the driver
    // added while we were asking goes unnoticed until some later kick.
    for (;;) {
      for (;;) {
        const req = this.pool.pop() ?? new BlkReq(this);
        const r = vq.pop(req.elem);
        if (r <= 0) {
          this.pool.push(req);
          if (r < 0) return this.markBroken(vq.error, vq);
          break;
        }
        req.vq = vq;
        this.submit(req);
      }
      // Requests in flight: their completions look at the ring again (pollOnCompletion).
      if (this.pollOnCompletion !== null && vq.eventIdx && vq.inFlight > 0) return;
      vq.updateAvailEvent();
      if (!vq.eventIdx || !vq.hasAvail() || this.drained) return;
    }
  }

  private submit(req: BlkReq): void {
    const e = req.elem;
    // The status byte: the last byte of the last device-writable buffer.
    const nIn = e.inNum;
    if (nIn === 0) {
      req.statusAt = -1;
      return this.finish(req, VIRTIO_BLK_S_IOERR);
    }
    req.statusAt = e.inAddr[nIn - 1]! + e.inLen[nIn - 1]! - 1;
    if (e.fault || e.outBytes < 16) return this.finish(req, VIRTIO_BLK_S_IOERR);
    // The header (16 bytes), possibly spread over buffers: copied byte by byte (no view).
    const mem = this.ram.dv;
    const hdr = this.hdr;
    let got = 0;
    for (let i = 0; got < 16; i++) {
      const a = e.outAddr[i]!;
      const n = Math.min(16 - got, e.outLen[i]!);
      for (let k = 0; k < n; k++) hdr[got + k] = mem.getUint8(a + k);
      got += n;
    }
    const type = this.hdv.getUint32(0, true);
    const sectorHi = this.hdv.getUint32(12, true);
    const sector = sectorHi * 2 ** 32 + this.hdv.getUint32(8, true);
    const io = this.io;
    switch (type) {
      case VIRTIO_BLK_T_IN:
      case VIRTIO_BLK_T_OUT: {
        const write = type === VIRTIO_BLK_T_OUT;
        const bytes = this.gather(req, write);
        if (bytes % SECTOR !== 0 || !this.inRange(sector, bytes / SECTOR)) return this.finish(req, VIRTIO_BLK_S_IOERR);
        if (write && io.isReadOnly()) return this.finish(req, VIRTIO_BLK_S_IOERR);
        if (bytes === 0) return this.finish(req, VIRTIO_BLK_S_OK);
        if (write) io.writev(sector * SECTOR, bytes, req.iov, 0, req.done);
        else io.readv(sector * SECTOR, bytes, req.iov, 0, req.done);
        return;
      }
      case VIRTIO_BLK_T_FLUSH:
        io.flush().then(req.ok, req.failed);
        return;
      case VIRTIO_BLK_T_GET_ID: {
        this.gather(req, false);
        let off = 0;
        for (let j = 0; j < req.iovNum; j++) {
          const s = req.iov[j]!;
          for (let i = 0; i < s.length && off < VIRTIO_BLK_ID_BYTES; i++, off++) s[i] = this.serial[off] ?? 0;
        }
        return this.finish(req, VIRTIO_BLK_S_OK);
      }
      case VIRTIO_BLK_T_DISCARD:
      case VIRTIO_BLK_T_WRITE_ZEROES:
        return this.discardOrZero(req, type === VIRTIO_BLK_T_DISCARD);
      default:
        return this.finish(req, VIRTIO_BLK_S_UNSUPP);
    }
  }

  /** Inside the disk, and starting and ending on a logical block (QEMU's virtio_blk_sect_range_ok). */
  private inRange(sector: number, count: number): boolean {
    const m = this.blockMask;
    return Number.isSafeInteger(sector * SECTOR) && sector + count <= this.capacity && (m === 0 || (sector % (m + 1) === 0 && count % (m + 1) === 0));
  }

  /**
   * Fills req.iov (req.iovNum entries, one view of guest RAM per segment) with the data
   * buffers: for a write, the device-readable bytes after the header; otherwise the
   * device-writable bytes before the status byte. Returns their size.
   */
  private gather(req: BlkReq, write: boolean): number {
    const e = req.elem;
    const iov = req.iov;
    const ram = this.ram;
    let k = 0;
    let bytes = 0;
    if (write) {
      let skip = 16;
      for (let i = 0; i < e.outNum; i++) {
        const len = e.outLen[i]!;
        if (skip >= len) {
          skip -= len;
          continue;
        }
        const a = e.outAddr[i]!;
        iov[k++] = ram.viewAt(a + skip, len - skip);
        bytes += len - skip;
        skip = 0;
      }
    } else {
      const n = e.inNum;
      for (let i = 0; i < n; i++) {
        const len = i === n - 1 ? e.inLen[i]! - 1 : e.inLen[i]!;
        if (len === 0) continue;
        const a = e.inAddr[i]!;
        iov[k++] = ram.viewAt(a, len);
        bytes += len;
      }
    }
    req.iovNum = k;
    // Filled in order from 0, so only a shrink is needed; an empty iov is never handed over
    // (and length 0 would drop the array's storage).
    if (k > 0 && iov.length !== k) iov.length = k;
    return bytes;
  }

  private discardOrZero(req: BlkReq, discard: boolean): void {
    const feature = discard ? VIRTIO_BLK_F_DISCARD : VIRTIO_BLK_F_WRITE_ZEROES;
    if (!this.has(feature)) return this.finish(req, VIRTIO_BLK_S_UNSUPP);
    const n = this.gather(req, true);
    if (n !== 16) return this.finish(req, n > 16 && n % 16 === 0 ? VIRTIO_BLK_S_UNSUPP : VIRTIO_BLK_S_IOERR); // one segment at most
    const seg = this.hdr; // the header is no longer needed
    let got = 0;
    for (let j = 0; j < req.iovNum; j++) {
      const s = req.iov[j]!;
      const k = Math.min(16 - got, s.length);
      seg.set(s.subarray(0, k), got);
      got += k;
    }
    const sector = this.hdv.getUint32(4, true) * 2 ** 32 + this.hdv.getUint32(0, true);
    const count = this.hdv.getUint32(8, true);
    const flags = this.hdv.getUint32(12, true);
    const unmap = (flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP) !== 0;
    if (flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP || (discard && unmap)) return this.finish(req, VIRTIO_BLK_S_UNSUPP);
    if (count > VIRTIO_BLK_MAX_DISCARD_SECTORS || !this.inRange(sector, count) || this.io.isReadOnly()) return this.finish(req, VIRTIO_BLK_S_IOERR);
    if (count === 0) return this.finish(req, VIRTIO_BLK_S_OK);
    const p = discard ? this.io.discard(sector * SECTOR, count * SECTOR) : this.io.writeZeroes(sector * SECTOR, count * SECTOR, unmap);
    p.then(req.ok, req.failed);
  }

  /** @internal Completes a request: status byte, used entry (published in the next batch). */
  finish(req: BlkReq, status: number): void {
    const e = req.elem;
    const vq = req.vq;
    if (e.gen === vq.gen && req.statusAt >= 0) this.ram.dv.setUint8(req.statusAt, status);
    const dirty = this.ram.onDmaWrite;
    if (dirty) for (let i = 0; i < e.inNum; i++) dirty(e.inAddr[i]!, e.inLen[i]!);
    this.complete(vq, e, e.inBytes);
    // Counts only: the arrays keep their storage for the next request.
    req.iovNum = 0;
    req.statusAt = -1;
    e.clear();
    this.pool.push(req);
    this.onFinish?.(vq);
  }

  get driverOk(): boolean {
    return (this.status & VIRTIO_CONFIG_S_DRIVER_OK) !== 0;
  }
}

export interface VirtioBlkOptions {
  id: string;
  drive: BlockBackend;
  bus: PciBus;
  slot?: number;
  numQueues?: number;
  queueSize?: number;
  serial?: string;
  disableLegacy?: boolean;
  /** MSI-X vectors (default num-queues + 1, or 0 where the machine has no MSI); 0: INTx only. */
  vectors?: number;
}

export class VirtioBlkPci implements Device {
  readonly id: string;
  readonly type = 'virtio-blk-pci';
  /** The device and its transport while realized (for tests and the monitor). */
  vdev: VirtioBlk | null = null;
  proxy: VirtioPciProxy | null = null;

  constructor(private readonly opts: VirtioBlkOptions) {
    this.id = opts.id;
  }

  realize(m: Machine): void {
    const o = this.opts;
    const numQueues = o.numQueues ?? 1;
    const queueSize = o.queueSize ?? 256;
    const serial = o.serial ?? '';
    const bad = (msg: string): never => {
      throw new HwError('EINVAL', `${this.type} '${this.id}': ${msg}`);
    };
    if (!Number.isInteger(numQueues) || numQueues < 1 || numQueues > 64) bad(`Parameter 'num-queues' must be between 1 and 64, not ${numQueues}`);
    if (!Number.isInteger(queueSize) || queueSize < 2 || queueSize > VIRTQUEUE_MAX_SIZE || queueSize & (queueSize - 1)) {
      bad(`Parameter 'queue-size' must be a power of 2 between 2 and ${VIRTQUEUE_MAX_SIZE}, not ${queueSize}`);
    }
    if (o.vectors !== undefined && (!Number.isInteger(o.vectors) || o.vectors < 0 || o.vectors > 2048)) bad(`Parameter 'vectors' must be between 0 and 2048, not ${o.vectors}`);
    if (new TextEncoder().encode(serial).length > VIRTIO_BLK_ID_BYTES) bad(`Parameter 'serial' is longer than ${VIRTIO_BLK_ID_BYTES} bytes`);
    const slot = o.slot ?? o.bus.freeSlot(2);
    if (slot < 0) bad('no free PCI slot');
    const ops: DeviceOps = {
      resize: () => this.vdev?.resized(),
      changeMedia: () => this.vdev?.resized(),
      drainedBegin: () => this.vdev?.drainedBegin(),
      drainedEnd: () => this.vdev?.drainedEnd(),
    };
    const io = o.drive.attachDevice(this, ops);
    try {
      const vdev = new VirtioBlk(m.ram, io, { numQueues, queueSize, serial });
      const proxy = new VirtioPciProxy(vdev, {
        name: this.id, bus: o.bus, slot, legacyDeviceId: 0x1001, classCode: 0x010000,
        disableLegacy: o.disableLegacy ?? false, vectors: o.vectors ?? (m.msi ? numQueues + 1 : 0),
      });
      proxy.plug(m);
      this.vdev = vdev;
      this.proxy = proxy;
    } catch (e) {
      o.drive.detachDevice(this);
      throw e;
    }
  }

  unrealize(_m: Machine): void {
    this.vdev?.reset();
    this.proxy?.unplug();
    this.opts.drive.detachDevice(this);
    this.vdev = null;
    this.proxy = null;
  }
}
