/**
 * Xen from the guest side, through qtest only: the xen bridge's ports stand in for
 * hypercalls (xenstore requests, grant-table setup, event channels; see
 * hw/xen/xen-bridge.ts), grants are entries the guest writes into its own grant table, and
 * a blkfront that sets up the shared ring (one page or several), moves through the xenbus
 * states and issues blkif requests (READ, WRITE, WRITE_BARRIER, FLUSH, DISCARD, INDIRECT).
 * Waiting is a bounded loop over setImmediate: completions are asynchronous, and no timer
 * or sleep is involved.
 */
import {
  ABI_X86_32, ABI_X86_64, BLKIF_OP_DISCARD, BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_INDIRECT, BLKIF_OP_READ, BLKIF_OP_WRITE,
  BLKIF_OP_WRITE_BARRIER, BLKIF_SEGMENT_SIZE, RING_PAGE_SIZE, SRING_HEADER, blkifRingSize,
  decodeResponse, encodeRequest, encodeSegment, type BlkifAbi, type BlkifRequest, type BlkifResponse, type BlkifSegment,
} from '../../hw/xen/blkif-ring.js';
import { XEN_BRIDGE_BASE, XenBridgeCmd, XenBridgeReg } from '../../hw/xen/xen-bridge.js';
import type { GuestAlloc } from './alloc.js';
import type { QtestClient } from './qtest-client.js';

export const XENBUS = { Initialising: 1, InitWait: 2, Initialised: 3, Connected: 4, Closing: 5, Closed: 6 } as const;
const GTF_PERMIT_ACCESS = 1;
const GTF_READONLY = 4;
/** The first grant refs are reserved, as in Xen. */
const FIRST_REF = 8;
const SECTOR = 512;

/** Waits (bounded) until `check` yields a value; each round lets the event loop turn once. */
export async function waitFor<T>(what: string, check: () => Promise<T | undefined> | T | undefined, rounds = 20000): Promise<T> {
  for (let i = 0; i < rounds; i++) {
    const v = await check();
    if (v !== undefined) return v;
    await new Promise<void>((r) => setImmediate(r));
  }
  throw new Error(`timed out waiting for ${what}`);
}

/** The guest's hypercalls: the xen bridge at 0x5a0 plus a grant table in guest memory. */
export class XenGuest {
  private grantFree: number[] = [];
  private constructor(readonly qts: QtestClient, readonly alloc: GuestAlloc, private readonly buf: number, private readonly table: number, readonly grantRefs: number) {}

  /** Sets up the bridge buffers and a grant table of `frames` pages. */
  static async create(qts: QtestClient, alloc: GuestAlloc, frames = 2): Promise<XenGuest> {
    const buf = alloc.alloc(2 * RING_PAGE_SIZE);
    const table = alloc.alloc(frames * RING_PAGE_SIZE);
    await qts.memset(table, frames * RING_PAGE_SIZE, 0);
    const g = new XenGuest(qts, alloc, buf, table, (frames * RING_PAGE_SIZE) / 8);
    for (let r = g.grantRefs - 1; r >= FIRST_REF; r--) g.grantFree.push(r);
    const st = await g.cmd(XenBridgeCmd.GNTTAB_SETUP, table, frames);
    if (st.status) throw new Error(`GNTTAB_SETUP failed: errno ${st.status}`);
    return g;
  }

  /** Runs one bridge command. */
  async cmd(cmd: number, ...args: number[]): Promise<{ status: number; result: number }> {
    for (let i = 0; i < args.length; i++) await this.qts.outl(XEN_BRIDGE_BASE + XenBridgeReg.ARG0 + 4 * i, args[i]!);
    await this.qts.outl(XEN_BRIDGE_BASE + XenBridgeReg.CMD, cmd);
    return { status: await this.qts.inl(XEN_BRIDGE_BASE + XenBridgeReg.STATUS), result: await this.qts.inl(XEN_BRIDGE_BASE + XenBridgeReg.RESULT) };
  }

