/**
 * A virtio-pci driver on the guest side, speaking only qtest: finds the device, maps its BARs,
 * walks the vendor capabilities (modern) or uses the legacy I/O BAR, resets, negotiates
 * features, builds split rings in guest memory from a GuestAlloc, kicks, and waits for used
 * entries by polling the used ring (bounded; no timers).
 */
import type { GuestAlloc } from './alloc.js';
import { QPciBus, QPciDevice } from './pci.js';
import type { QtestClient } from './qtest-client.js';

export const VIRTIO_STATUS_ACKNOWLEDGE = 1;
export const VIRTIO_STATUS_DRIVER = 2;
export const VIRTIO_STATUS_DRIVER_OK = 4;
export const VIRTIO_STATUS_FEATURES_OK = 8;
export const VIRTIO_STATUS_NEEDS_RESET = 0x40;
export const VIRTIO_F_VERSION_1 = 32;
export const VIRTIO_RING_F_INDIRECT_DESC = 28;
export const VIRTIO_RING_F_EVENT_IDX = 29;
export const VRING_DESC_F_NEXT = 1;
export const VRING_DESC_F_WRITE = 2;
export const VRING_DESC_F_INDIRECT = 4;
export const VIRTIO_NO_VECTOR = 0xffff;

export interface QBuf {
  addr: number;
  len: number;
  /** Device-writable. */
  write: boolean;
}

export interface QUsed {
  id: number;
  len: number;
}

/** Waits one event-loop turn (lets real I/O complete). */
export function turn(): Promise<void> {
  return new Promise((r) => setImmediate(r));
}

export class QVirtQueue {
  availIdx = 0;
  lastUsed = 0;
  /** With EVENT_IDX: move used_event along as entries are consumed (as Linux does). */
  autoUsedEvent = true;
  private readonly free: number[] = [];
  private readonly chains = new Map<number, { descs: number[]; table?: [number, number] }>();

  constructor(readonly dev: QVirtioPciDevice, readonly index: number, readonly num: number, readonly desc: number, readonly avail: number, readonly used: number) {
    for (let i = num - 1; i >= 0; i--) this.free.push(i);
  }

  private get qts(): QtestClient {
    return this.dev.qts;
  }

  /** Writes descriptor `i` of the table at `table` (the ring's by default). */
  async writeDesc(i: number, addr: number, len: number, flags: number, next: number, table = this.desc): Promise<void> {
    const b = new Uint8Array(16);
    const dv = new DataView(b.buffer);
    dv.setUint32(0, addr % 2 ** 32, true);
    dv.setUint32(4, Math.floor(addr / 2 ** 32), true);
    dv.setUint32(8, len, true);
    dv.setUint16(12, flags, true);
    dv.setUint16(14, next, true);
    await this.qts.memwrite(table + 16 * i, b);
  }

  /** Makes `head` available (the avail ring entry, then the index). */
  async publish(head: number): Promise<void> {
    await this.qts.writew(this.avail + 4 + 2 * (this.availIdx % this.num), head);
    this.availIdx = (this.availIdx + 1) & 0xffff;
    await this.qts.writew(this.avail + 2, this.availIdx);
  }

  /** Adds a chain of buffers (direct, or through one indirect table); returns its head. */
  async add(bufs: QBuf[], indirect = false): Promise<number> {
    if (indirect) {
      const table = this.dev.alloc.alloc(16 * bufs.length, 16);
      for (let i = 0; i < bufs.length; i++) {
        const b = bufs[i]!;
        await this.writeDesc(i, b.addr, b.len, (b.write ? VRING_DESC_F_WRITE : 0) | (i + 1 < bufs.length ? VRING_DESC_F_NEXT : 0), i + 1, table);
      }
      const head = this.take(1)[0]!;
      await this.writeDesc(head, table, 16 * bufs.length, VRING_DESC_F_INDIRECT, 0);
      this.chains.set(head, { descs: [head], table: [table, 16 * bufs.length] });
      await this.publish(head);
      return head;
    }
    const descs = this.take(bufs.length);
    for (let i = 0; i < bufs.length; i++) {
      const b = bufs[i]!;
      await this.writeDesc(descs[i]!, b.addr, b.len, (b.write ? VRING_DESC_F_WRITE : 0) | (i + 1 < bufs.length ? VRING_DESC_F_NEXT : 0), descs[i + 1] ?? 0);
    }
    this.chains.set(descs[0]!, { descs });
    await this.publish(descs[0]!);
    return descs[0]!;
  }

  /** Reserves `n` descriptors for a hand-built chain. */
  take(n: number): number[] {
    if (this.free.length < n) throw new Error(`virtqueue ${this.index}: ${n} descriptors wanted, ${this.free.length} free`);
    return this.free.splice(this.free.length - n, n).reverse();
  }

