/**
 * The virtio-pci transport. A transitional device (the default) has the legacy register
 * block in I/O BAR0; every device has the modern (virtio 1.0) structures in the 64-bit
 * memory BAR4 (16 KiB: common config at 0, ISR at 0x1000, device config at 0x2000, notify at
 * 0x3000 with a multiplier of 4), found through vendor capabilities, and MSI-X in BAR1.
 * INTx follows the ISR while MSI-X is off; reading the ISR clears it.
 */
import type { IoRegion } from '../core/address-space.js';
import type { Machine } from '../core/machine.js';
import type { PciBus } from '../pci/host.js';
import { PciFunction } from '../pci/pci-device.js';
import { Msix, MSIX_BAR_SIZE } from './msix.js';
import { VirtioDevice, type VirtioTransport } from './virtio.js';
import { VIRTIO_NO_VECTOR, type VirtQueue } from './virtqueue.js';

export const PCI_VENDOR_ID_REDHAT_QUMRANET = 0x1af4;
export const PCI_CAP_ID_VNDR = 0x09;
export const VIRTIO_PCI_CAP_COMMON_CFG = 1;
export const VIRTIO_PCI_CAP_NOTIFY_CFG = 2;
export const VIRTIO_PCI_CAP_ISR_CFG = 3;
export const VIRTIO_PCI_CAP_DEVICE_CFG = 4;
export const VIRTIO_PCI_CAP_PCI_CFG = 5;
/** Where the VIRTIO_PCI_CAP_PCI_CFG window sits in config space (its data at +16). */
const PCI_CFG_CAP = 0xa4;

export const MODERN_BAR = 4;
export const MSIX_BAR = 1;
export const LEGACY_BAR = 0;
const MODERN_SIZE = 0x4000;
const COMMON_OFF = 0x0000;
const ISR_OFF = 0x1000;
const DEVICE_OFF = 0x2000;
const NOTIFY_OFF = 0x3000;
const NOTIFY_MULT = 4;

export interface VirtioPciOptions {
  name: string;
  bus: PciBus;
  slot: number;
  /** PCI device id of the transitional device (0x1001 for block). */
  legacyDeviceId: number;
  classCode: number;
  disableLegacy: boolean;
  /** MSI-X vectors; 0: no MSI-X at all (QEMU's vectors=0), interrupts are INTx only. */
  vectors: number;
}

/**
 * A PciFunction whose VIRTIO_PCI_CAP_PCI_CFG window reaches the modern BAR: a config-space
 * read of pci_cfg_data reads the register that bar/offset/length select.
 */
class VirtioPciFunction extends PciFunction {
  window: IoRegion | null = null;

  private target(): { off: number; len: 1 | 2 | 4 } | null {
    const dv = new DataView(this.config.buffer);
    const bar = this.config[PCI_CFG_CAP + 4]!;
    const off = dv.getUint32(PCI_CFG_CAP + 8, true);
    const len = dv.getUint32(PCI_CFG_CAP + 12, true);
    if (bar !== MODERN_BAR || (len !== 1 && len !== 2 && len !== 4) || off % len !== 0 || off + len > MODERN_SIZE) return null;
    return { off, len };
  }

  override configRead(off: number, size: 1 | 2 | 4): number {
    const data = PCI_CFG_CAP + 16;
    if (this.window && off < data + 4 && off + size > data) {
      const t = this.target();
      const v = t ? this.window.read(t.off, t.len) : 0;
      new DataView(this.config.buffer).setUint32(data, v >>> 0, true);
    }
    return super.configRead(off, size);
  }

  /** After a guest write into the window's data: forward it to the BAR. */
  windowWritten(off: number, size: number): void {
    const data = PCI_CFG_CAP + 16;
    if (!this.window || off >= data + 4 || off + size <= data) return;
    const t = this.target();
    if (t) this.window.write(t.off, t.len, new DataView(this.config.buffer).getUint32(data, true) & (0xffffffff >>> (32 - 8 * t.len)));
  }
}