  /** One xenstore request: errno (0 = OK) and the reply bytes. */
  async xs(op: string, path: string, value?: string): Promise<{ status: number; data: Uint8Array }> {
    const req = new TextEncoder().encode(value === undefined ? `${op}\0${path}` : `${op}\0${path}\0${value}`);
    if (req.length > RING_PAGE_SIZE) throw new Error('xenstore request too long');
    await this.qts.memwrite(this.buf, req);
    const r = await this.cmd(XenBridgeCmd.XS_REQUEST, this.buf, req.length, this.buf + RING_PAGE_SIZE, RING_PAGE_SIZE);
    return { status: r.status, data: r.status ? new Uint8Array(0) : await this.qts.memread(this.buf + RING_PAGE_SIZE, r.result) };
  }

  async read(path: string): Promise<string | undefined> {
    const r = await this.xs('read', path);
    return r.status ? undefined : new TextDecoder().decode(r.data);
  }

  async readInt(path: string): Promise<number | undefined> {
    const v = await this.read(path);
    return v !== undefined && /^\d+$/.test(v) ? Number(v) : undefined;
  }

  async write(path: string, value: string): Promise<void> {
    const r = await this.xs('write', path, value);
    if (r.status) throw new Error(`xenstore write ${path}: errno ${r.status}`);
  }

  async rm(path: string): Promise<boolean> {
    return (await this.xs('rm', path)).status === 0;
  }

  async directory(path: string): Promise<string[] | undefined> {
    const r = await this.xs('directory', path);
    if (r.status) return undefined;
    return new TextDecoder().decode(r.data).split('\0').filter(Boolean);
  }

  /** Grants the page at `addr` to domain `domid`; returns the ref. */
  async grant(addr: number, domid = 0, readonly = false): Promise<number> {
    const ref = this.grantFree.pop();
    if (ref === undefined) throw new Error('grant table full');
    await this.setEntry(ref, readonly ? GTF_PERMIT_ACCESS | GTF_READONLY : GTF_PERMIT_ACCESS, domid, Math.floor(addr / RING_PAGE_SIZE));
    return ref;
  }

  /** Writes a raw grant entry (tests use it to forge bad ones). */
  async setEntry(ref: number, flags: number, domid: number, frame: number): Promise<void> {
    const e = new Uint8Array(8);
    const dv = new DataView(e.buffer);
    dv.setUint16(0, flags, true);
    dv.setUint16(2, domid, true);
    dv.setUint32(4, frame, true);
    await this.qts.memwrite(this.table + ref * 8, e);
  }

  async endAccess(ref: number): Promise<void> {
    await this.setEntry(ref, 0, 0, 0);
    this.grantFree.push(ref);
  }

  async evtchnAlloc(remote = 0): Promise<number> {
    const r = await this.cmd(XenBridgeCmd.EVTCHN_ALLOC, remote);
    if (r.status) throw new Error(`EVTCHN_ALLOC: errno ${r.status}`);
    return r.result;
  }

  async notify(port: number): Promise<number> {
    return (await this.cmd(XenBridgeCmd.EVTCHN_SEND, port)).status;
  }

  /** Clears the port's pending bit; returns whether it was set. */
  async ack(port: number): Promise<boolean> {
    return (await this.cmd(XenBridgeCmd.EVTCHN_ACK, port)).result === 1;
  }

  async pending(port: number): Promise<boolean> {
    const r = await this.cmd(XenBridgeCmd.EVTCHN_PENDING, port >> 5);
    return ((r.result >>> (port & 31)) & 1) === 1;
  }

  async evtchnClose(port: number): Promise<void> {
    await this.cmd(XenBridgeCmd.EVTCHN_CLOSE, port);
  }
}

export interface IoResult {
  status: number;
  data: Uint8Array;
}

/** A request as the test builds it (segments may be forged). */
export type RawRequest = Partial<BlkifRequest> & { operation: number };

export class XenBlkfront {
  readonly frontendPath: string;
  backendPath = '';
  features: Record<string, string> = {};
  sectors = 0;
  sectorSize = 0;
  port = 0;
  ringSize = 0;
  abi: BlkifAbi = ABI_X86_64;
  private ring = 0;
  private ringPages = 0;
  private ringRefs: number[] = [];
  private reqProdPvt = 0;
  private rspCons = 0;
  private nextId = 1n;
  private readonly responses = new Map<bigint, BlkifResponse>();
  /** Ids of the responses in the order the backend pushed them. */
  readonly arrivals: bigint[] = [];