  /** Records a hand-built chain so its descriptors are freed when it is used. */
  track(head: number, descs: number[]): void {
    this.chains.set(head, { descs });
  }

  async usedIdx(): Promise<number> {
    return this.qts.readw(this.used + 2);
  }

  /** The next used entry, if the device published one. */
  async getUsed(): Promise<QUsed | null> {
    if ((await this.usedIdx()) === this.lastUsed) return null;
    const slot = this.used + 4 + 8 * (this.lastUsed % this.num);
    const id = await this.qts.readl(slot);
    const len = await this.qts.readl(slot + 4);
    this.lastUsed = (this.lastUsed + 1) & 0xffff;
    if (this.autoUsedEvent && this.dev.has(VIRTIO_RING_F_EVENT_IDX)) await this.setUsedEvent(this.lastUsed);
    const c = this.chains.get(id);
    if (c) {
      this.chains.delete(id);
      this.free.push(...c.descs);
      if (c.table) this.dev.alloc.release(c.table[0], c.table[1]);
    }
    return { id, len };
  }

  /** Waits for the next used entry, at most `maxTurns` event-loop turns. */
  async waitUsed(maxTurns = 100000): Promise<QUsed> {
    for (let i = 0; i < maxTurns; i++) {
      const u = await this.getUsed();
      if (u) return u;
      await turn();
    }
    throw new Error(`virtqueue ${this.index}: no used entry after ${maxTurns} turns`);
  }

  async kick(): Promise<void> {
    await this.dev.notify(this.index);
  }

  /** With EVENT_IDX: the used_event field (interrupt when the used index passes it). */
  async setUsedEvent(v: number): Promise<void> {
    await this.qts.writew(this.avail + 4 + 2 * this.num, v);
  }

  async availEvent(): Promise<number> {
    return this.qts.readw(this.used + 4 + 8 * this.num);
  }

  async setAvailFlags(v: number): Promise<void> {
    await this.qts.writew(this.avail, v);
  }
}

export interface QVirtioOpenOptions {
  /** Drive it through the legacy I/O BAR (a transitional device). */
  legacy?: boolean;
  /** The device in this PCI slot (default: the first of its type). */
  slot?: number;
  /** The bus that places its BARs; share one among devices so their BARs do not overlap. */
  bus?: QPciBus;
}

export class QVirtioPciDevice {
  /** Modern structures (absolute MMIO addresses). */
  common = 0;
  isrAddr = 0;
  devCfg = 0;
  notifyBase = 0;
  notifyMult = 0;
  /** Legacy I/O base. */
  ioBase = 0;
  msixTable = 0;
  msixCap = 0;
  /** The VIRTIO_PCI_CAP_PCI_CFG capability's offset in config space (0: none). */
  pciCfgCap = 0;
  msixOn = false;
  features = 0n;
  readonly queues: QVirtQueue[] = [];

  private constructor(readonly qts: QtestClient, readonly pci: QPciDevice, readonly alloc: GuestAlloc, readonly legacy: boolean) {}

  /** Finds the first virtio device of type `virtioId` (2: block), maps it and enables it. */
  static async open(qts: QtestClient, alloc: GuestAlloc, virtioId: number, opts: QVirtioOpenOptions = {}): Promise<QVirtioPciDevice> {
    const bus = opts.bus ?? new QPciBus(qts);
    const legacyId = 0x1000 + virtioId - 1;
    const hit = (await bus.enumerate()).find(([devfn, v, d]) => v === 0x1af4 && (d === 0x1040 + virtioId || d === legacyId) && (opts.slot === undefined || devfn >> 3 === opts.slot));
    if (!hit) throw new Error(`no virtio device of type ${virtioId}${opts.slot === undefined ? '' : ` in slot ${opts.slot}`}`);
    const pdev = new QPciDevice(bus, hit[0]);
    const dev = new QVirtioPciDevice(qts, pdev, alloc, opts.legacy ?? false);
    await dev.map();
    return dev;
  }

  private async map(): Promise<void> {
    const p = this.pci;
    if (this.legacy) this.ioBase = (await p.mapBar(0)).addr;
    const bars = new Map<number, number>();
    for (const cap of await p.capabilities(0x09)) {
      const type = await p.config(cap + 3, 1);
      if (type === 5) {
        this.pciCfgCap = cap; // the config-space window: no BAR of its own
        continue;
      }
      const bar = await p.config(cap + 4, 1);
      const off = await p.config(cap + 8, 4);
      if (!bars.has(bar)) bars.set(bar, (await p.mapBar(bar)).addr);
      const at = bars.get(bar)! + off;
      if (type === 1) this.common = at;
      else if (type === 2) {
        this.notifyBase = at;
        this.notifyMult = await p.config(cap + 16, 4);
      } else if (type === 3) this.isrAddr = at;
      else if (type === 4) this.devCfg = at;
    }
    const msix = await p.capabilities(0x11);
    if (msix.length) {
      this.msixCap = msix[0]!;
      const t = await p.config(this.msixCap + 4, 4);
      this.msixTable = (await p.mapBar(t & 7)).addr + (t & ~7);
    }
    await p.enable();
  }