export class VirtioPciProxy implements VirtioTransport {
  readonly fn: VirtioPciFunction;
  readonly msix: Msix | null;
  private dfselect = 0;
  private gfselect = 0;
  private queueSel = 0;
  private msixConfig = VIRTIO_NO_VECTOR;

  constructor(readonly vdev: VirtioDevice, private readonly opts: VirtioPciOptions) {
    const modernOnly = opts.disableLegacy;
    this.fn = new VirtioPciFunction(opts.name, {
      vendor: PCI_VENDOR_ID_REDHAT_QUMRANET,
      device: modernOnly ? 0x1040 + vdev.deviceId : opts.legacyDeviceId,
      classCode: opts.classCode,
      revision: modernOnly ? 1 : 0,
      subsystemVendor: PCI_VENDOR_ID_REDHAT_QUMRANET,
      subsystem: modernOnly ? 0x1100 : vdev.deviceId,
      interruptPin: 1,
    });
    vdev.transport = this;
    const f = this.fn;
    f.config[0x06] = f.config[0x06]! | 0x10; // capability list
    // Capabilities: MSI-X at 0x98 -> PCI cfg window 0xa4 -> notify 0x84 -> device 0x70 -> ISR 0x60 -> common 0x50.
    this.msix = opts.vectors > 0 ? new Msix(f, opts.vectors, 0x98, MSIX_BAR, PCI_CFG_CAP) : null;
    this.vendorCap(PCI_CFG_CAP, 0x84, VIRTIO_PCI_CAP_PCI_CFG, 0, 0, 0);
    f.config[PCI_CFG_CAP + 2] = 20;
    f.config[PCI_CFG_CAP + 4] = 0;
    f.setWritable(PCI_CFG_CAP + 4, 1, 0xff);
    f.setWritable(PCI_CFG_CAP + 8, 4, 0xffffffff);
    f.setWritable(PCI_CFG_CAP + 12, 4, 0xffffffff);
    f.setWritable(PCI_CFG_CAP + 16, 4, 0xffffffff);
    this.vendorCap(0x84, 0x70, VIRTIO_PCI_CAP_NOTIFY_CFG, NOTIFY_OFF, NOTIFY_MULT * vdev.queues.length, NOTIFY_MULT);
    this.vendorCap(0x70, 0x60, VIRTIO_PCI_CAP_DEVICE_CFG, DEVICE_OFF, 0x1000);
    this.vendorCap(0x60, 0x50, VIRTIO_PCI_CAP_ISR_CFG, ISR_OFF, 0x1000);
    this.vendorCap(0x50, 0x00, VIRTIO_PCI_CAP_COMMON_CFG, COMMON_OFF, 0x1000);
    f.config[0x34] = this.msix ? 0x98 : PCI_CFG_CAP;
    if (this.msix) {
      this.msix.onEnableChange = (on) => {
        if (on) this.fn.setIntx(false);
        else this.fn.setIntx((this.vdev.isr & 1) !== 0);
      };
    }
    f.onConfigWrite = (off, size) => {
      this.msix?.configWritten(off, size);
      f.windowWritten(off, size);
    };
    const modern = this.modernRegion();
    f.window = modern;
    if (this.msix) f.addBar(MSIX_BAR, { size: MSIX_BAR_SIZE, kind: 'mem32', region: this.msix.region });
    f.addBar(MODERN_BAR, { size: MODERN_SIZE, kind: 'mem64', region: modern });
    if (!modernOnly) {
      const need = 0x18 + vdev.config.length;
      let size = 4;
      while (size < need) size *= 2;
      f.addBar(LEGACY_BAR, { size, kind: 'io', region: this.legacyRegion() });
    }
  }

  private vendorCap(off: number, next: number, type: number, offset: number, length: number, mult?: number): void {
    const c = this.fn.config;
    const dv = new DataView(c.buffer);
    c[off] = PCI_CAP_ID_VNDR;
    c[off + 1] = next;
    c[off + 2] = mult === undefined ? 16 : 20;
    c[off + 3] = type;
    c[off + 4] = MODERN_BAR;
    dv.setUint32(off + 8, offset, true);
    dv.setUint32(off + 12, length, true);
    if (mult !== undefined) dv.setUint32(off + 16, mult, true);
    if (type === VIRTIO_PCI_CAP_PCI_CFG) c[off + 2] = 20;
  }