  constructor(readonly xen: XenGuest, readonly vdev: number) {
    this.frontendPath = `/local/domain/1/device/vbd/${vdev}`;
  }

  get qts(): QtestClient {
    return this.xen.qts;
  }

  async backendState(): Promise<number | undefined> {
    return this.xen.readInt(`${this.backendPath}/state`);
  }

  async setState(s: number): Promise<void> {
    await this.xen.write(`${this.frontendPath}/state`, String(s));
  }

  async waitBackendState(...want: number[]): Promise<number> {
    return waitFor(`backend state ${want.join('/')}`, async () => {
      const s = await this.backendState();
      return s !== undefined && want.includes(s) ? s : undefined;
    });
  }

  /** Finds the backend, waits for InitWait and reads what it publishes. */
  async probe(): Promise<void> {
    const be = await this.xen.read(`${this.frontendPath}/backend`);
    if (!be) throw new Error(`no backend for vbd ${this.vdev}`);
    this.backendPath = be;
    await this.waitBackendState(XENBUS.InitWait);
    await this.readBackendKeys();
  }

  private async readBackendKeys(): Promise<void> {
    this.features = {};
    for (const k of (await this.xen.directory(this.backendPath)) ?? []) {
      const v = await this.xen.read(`${this.backendPath}/${k}`);
      if (v !== undefined) this.features[k] = v;
    }
  }

  /** Initialised → (backend Connected) → Connected, with a ring of 2^order pages in the given ABI. */
  async connect(opts: { ringPageOrder?: number; protocol?: 'x86_64-abi' | 'x86_32-abi' } = {}): Promise<void> {
    if (!this.backendPath) await this.probe();
    const order = opts.ringPageOrder ?? 0;
    this.abi = opts.protocol === 'x86_32-abi' ? ABI_X86_32 : ABI_X86_64;
    this.ringPages = 1 << order;
    this.ringSize = blkifRingSize(this.ringPages, this.abi);
    this.ring = this.xen.alloc.alloc(this.ringPages * RING_PAGE_SIZE);
    await this.qts.memset(this.ring, this.ringPages * RING_PAGE_SIZE, 0);
    // SHARED_RING_INIT: req_event = rsp_event = 1.
    await this.qts.writel(this.ring + 4, 1);
    await this.qts.writel(this.ring + 12, 1);
    this.reqProdPvt = 0;
    this.rspCons = 0;
    this.responses.clear();
    this.ringRefs = [];
    for (let i = 0; i < this.ringPages; i++) this.ringRefs.push(await this.xen.grant(this.ring + i * RING_PAGE_SIZE));
    this.port = await this.xen.evtchnAlloc(0);
    const fe = this.frontendPath;
    if (order === 0) await this.xen.write(`${fe}/ring-ref`, String(this.ringRefs[0]));
    else {
      await this.xen.write(`${fe}/ring-page-order`, String(order));
      await this.xen.write(`${fe}/num-ring-pages`, String(this.ringPages));
      for (let i = 0; i < this.ringPages; i++) await this.xen.write(`${fe}/ring-ref${i}`, String(this.ringRefs[i]));
    }
    await this.xen.write(`${fe}/event-channel`, String(this.port));
    await this.xen.write(`${fe}/protocol`, this.abi.name);
    await this.setState(XENBUS.Initialised);
    const s = await waitFor('backend Connected (or an error)', async () => {
      const st = await this.backendState();
      if (st === XENBUS.Connected || st === XENBUS.Closing || st === XENBUS.Closed) return st;
      if ((await this.xen.read(`${this.backendPath}/error`)) !== undefined) return -1;
      return undefined;
    });
    if (s !== XENBUS.Connected) throw new Error(`backend did not connect: ${await this.xen.read(`${this.backendPath}/error`)}`);
    await this.readBackendKeys();
    this.sectors = Number(this.features['sectors']);
    this.sectorSize = Number(this.features['sector-size']);
    await this.setState(XENBUS.Connected);
  }