  // ---- status and features ----

  async status(): Promise<number> {
    return this.legacy ? this.qts.inb(this.ioBase + 0x12) : this.qts.readb(this.common + 0x14);
  }

  async setStatus(v: number): Promise<void> {
    if (this.legacy) await this.qts.outb(this.ioBase + 0x12, v);
    else await this.qts.writeb(this.common + 0x14, v);
  }

  async reset(): Promise<void> {
    await this.setStatus(0);
    this.queues.length = 0;
  }

  async hostFeatures(): Promise<bigint> {
    if (this.legacy) return BigInt(await this.qts.inl(this.ioBase));
    await this.qts.writel(this.common, 0);
    const lo = await this.qts.readl(this.common + 4);
    await this.qts.writel(this.common, 1);
    const hi = await this.qts.readl(this.common + 4);
    return (BigInt(hi) << 32n) | BigInt(lo);
  }

  /**
   * Reset, ACKNOWLEDGE, DRIVER, and the features `want` (masked by what the device offers;
   * VERSION_1 added for modern). Returns whether FEATURES_OK stuck (modern) — always true
   * for legacy.
   */
  async negotiate(want: bigint, exact = false): Promise<boolean> {
    await this.reset();
    await this.setStatus(VIRTIO_STATUS_ACKNOWLEDGE);
    await this.setStatus(VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER);
    const host = await this.hostFeatures();
    let f = exact ? want : want & host;
    if (this.legacy) {
      f &= 0xffffffffn;
      await this.qts.outl(this.ioBase + 4, Number(f));
      this.features = f;
      return true;
    }
    if (!exact) f |= 1n << BigInt(VIRTIO_F_VERSION_1);
    this.features = f;
    await this.qts.writel(this.common + 8, 0);
    await this.qts.writel(this.common + 0xc, Number(f & 0xffffffffn));
    await this.qts.writel(this.common + 8, 1);
    await this.qts.writel(this.common + 0xc, Number(f >> 32n));
    await this.setStatus(VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK);
    return ((await this.status()) & VIRTIO_STATUS_FEATURES_OK) !== 0;
  }

  async driverOk(): Promise<void> {
    const s = this.legacy ? VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER : VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK;
    await this.setStatus(s | VIRTIO_STATUS_DRIVER_OK);
  }

  has(bit: number): boolean {
    return (this.features & (1n << BigInt(bit))) !== 0n;
  }

  // ---- queues ----

  async numQueues(): Promise<number> {
    return this.qts.readw(this.common + 0x12);
  }

  /** Sets up queue `index` (size `size`, or the device's maximum); returns it. */
  async setupQueue(index: number, size?: number): Promise<QVirtQueue> {
    const q = this.qts;
    let vq: QVirtQueue;
    if (this.legacy) {
      await q.outw(this.ioBase + 0x0e, index);
      const num = await q.inw(this.ioBase + 0x0c);
      if (!num) throw new Error(`virtio: queue ${index} does not exist`);
      const availEnd = 16 * num + 6 + 2 * num;
      const bytes = Math.ceil(availEnd / 4096) * 4096 + Math.ceil((6 + 8 * num) / 4096) * 4096;
      const base = this.alloc.alloc(bytes, 4096);
      await q.memset(base, bytes, 0);
      vq = new QVirtQueue(this, index, num, base, base + 16 * num, base + Math.ceil(availEnd / 4096) * 4096);
      await q.outl(this.ioBase + 0x08, base / 4096);
    } else {
      await q.writew(this.common + 0x16, index);
      const max = await q.readw(this.common + 0x18);
      if (!max) throw new Error(`virtio: queue ${index} does not exist`);
      const num = size ?? max;
      await q.writew(this.common + 0x18, num);
      const desc = this.alloc.alloc(16 * num, 4096);
      const avail = this.alloc.alloc(6 + 2 * num, 4096);
      const used = this.alloc.alloc(6 + 8 * num, 4096);
      await q.memset(desc, 16 * num, 0);
      await q.memset(avail, 6 + 2 * num, 0);
      await q.memset(used, 6 + 8 * num, 0);
      for (const [off, a] of [[0x20, desc], [0x28, avail], [0x30, used]] as const) {
        await q.writel(this.common + off, a % 2 ** 32);
        await q.writel(this.common + off + 4, Math.floor(a / 2 ** 32));
      }
      await q.writew(this.common + 0x1c, 1);
      vq = new QVirtQueue(this, index, num, desc, avail, used);
    }
    this.queues[index] = vq;
    return vq;
  }

