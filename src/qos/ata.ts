/**
 * A guest-side ATA/ATAPI driver for tests: finds the PIIX IDE function, selects drives,
 * issues commands by PIO and by bus-master DMA (PRD tables in guest memory) and sends
 * ATAPI packets. It speaks only through a QtestClient. Completions are asynchronous (real
 * I/O): waits poll the alternate status (or the bus-master status), yielding to the event
 * loop between polls, and give up after a bounded number of rounds.
 */
import type { GuestAlloc } from './alloc.js';
import type { QPciBus } from './pci.js';
import type { QtestClient } from './qtest-client.js';

export const ATA_ST = { ERR: 0x01, DRQ: 0x08, DSC: 0x10, DRDY: 0x40, BSY: 0x80 } as const;
export const BM = { START: 0x01, READ: 0x08, ACTIVE: 0x01, ERROR: 0x02, INTR: 0x04 } as const;

export interface Prd {
  addr: number;
  /** Bytes, 1..65536 (even). */
  len: number;
}

export interface TaskFile {
  features?: number;
  count?: number;
  lba?: number;
  /** 48-bit addressing: count and LBA each written twice (high byte first). */
  ext?: boolean;
  /** Device register bits besides DEV (default 0x40, LBA mode). */
  device?: number;
}

export interface DmaResult {
  status: number;
  error: number;
  bmStatus: number;
}

export interface PacketResult {
  data: Uint8Array;
  status: number;
  error: number;
  /** The interrupt reason (sector count register) at the end. */
  reason: number;
}

const tick = (): Promise<void> => new Promise((r) => setImmediate(r));

export class QAtaChannel {
  unit: 0 | 1 = 0;
  /** Rounds of the event loop a wait may take before it fails. */
  maxRounds = 1_000_000;

  constructor(
    readonly qts: QtestClient,
    readonly cmdBase = 0x1f0,
    readonly ctlBase = 0x3f6,
    readonly irq = 14,
    readonly bmBase: number | null = null,
    private readonly alloc: GuestAlloc | null = null,
  ) {}

  /** Both channels of the PIIX IDE function (01.1), with bus mastering on through BAR4. */
  static async piix(qts: QtestClient, pci: QPciBus, alloc: GuestAlloc): Promise<[QAtaChannel, QAtaChannel]> {
    const dev = await pci.find(0x8086, 0x7010);
    if (!dev) throw new Error('no PIIX IDE function (8086:7010) on bus 0');
    const bar = await dev.mapBar(4);
    await dev.enable();
    return [new QAtaChannel(qts, 0x1f0, 0x3f6, 14, bar.addr, alloc), new QAtaChannel(qts, 0x170, 0x376, 15, bar.addr + 8, alloc)];
  }

  async select(unit: 0 | 1): Promise<void> {
    this.unit = unit;
    await this.qts.outb(this.cmdBase + 6, 0xa0 | 0x40 | (unit << 4));
  }

  /** The status register (clears the pending interrupt). */
  status(): Promise<number> {
    return this.qts.inb(this.cmdBase + 7);
  }

  altStatus(): Promise<number> {
    return this.qts.inb(this.ctlBase);
  }

  error(): Promise<number> {
    return this.qts.inb(this.cmdBase + 1);
  }

  reg(n: number): Promise<number> {
    return this.qts.inb(this.cmdBase + n);
  }

  setControl(v: number): Promise<string> {
    return this.qts.outb(this.ctlBase, v);
  }

  irqLevel(): boolean {
    return this.qts.getIrq(this.irq);
  }

  /** Polls the alternate status until BSY clears; returns it. */
  async waitNotBusy(): Promise<number> {
    for (let i = 0; i < this.maxRounds; i++) {
      const s = await this.altStatus();
      if (!(s & ATA_ST.BSY)) return s;
      await tick();
    }
    throw new Error(`ATA ${this.cmdBase.toString(16)}: still busy after ${this.maxRounds} rounds`);
  }