  /** Closing → Closed, waiting for the backend each time; frees the ring. */
  async disconnect(): Promise<void> {
    await this.setState(XENBUS.Closing);
    await this.waitBackendState(XENBUS.Closing, XENBUS.Closed);
    await this.setState(XENBUS.Closed);
    await this.waitBackendState(XENBUS.Closed);
    for (const r of this.ringRefs) await this.xen.endAccess(r);
    this.ringRefs = [];
    await this.xen.evtchnClose(this.port);
    this.xen.alloc.release(this.ring, this.ringPages * RING_PAGE_SIZE);
    const fe = this.frontendPath;
    for (const k of ['ring-ref', 'ring-page-order', 'num-ring-pages', 'event-channel', 'protocol']) await this.xen.rm(`${fe}/${k}`);
    for (let i = 0; i < this.ringPages; i++) await this.xen.rm(`${fe}/ring-ref${i}`);
  }

  /** Back to Initialising after a disconnect; waits for the backend's InitWait. */
  async reinitialise(): Promise<void> {
    await this.setState(XENBUS.Initialising);
    await this.waitBackendState(XENBUS.InitWait);
  }

  // ---- the ring ----

  /** Puts a request on the ring and notifies if the backend asked (req_event), unless told not to. Returns its id. */
  async submit(r: RawRequest, opts: { notify?: boolean } = {}): Promise<bigint> {
    const id = r.id ?? this.nextId++;
    // RING_FULL: wait for the backend to answer before reusing a slot.
    await waitFor('a free ring slot', async () => {
      if (((this.reqProdPvt - this.rspCons) >>> 0) < this.ringSize) return true;
      await this.poll();
      return undefined;
    });
    const slot = this.ring + SRING_HEADER + (this.reqProdPvt & (this.ringSize - 1)) * this.abi.entry;
    await this.qts.memwrite(slot, encodeRequest({ ...r, id }, this.abi));
    const old = await this.qts.readl(this.ring);
    this.reqProdPvt = (this.reqProdPvt + 1) >>> 0;
    await this.qts.writel(this.ring, this.reqProdPvt);
    const evt = await this.qts.readl(this.ring + 4);
    if (opts.notify !== false && ((this.reqProdPvt - evt) >>> 0) < ((this.reqProdPvt - old) >>> 0)) await this.xen.notify(this.port);
    return id;
  }

  /** Notifies the backend unconditionally (after submits with notify: false). */
  async kick(): Promise<void> {
    await this.xen.notify(this.port);
  }

  /** Consumes whatever responses are there; re-arms rsp_event. */
  async poll(): Promise<void> {
    for (;;) {
      const prod = await this.qts.readl(this.ring + 8);
      while (this.rspCons !== prod) {
        const slot = this.ring + SRING_HEADER + (this.rspCons & (this.ringSize - 1)) * this.abi.entry;
        const rsp = decodeResponse(await this.qts.memread(slot, this.abi.rspSize));
        this.responses.set(rsp.id, rsp);
        this.arrivals.push(rsp.id);
        this.rspCons = (this.rspCons + 1) >>> 0;
      }
      await this.qts.writel(this.ring + 12, (this.rspCons + 1) >>> 0);
      if ((await this.qts.readl(this.ring + 8)) === prod) return;
    }
  }

  async waitResponse(id: bigint): Promise<BlkifResponse> {
    const rsp = await waitFor(`response ${id}`, async () => {
      await this.poll();
      return this.responses.get(id);
    });
    this.responses.delete(id);
    await this.xen.ack(this.port);
    return rsp;
  }

  async request(r: RawRequest): Promise<BlkifResponse> {
    return this.waitResponse(await this.submit(r));
  }

  // ---- data pages ----