  async notify(index: number): Promise<void> {
    if (this.legacy) await this.qts.outw(this.ioBase + 0x10, index);
    else {
      await this.qts.writew(this.common + 0x16, index);
      const off = await this.qts.readw(this.common + 0x1e);
      await this.qts.writew(this.notifyBase + off * this.notifyMult, index);
    }
  }

  /** Reads and clears the ISR. */
  async isr(): Promise<number> {
    return this.legacy ? this.qts.inb(this.ioBase + 0x13) : this.qts.readb(this.isrAddr);
  }

  async configGeneration(): Promise<number> {
    return this.qts.readb(this.common + 0x15);
  }

  // ---- device configuration ----

  private cfgAddr(off: number): number {
    return this.legacy ? this.ioBase + (this.msixOn ? 0x18 : 0x14) + off : this.devCfg + off;
  }

  async config8(off: number): Promise<number> {
    return this.legacy ? this.qts.inb(this.cfgAddr(off)) : this.qts.readb(this.cfgAddr(off));
  }

  async config16(off: number): Promise<number> {
    return this.legacy ? this.qts.inw(this.cfgAddr(off)) : this.qts.readw(this.cfgAddr(off));
  }

  async config32(off: number): Promise<number> {
    return this.legacy ? this.qts.inl(this.cfgAddr(off)) : this.qts.readl(this.cfgAddr(off));
  }

  async config64(off: number): Promise<number> {
    return (await this.config32(off)) + (await this.config32(off + 4)) * 2 ** 32;
  }

  async setConfig8(off: number, v: number): Promise<void> {
    if (this.legacy) await this.qts.outb(this.cfgAddr(off), v);
    else await this.qts.writeb(this.cfgAddr(off), v);
  }

  /** Reads a modern-BAR register through the VIRTIO_PCI_CAP_PCI_CFG window. */
  async windowRead(offset: number, len: 1 | 2 | 4): Promise<number> {
    await this.pci.setConfig(this.pciCfgCap + 4, 1, 4);
    await this.pci.setConfig(this.pciCfgCap + 8, 4, offset);
    await this.pci.setConfig(this.pciCfgCap + 12, 4, len);
    return (await this.pci.config(this.pciCfgCap + 16, 4)) & (0xffffffff >>> (32 - 8 * len));
  }

  /** Writes a modern-BAR register through the VIRTIO_PCI_CAP_PCI_CFG window. */
  async windowWrite(offset: number, len: 1 | 2 | 4, v: number): Promise<void> {
    await this.pci.setConfig(this.pciCfgCap + 4, 1, 4);
    await this.pci.setConfig(this.pciCfgCap + 8, 4, offset);
    await this.pci.setConfig(this.pciCfgCap + 12, 4, len);
    await this.pci.setConfig(this.pciCfgCap + 16, 4, v);
  }

  // ---- MSI-X ----

  /** Programs table entry `v` (message address and data) and unmasks it. */
  async setMsixEntry(v: number, addr: number, data: number, masked = false): Promise<void> {
    const e = this.msixTable + 16 * v;
    await this.qts.writel(e, addr % 2 ** 32);
    await this.qts.writel(e + 4, Math.floor(addr / 2 ** 32));
    await this.qts.writel(e + 8, data);
    await this.qts.writel(e + 12, masked ? 1 : 0);
  }

  async enableMsix(on = true): Promise<void> {
    const ctrl = await this.pci.config(this.msixCap + 2, 2);
    await this.pci.setConfig(this.msixCap + 2, 2, on ? ctrl | 0x8000 : ctrl & ~0x8000);
    this.msixOn = on;
  }

  /** Vector for configuration changes; returns what the device accepted. */
  async setConfigVector(v: number): Promise<number> {
    if (this.legacy) {
      await this.qts.outw(this.ioBase + 0x14, v);
      return this.qts.inw(this.ioBase + 0x14);
    }
    await this.qts.writew(this.common + 0x10, v);
    return this.qts.readw(this.common + 0x10);
  }

  /** Vector for queue `index`; returns what the device accepted. */
  async setQueueVector(index: number, v: number): Promise<number> {
    if (this.legacy) {
      await this.qts.outw(this.ioBase + 0x0e, index);
      await this.qts.outw(this.ioBase + 0x16, v);
      return this.qts.inw(this.ioBase + 0x16);
    }
    await this.qts.writew(this.common + 0x16, index);
    await this.qts.writew(this.common + 0x1a, v);
    return this.qts.readw(this.common + 0x1a);
  }
}
