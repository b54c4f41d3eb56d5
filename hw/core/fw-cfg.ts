/**
 * fw_cfg, QEMU's firmware configuration device, at its x86 I/O ports: a 16-bit selector at
 * 0x510 and byte-wide data at 0x511. Firmware and test harnesses read the RAM size and CPU
 * count from it (libqos sizes its guest-memory allocator from FW_CFG_RAM_SIZE).
 */
import type { IoRegion } from './address-space.js';
import type { Machine } from './machine.js';

export const FW_CFG = {
  SIGNATURE: 0x00,
  ID: 0x01,
  RAM_SIZE: 0x03,
  NB_CPUS: 0x05,
  MAX_CPUS: 0x0f,
  FILE_DIR: 0x19,
  FILE_FIRST: 0x20,
} as const;

const FW_CFG_IO_BASE = 0x510;

export class FwCfg {
  private readonly items = new Map<number, Uint8Array>();
  private readonly files: { name: string; key: number }[] = [];
  private selected = 0;
  private pos = 0;

  constructor(opts: { ramSize: number; cpus?: number }) {
    this.items.set(FW_CFG.SIGNATURE, new TextEncoder().encode('QEMU'));
    this.items.set(FW_CFG.ID, le(1, 4)); // the traditional interface only, no DMA
    this.items.set(FW_CFG.RAM_SIZE, le(opts.ramSize, 8));
    this.items.set(FW_CFG.NB_CPUS, le(opts.cpus ?? 1, 2));
    this.items.set(FW_CFG.MAX_CPUS, le(opts.cpus ?? 1, 2));
    this.rebuildDir();
  }

  /** Adds a named file ("etc/..."), listed in the file directory. */
  addFile(name: string, data: Uint8Array): void {
    if (new TextEncoder().encode(name).length > 55) throw new RangeError(`fw_cfg file name '${name}' is longer than 55 bytes`);
    const key = FW_CFG.FILE_FIRST + this.files.length;
    this.files.push({ name, key });
    this.items.set(key, data);
    this.rebuildDir();
  }

  /** The directory: a big-endian count, then 64-byte entries (size, select, reserved, name). */
  private rebuildDir(): void {
    const dir = new Uint8Array(4 + 64 * this.files.length);
    const dv = new DataView(dir.buffer);
    dv.setUint32(0, this.files.length);
    this.files.forEach((f, i) => {
      const at = 4 + 64 * i;
      dv.setUint32(at, this.items.get(f.key)!.length);
      dv.setUint16(at + 4, f.key);
      dir.set(new TextEncoder().encode(f.name), at + 8);
    });
    this.items.set(FW_CFG.FILE_DIR, dir);
  }

  attach(m: Machine): void {
    const region: IoRegion = {
      name: 'fw_cfg',
      read: (off, size) => {
        if (off !== 1) return 0xffffffff >>> (32 - 8 * size);
        let v = 0;
        for (let i = 0; i < size; i++) v |= this.readByte() << (8 * i);
        return v >>> 0;
      },
      write: (off, size, value) => {
        if (off === 0 && size === 2) {
          this.selected = value & 0xffff;
          this.pos = 0;
        }
      },
    };
    m.io.map(FW_CFG_IO_BASE, 2, region);
  }

  private readByte(): number {
    const item = this.items.get(this.selected & 0x3fff);
    if (!item || this.pos >= item.length) return 0;
    return item[this.pos++]!;
  }
}

function le(v: number, bytes: number): Uint8Array {
  const out = new Uint8Array(bytes);
  let x = BigInt(v);
  for (let i = 0; i < bytes; i++) {
    out[i] = Number(x & 0xffn);
    x >>= 8n;
  }
  return out;
}