  /** Guest pages holding `sectors` sectors, granted; segment k covers page k from firstSect. */
  private async buffers(sectors: number, forDeviceWrite: boolean, data?: Uint8Array): Promise<{ addr: number; pages: number; segs: BlkifSegment[] }> {
    const pages = Math.ceil(sectors / 8);
    const addr = this.xen.alloc.alloc(pages * RING_PAGE_SIZE);
    if (data) await this.qts.memwrite(addr, data);
    else await this.qts.memset(addr, pages * RING_PAGE_SIZE, 0xee);
    const segs: BlkifSegment[] = [];
    for (let p = 0; p < pages; p++) {
      const n = Math.min(8, sectors - 8 * p);
      segs.push({ gref: await this.xen.grant(addr + p * RING_PAGE_SIZE, 0, !forDeviceWrite), firstSect: 0, lastSect: n - 1 });
    }
    return { addr, pages, segs };
  }

  private async release(b: { addr: number; pages: number; segs: BlkifSegment[] }): Promise<void> {
    for (const s of b.segs) await this.xen.endAccess(s.gref);
    this.xen.alloc.release(b.addr, b.pages * RING_PAGE_SIZE);
  }

  /** READ of `count` sectors (at most 88: 11 segments). */
  async read(sector: number, count: number): Promise<IoResult> {
    const b = await this.buffers(count, true);
    try {
      const rsp = await this.request({ operation: BLKIF_OP_READ, sector: BigInt(sector), seg: b.segs });
      return { status: rsp.status, data: rsp.status === 0 ? await this.qts.memread(b.addr, count * SECTOR) : new Uint8Array(0) };
    } finally {
      await this.release(b);
    }
  }

  /** WRITE (or WRITE_BARRIER) of whole sectors. */
  async write(sector: number, data: Uint8Array, op: number = BLKIF_OP_WRITE): Promise<number> {
    const b = await this.buffers(data.length / SECTOR, false, data);
    try {
      return (await this.request({ operation: op, sector: BigInt(sector), seg: b.segs })).status;
    } finally {
      await this.release(b);
    }
  }

  async barrier(sector?: number, data?: Uint8Array): Promise<number> {
    if (data && sector !== undefined) return this.write(sector, data, BLKIF_OP_WRITE_BARRIER);
    return (await this.request({ operation: BLKIF_OP_WRITE_BARRIER, seg: [] })).status;
  }

  async flush(): Promise<number> {
    return (await this.request({ operation: BLKIF_OP_FLUSH_DISKCACHE, seg: [] })).status;
  }

  async discard(sector: number, count: number, flag = 0): Promise<number> {
    return (await this.request({ operation: BLKIF_OP_DISCARD, sector: BigInt(sector), nrSectors: BigInt(count), discardFlag: flag })).status;
  }

  /** INDIRECT read or write: the segment list goes in granted indirect pages. */
  async indirect(op: number, sector: number, countOrData: number | Uint8Array): Promise<IoResult> {
    const write = op === BLKIF_OP_WRITE;
    const data = typeof countOrData === 'number' ? undefined : countOrData;
    const count = data ? data.length / SECTOR : (countOrData as number);
    const b = await this.buffers(count, !write, data);
    const perPage = RING_PAGE_SIZE / BLKIF_SEGMENT_SIZE;
    const frames = Math.ceil(b.segs.length / perPage);
    const ind = this.xen.alloc.alloc(frames * RING_PAGE_SIZE);
    const list = new Uint8Array(frames * RING_PAGE_SIZE);
    const dv = new DataView(list.buffer);
    b.segs.forEach((s, i) => encodeSegment(dv, i * BLKIF_SEGMENT_SIZE, s));
    await this.qts.memwrite(ind, list);
    const grefs: number[] = [];
    for (let f = 0; f < frames; f++) grefs.push(await this.xen.grant(ind + f * RING_PAGE_SIZE, 0, true));
    try {
      const rsp = await this.request({ operation: BLKIF_OP_INDIRECT, indirectOp: op, nrSegments: b.segs.length, sector: BigInt(sector), indirectGrefs: grefs });
      return { status: rsp.status, data: !write && rsp.status === 0 ? await this.qts.memread(b.addr, count * SECTOR) : new Uint8Array(0) };
    } finally {
      for (const g of grefs) await this.xen.endAccess(g);
      this.xen.alloc.release(ind, frames * RING_PAGE_SIZE);
      await this.release(b);
    }
  }
}
