/**
 * virtio-blk requests from the guest side (over QVirtioPciDevice): header, data and status
 * buffers in guest memory, as one chain (optionally split into several data descriptors, or
 * through an indirect table), and the status read back once the device used the chain.
 */
import type { GuestAlloc } from './alloc.js';
import type { QtestClient } from './qtest-client.js';
import { QVirtioPciDevice, type QBuf, type QVirtQueue, type QVirtioOpenOptions } from './virtio.js';
import {
  VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_DISCARD,
  VIRTIO_BLK_T_WRITE_ZEROES,
} from '../../hw/virtio/virtio-blk-abi.js';

export {
  VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_DISCARD,
  VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP,
  VIRTIO_BLK_F_RO, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_MQ,
  VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES,
} from '../../hw/virtio/virtio-blk-abi.js';

export interface QBlkReqOptions {
  /** Device-readable payload after the header (OUT, DISCARD, WRITE_ZEROES). */
  out?: Uint8Array;
  /** Device-writable bytes before the status (IN, GET_ID). */
  inLen?: number;
  /** Split the data into this many descriptors (default 1). */
  segments?: number;
  indirect?: boolean;
  /** Queue index (default 0). */
  queue?: number;
  /** Don't kick after adding. */
  noKick?: boolean;
}

/** A submitted request: where its buffers are, to read back once used. */
export interface QBlkPending {
  vq: QVirtQueue;
  head: number;
  hdr: number;
  data: number;
  dataLen: number;
  status: number;
}

export interface QBlkResult {
  status: number;
  data: Uint8Array;
  usedLen: number;
}

export class QVirtioBlk {
  private constructor(readonly dev: QVirtioPciDevice, readonly alloc: GuestAlloc) {}

  get qts(): QtestClient {
    return this.dev.qts;
  }

  /**
   * Finds the virtio-blk device, negotiates `features` (default: everything offered), sets up
   * `queues` queues (default 1) of `queueSize` entries and sets DRIVER_OK.
   */
  static async start(qts: QtestClient, alloc: GuestAlloc, o: QVirtioOpenOptions & { features?: bigint; queues?: number; queueSize?: number } = {}): Promise<QVirtioBlk> {
    const dev = await QVirtioPciDevice.open(qts, alloc, 2, o);
    const blk = new QVirtioBlk(dev, alloc);
    await blk.init(o);
    return blk;
  }

  async init(o: { features?: bigint; queues?: number; queueSize?: number } = {}): Promise<void> {
    if (!(await this.dev.negotiate(o.features ?? 0xffffffffffffn))) throw new Error('virtio-blk: FEATURES_OK refused');
    for (let i = 0; i < (o.queues ?? 1); i++) await this.dev.setupQueue(i, o.queueSize);
    await this.dev.driverOk();
  }

  vq(i = 0): QVirtQueue {
    const q = this.dev.queues[i];
    if (!q) throw new Error(`virtio-blk: queue ${i} is not set up`);
    return q;
  }

  async capacity(): Promise<number> {
    return this.dev.config64(0);
  }

  /** Adds a request to a queue (and kicks); does not wait. */
  async submit(type: number, sector: number, o: QBlkReqOptions = {}): Promise<QBlkPending> {
    const qts = this.qts;
    const vq = this.vq(o.queue);
    const hdr = this.alloc.alloc(16);
    const h = new Uint8Array(16);
    const dv = new DataView(h.buffer);
    dv.setUint32(0, type, true);
    dv.setUint32(8, sector % 2 ** 32, true);
    dv.setUint32(12, Math.floor(sector / 2 ** 32), true);
    await qts.memwrite(hdr, h);
    const dataLen = o.out ? o.out.length : o.inLen ?? 0;
    const data = dataLen ? this.alloc.alloc(dataLen) : 0;
    if (o.out) await qts.memwrite(data, o.out);
    else if (dataLen) await qts.memset(data, dataLen, 0xa5);
    const status = this.alloc.alloc(1);
    await qts.writeb(status, 0xff);
    const bufs: QBuf[] = [{ addr: hdr, len: 16, write: false }];
    const segs = dataLen ? Math.max(1, o.segments ?? 1) : 0;
    for (let i = 0, off = 0; i < segs; i++) {
      const len = i === segs - 1 ? dataLen - off : Math.floor(dataLen / segs);
      bufs.push({ addr: data + off, len, write: !o.out });
      off += len;
    }
    bufs.push({ addr: status, len: 1, write: true });
    const head = await vq.add(bufs, o.indirect);
    if (!o.noKick) await vq.kick();
    return { vq, head, hdr, data, dataLen, status };
  }

  /** Waits until `p` is used (entries of other requests met first are an error). */
  async wait(p: QBlkPending): Promise<QBlkResult> {
    const u = await p.vq.waitUsed();
    if (u.id !== p.head) throw new Error(`virtio-blk: used head ${u.id}, expected ${p.head}`);
    return this.result(p, u.len);
  }

  /** Reads back a used request's status and data and frees its buffers. */
  async result(p: QBlkPending, usedLen: number): Promise<QBlkResult> {
    const status = await this.qts.readb(p.status);
    const data = p.dataLen ? await this.qts.memread(p.data, p.dataLen) : new Uint8Array(0);
    this.alloc.release(p.hdr, 16);
    if (p.dataLen) this.alloc.release(p.data, p.dataLen);
    this.alloc.release(p.status, 1);
    return { status, data, usedLen };
  }

  async request(type: number, sector: number, o: QBlkReqOptions = {}): Promise<QBlkResult> {
    return this.wait(await this.submit(type, sector, o));
  }

  async read(sector: number, bytes: number, o: QBlkReqOptions = {}): Promise<QBlkResult> {
    return this.request(VIRTIO_BLK_T_IN, sector, { ...o, inLen: bytes });
  }

  async write(sector: number, data: Uint8Array, o: QBlkReqOptions = {}): Promise<number> {
    return (await this.request(VIRTIO_BLK_T_OUT, sector, { ...o, out: data })).status;
  }

  async flush(): Promise<number> {
    return (await this.request(VIRTIO_BLK_T_FLUSH, 0)).status;
  }

  async getId(): Promise<{ status: number; id: string }> {
    const r = await this.request(VIRTIO_BLK_T_GET_ID, 0, { inLen: 20 });
    const end = r.data.indexOf(0);
    return { status: r.status, id: Buffer.from(r.data.subarray(0, end < 0 ? 20 : end)).toString() };
  }

  private static segment(sector: number, count: number, flags: number): Uint8Array {
    const s = new Uint8Array(16);
    const dv = new DataView(s.buffer);
    dv.setUint32(0, sector % 2 ** 32, true);
    dv.setUint32(4, Math.floor(sector / 2 ** 32), true);
    dv.setUint32(8, count, true);
    dv.setUint32(12, flags, true);
    return s;
  }

  async discard(sector: number, count: number, flags = 0): Promise<number> {
    return (await this.request(VIRTIO_BLK_T_DISCARD, 0, { out: QVirtioBlk.segment(sector, count, flags) })).status;
  }

  async writeZeroes(sector: number, count: number, unmap = false): Promise<number> {
    return (await this.request(VIRTIO_BLK_T_WRITE_ZEROES, 0, { out: QVirtioBlk.segment(sector, count, unmap ? 1 : 0) })).status;
  }
}