  plug(m: Machine): void {
    if (this.msix) this.msix.machine = m;
    this.opts.bus.plug(this.opts.slot, 0, this.fn);
  }

  unplug(): void {
    this.opts.bus.unplug(this.fn);
    if (this.msix) this.msix.machine = null;
  }

  // ---- VirtioTransport ----

  notifyQueue(vq: VirtQueue): void {
    this.interrupt(vq.vector);
  }

  notifyConfig(): void {
    this.interrupt(this.msixConfig);
  }

  isrCleared(): void {
    this.msixConfig = VIRTIO_NO_VECTOR;
    this.fn.setIntx(false);
  }

  private interrupt(vector: number): void {
    if (this.msix?.enabled) {
      if (vector !== VIRTIO_NO_VECTOR) this.msix.notify(vector);
    } else {
      this.fn.setIntx((this.vdev.isr & 1) !== 0);
    }
  }

  private readIsr(): number {
    const v = this.vdev.isr;
    this.vdev.isr = 0;
    this.fn.setIntx(false);
    return v;
  }

  private vectorOk(v: number): number {
    return v < (this.msix?.vectors ?? 0) ? v : VIRTIO_NO_VECTOR;
  }

  // ---- modern: BAR4 ----

  private modernRegion(): IoRegion {
    return {
      name: `${this.opts.name} virtio modern`,
      read: (off, size) => {
        if (off < ISR_OFF) {
          // A narrower read takes its bytes from the register that holds them (a CPU that
          // splits 16-bit MMIO reads into bytes still sees the register).
          const rel = off - COMMON_OFF;
          const width = rel >= 0x14 && rel < 0x16 ? 1 : rel >= 0x10 && rel < 0x20 ? 2 : 4;
          const at = rel & ~(width - 1);
          return (this.commonRead(at) >>> (8 * (rel - at))) & (0xffffffff >>> (32 - 8 * size));
        }
        if (off < DEVICE_OFF) return off === ISR_OFF ? this.readIsr() : 0;
        if (off < NOTIFY_OFF) return this.vdev.configRead(off - DEVICE_OFF, size);
        return 0;
      },
      write: (off, size, v) => {
        if (off < ISR_OFF) this.commonWrite(off - COMMON_OFF, v);
        else if (off < DEVICE_OFF) return;
        else if (off < NOTIFY_OFF) this.vdev.configWrite(off - DEVICE_OFF, size, v);
        else if ((off - NOTIFY_OFF) % NOTIFY_MULT === 0) this.vdev.kick((off - NOTIFY_OFF) / NOTIFY_MULT);
      },
    };
  }

  private selected(): VirtQueue | undefined {
    return this.vdev.queues[this.queueSel];
  }

  private commonRead(off: number): number {
    const d = this.vdev;
    const q = this.selected();
    const word = (f: bigint, sel: number): number => (sel < 2 ? Number((f >> BigInt(32 * sel)) & 0xffffffffn) : 0);
    switch (off) {
      case 0x00: return this.dfselect;
      case 0x04: return word(d.hostFeatures, this.dfselect);
      case 0x08: return this.gfselect;
      case 0x0c: return word(d.guestFeatures, this.gfselect);
      case 0x10: return this.msixConfig;
      case 0x12: return d.queues.length;
      case 0x14: return d.status;
      case 0x15: return d.configGeneration;
      case 0x16: return this.queueSel;
      case 0x18: return q ? q.num : 0;
      case 0x1a: return q ? q.vector : VIRTIO_NO_VECTOR;
      case 0x1c: return q?.enabled ? 1 : 0;
      case 0x1e: return q ? this.queueSel : 0;
      case 0x20: return q ? q.desc % 2 ** 32 : 0;
      case 0x24: return q ? Math.floor(q.desc / 2 ** 32) : 0;
      case 0x28: return q ? q.avail % 2 ** 32 : 0;
      case 0x2c: return q ? Math.floor(q.avail / 2 ** 32) : 0;
      case 0x30: return q ? q.used % 2 ** 32 : 0;
      case 0x34: return q ? Math.floor(q.used / 2 ** 32) : 0;
      default: return 0;
    }
  }