  async setTaskFile(tf: TaskFile): Promise<void> {
    const lba = tf.lba ?? 0;
    const count = tf.count ?? 0;
    const q = this.qts;
    if (tf.ext) {
      const hi = Math.floor(lba / 2 ** 24);
      await q.outb(this.cmdBase + 1, (tf.features ?? 0) >> 8);
      await q.outb(this.cmdBase + 2, (count >> 8) & 0xff);
      await q.outb(this.cmdBase + 3, hi & 0xff);
      await q.outb(this.cmdBase + 4, (hi >> 8) & 0xff);
      await q.outb(this.cmdBase + 5, (hi >> 16) & 0xff);
    }
    await q.outb(this.cmdBase + 1, (tf.features ?? 0) & 0xff);
    await q.outb(this.cmdBase + 2, count & 0xff);
    await q.outb(this.cmdBase + 3, lba & 0xff);
    await q.outb(this.cmdBase + 4, (lba >>> 8) & 0xff);
    await q.outb(this.cmdBase + 5, (lba >>> 16) & 0xff);
    const dev = tf.device ?? 0x40;
    await q.outb(this.cmdBase + 6, 0xa0 | dev | (this.unit << 4) | (tf.ext ? 0 : (lba >>> 24) & 0x0f));
  }

  command(cmd: number): Promise<string> {
    return this.qts.outb(this.cmdBase + 7, cmd);
  }

  async readData(bytes: number): Promise<Uint8Array> {
    const out = new Uint8Array(bytes);
    for (let i = 0; i < bytes; i += 2) {
      const v = await this.qts.inw(this.cmdBase);
      out[i] = v & 0xff;
      if (i + 1 < bytes) out[i + 1] = v >> 8;
    }
    return out;
  }

  async writeData(data: Uint8Array): Promise<void> {
    for (let i = 0; i < data.length; i += 2) await this.qts.outw(this.cmdBase, data[i]! | ((data[i + 1] ?? 0) << 8));
  }

  /**
   * A PIO data-in command: `blockBytes` per DRQ block. Stops early (returning what came) if
   * the device ends the command with ERR.
   */
  async pioIn(cmd: number, tf: TaskFile, total: number, blockBytes = 512): Promise<{ data: Uint8Array; status: number }> {
    await this.setTaskFile(tf);
    await this.command(cmd);
    const out = new Uint8Array(total);
    let at = 0;
    for (;;) {
      const s = await this.waitNotBusy();
      if (s & ATA_ST.ERR || !(s & ATA_ST.DRQ) || at >= total) return { data: out.subarray(0, at), status: await this.status() };
      await this.status();
      const n = Math.min(blockBytes, total - at);
      out.set(await this.readData(n), at);
      at += n;
    }
  }

  /** A PIO data-out command. */
  async pioOut(cmd: number, tf: TaskFile, data: Uint8Array, blockBytes = 512): Promise<{ status: number }> {
    await this.setTaskFile(tf);
    await this.command(cmd);
    let at = 0;
    for (;;) {
      const s = await this.waitNotBusy();
      if (s & ATA_ST.ERR || !(s & ATA_ST.DRQ) || at >= data.length) return { status: await this.status() };
      const n = Math.min(blockBytes, data.length - at);
      await this.writeData(data.subarray(at, at + n));
      at += n;
    }
  }

  async identify(cmd = 0xec): Promise<Uint8Array> {
    const r = await this.pioIn(cmd, {}, 512);
    if (r.status & ATA_ST.ERR) throw new Error(`IDENTIFY (0x${cmd.toString(16)}) failed: status 0x${r.status.toString(16)}`);
    return r.data;
  }

  /** Writes a PRD table in guest memory and returns its address. */
  async writePrds(prds: Prd[]): Promise<number> {
    if (!this.alloc) throw new Error('no guest memory allocator');
    const at = this.alloc.alloc(prds.length * 8, 4096);
    const b = new Uint8Array(prds.length * 8);
    const dv = new DataView(b.buffer);
    prds.forEach((p, i) => {
      dv.setUint32(8 * i, p.addr, true);
      dv.setUint32(8 * i + 4, ((p.len & 0xffff) | (i === prds.length - 1 ? 0x80000000 : 0)) >>> 0, true);
    });
    await this.qts.memwrite(at, b);
    return at;
  }

  bmStatus(): Promise<number> {
    return this.qts.inb(this.bmBase! + 2);
  }