  private commonWrite(off: number, v: number): void {
    const d = this.vdev;
    const q = this.selected();
    const setAddr = (which: 'desc' | 'avail' | 'used', high: boolean): void => {
      if (!q || q.enabled) return;
      const cur = q[which];
      q[which] = high ? (cur % 2 ** 32) + (v >>> 0) * 2 ** 32 : Math.floor(cur / 2 ** 32) * 2 ** 32 + (v >>> 0);
    };
    switch (off) {
      case 0x00: this.dfselect = v >>> 0; break;
      case 0x08: this.gfselect = v >>> 0; break;
      case 0x0c:
        if (this.gfselect < 2 && !(d.status & 8)) {
          const sh = BigInt(32 * this.gfselect);
          d.guestFeatures = (d.guestFeatures & ~(0xffffffffn << sh)) | (BigInt(v >>> 0) << sh);
        }
        break;
      case 0x10: this.msixConfig = this.vectorOk(v & 0xffff); break;
      case 0x14:
        d.setStatus(v, false);
        if ((v & 0xff) === 0) this.resetTransport();
        break;
      case 0x16: this.queueSel = v & 0xffff; break;
      case 0x18:
        if (q && !q.enabled && v > 0 && v <= q.maxNum && (v & (v - 1)) === 0) q.num = v;
        break;
      case 0x1a: if (q) q.vector = this.vectorOk(v & 0xffff); break;
      case 0x1c:
        if (q && (v & 0xffff) === 1 && !q.enabled) {
          q.enabled = true;
          q.ringsChanged();
        }
        break;
      case 0x20: setAddr('desc', false); break;
      case 0x24: setAddr('desc', true); break;
      case 0x28: setAddr('avail', false); break;
      case 0x2c: setAddr('avail', true); break;
      case 0x30: setAddr('used', false); break;
      case 0x34: setAddr('used', true); break;
      default: break;
    }
  }

  private resetTransport(): void {
    this.dfselect = this.gfselect = this.queueSel = 0;
    this.msixConfig = VIRTIO_NO_VECTOR;
  }

  // ---- legacy: BAR0 ----

  private legacyRegion(): IoRegion {
    return {
      name: `${this.opts.name} virtio legacy`,
      read: (off, size) => {
        const d = this.vdev;
        const q = this.selected();
        const cfg = this.msix?.enabled ? 0x18 : 0x14;
        if (off >= cfg) return d.configRead(off - cfg, size);
        switch (off) {
          case 0x00: return d.legacyFeatures();
          case 0x04: return Number(d.guestFeatures & 0xffffffffn);
          case 0x08: return q ? Math.floor(q.desc / 4096) : 0;
          case 0x0c: return q ? q.num : 0;
          case 0x0e: return this.queueSel;
          case 0x12: return d.status;
          case 0x13: return this.readIsr();
          case 0x14: return this.msixConfig;
          case 0x16: return q ? q.vector : VIRTIO_NO_VECTOR;
          default: return 0;
        }
      },
      write: (off, size, v) => {
        const d = this.vdev;
        const q = this.selected();
        const cfg = this.msix?.enabled ? 0x18 : 0x14;
        if (off >= cfg) return d.configWrite(off - cfg, size, v);
        switch (off) {
          case 0x04: if (!(d.status & 4)) d.setLegacyFeatures(v); break;
          case 0x08: if (q) { q.num = q.maxNum; q.setLegacyPfn(v >>> 0); } break;
          case 0x0e: this.queueSel = v & 0xffff; break;
          case 0x10: d.kick(v & 0xffff); break;
          case 0x12:
            d.setStatus(v, true);
            if ((v & 0xff) === 0) this.resetTransport();
            break;
          case 0x14: this.msixConfig = this.vectorOk(v & 0xffff); break;
          case 0x16: if (q) q.vector = this.vectorOk(v & 0xffff); break;
          default: break;
        }
      },
    };
  }
}