  /**
   * A bus-master DMA command: PRD table `prds` (or a table already at `prdAddr`), direction
   * `toMemory` (a device read). Waits for the BM interrupt bit, stops the engine, reads the
   * status (clearing the interrupt) and clears the BM interrupt/error bits.
   */
  async dma(cmd: number, tf: TaskFile, prds: Prd[] | number, toMemory: boolean, opts: { startFirst?: boolean } = {}): Promise<DmaResult> {
    if (this.bmBase === null) throw new Error('no bus master');
    const table = typeof prds === 'number' ? prds : await this.writePrds(prds);
    const q = this.qts;
    await q.outb(this.bmBase, 0);
    await q.outb(this.bmBase + 2, BM.ERROR | BM.INTR);
    await q.outl(this.bmBase + 4, table);
    const dir = toMemory ? BM.READ : 0;
    await q.outb(this.bmBase, dir);
    if (opts.startFirst) await q.outb(this.bmBase, dir | BM.START);
    await this.setTaskFile(tf);
    await this.command(cmd);
    if (!opts.startFirst) await q.outb(this.bmBase, dir | BM.START);
    return this.finishDma();
  }

  /** Waits for the end of a started DMA transfer: BM interrupt (or error) and not BSY. */
  async finishDma(): Promise<DmaResult> {
    const q = this.qts;
    let bm = 0;
    for (let i = 0; ; i++) {
      bm = await this.bmStatus();
      if (bm & (BM.INTR | BM.ERROR) && !((await this.altStatus()) & ATA_ST.BSY)) break;
      if (i >= this.maxRounds) throw new Error('DMA: no interrupt');
      await tick();
    }
    await q.outb(this.bmBase!, 0);
    const status = await this.status();
    const error = await this.error();
    await q.outb(this.bmBase! + 2, BM.ERROR | BM.INTR);
    return { status, error, bmStatus: bm };
  }

  /**
   * Sends an ATAPI packet (padded to 12 bytes). PIO: data-in of up to `alloc` bytes in DRQ
   * blocks of at most `bcl` bytes. DMA: into `prds` (returned in `data` from guest memory).
   */
  async packet(cdb: number[], opts: { bcl?: number; dma?: Prd[] } = {}): Promise<PacketResult> {
    const pkt = new Uint8Array(12);
    pkt.set(cdb);
    const bcl = opts.bcl ?? 0xfffe;
    const q = this.qts;
    let table = 0;
    if (opts.dma) {
      table = await this.writePrds(opts.dma);
      await q.outb(this.bmBase!, 0);
      await q.outb(this.bmBase! + 2, BM.ERROR | BM.INTR);
      await q.outl(this.bmBase! + 4, table);
      await q.outb(this.bmBase!, BM.READ);
    }
    await this.setTaskFile({ features: opts.dma ? 1 : 0, lba: (bcl & 0xffff) << 8, device: 0 });
    await this.command(0xa0);
    const s0 = await this.waitNotBusy();
    if (!(s0 & ATA_ST.DRQ)) throw new Error(`PACKET: no DRQ for the command bytes (status 0x${s0.toString(16)})`);
    if (((await this.reg(2)) & 3) !== 1) throw new Error('PACKET: interrupt reason is not CoD');
    await this.writeData(pkt);
    if (opts.dma) {
      await q.outb(this.bmBase!, BM.READ | BM.START);
      const r = await this.finishDma();
      let data = new Uint8Array(0);
      if (!(r.status & ATA_ST.ERR)) {
        const parts = await Promise.all(opts.dma.map((p) => q.memread(p.addr, p.len)));
        data = Buffer.concat(parts);
      }
      return { data, status: r.status, error: r.error, reason: await this.reg(2) };
    }
    const chunks: Uint8Array[] = [];
    for (;;) {
      const s = await this.waitNotBusy();
      if (!(s & ATA_ST.DRQ)) {
        const status = await this.status();
        return { data: Buffer.concat(chunks), status, error: await this.error(), reason: await this.reg(2) };
      }
      await this.status();
      const n = (await this.reg(4)) | ((await this.reg(5)) << 8);
      chunks.push(await this.readData(n));
    }
  }

  /** REQUEST SENSE: [key, asc, ascq]. */
  async requestSense(): Promise<[number, number, number]> {
    const r = await this.packet([0x03, 0, 0, 0, 18]);
    return [r.data[2]! & 0x0f, r.data[12]!, r.data[13]!];
  }
}
