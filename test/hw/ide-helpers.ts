// Shared setup for the IDE tests: a pc machine with the PIIX IDE function, drives over
// real image files, and the guest-side driver through in-process qtest.
import { writeFileSync, truncateSync } from 'node:fs';
import { join } from 'node:path';
import { PcMachine } from '../../hw/pc/pc.js';
import { IdeDrive, PiixIde } from '../../hw/ide/piix.js';
import { createBackend, type BlockBackend } from '../../src/backend/backend.js';
import { openNode, unref } from '../../src/block/graph.js';
import type { BlockNode } from '../../src/block/node.js';
import { GuestAlloc } from '../../src/qos/alloc.js';
import { QAtaChannel } from '../../src/qos/ata.js';
import { QPciBus } from '../../src/qos/pci.js';
import { QtestClient } from '../../src/qos/qtest-client.js';

let seq = 0;

export interface Rig {
  m: PcMachine;
  ide: PiixIde;
  qts: QtestClient;
  alloc: GuestAlloc;
  ch: [QAtaChannel, QAtaChannel];
  backends: BlockBackend[];
  cleanup(): void;
}

/** A raw image file holding `data` (or a sparse file of `size` bytes). */
export function imageFile(dir: string, data: Uint8Array | number): string {
  const path = join(dir, `img${seq++}.img`);
  if (typeof data === 'number') {
    writeFileSync(path, '');
    truncateSync(path, data);
  } else writeFileSync(path, data);
  return path;
}

export async function rawNode(path: string, readOnly = false): Promise<BlockNode> {
  return openNode({ driver: 'raw', discard: 'unmap', 'read-only': readOnly, file: { driver: 'file', filename: path, discard: 'unmap', 'read-only': readOnly } });
}

export async function backendOn(path: string | null, readOnly = false): Promise<BlockBackend> {
  const name = `ide${seq++}`;
  if (!path) return createBackend({ name });
  const node = await rawNode(path, readOnly);
  const b = createBackend({ name }, node);
  unref(node);
  return b;
}

export interface DriveSpec {
  bus: 0 | 1;
  unit: 0 | 1;
  kind: 'hd' | 'cd';
  path: string | null;
  serial?: string;
  model?: string;
  /** A ready backend to use instead of one over `path`. */
  backend?: BlockBackend;
}

export async function rig(drives: DriveSpec[]): Promise<Rig> {
  const m = new PcMachine({ ramSize: 32 << 20 });
  const ide = new PiixIde({ id: 'ide', bus: m.chipset.bus, irqs: m.ioapic });
  m.addDevice(ide);
  const backends: BlockBackend[] = [];
  for (const d of drives) {
    const b = d.backend ?? await backendOn(d.path, d.kind === 'cd');
    backends.push(b);
    const opts = { id: `${d.kind}${d.bus}${d.unit}`, kind: d.kind, drive: b, ...(d.serial ? { serial: d.serial } : {}), ...(d.model ? { model: d.model } : {}) };
    ide.attach(d.bus, d.unit, new IdeDrive(opts));
  }
  const qts = QtestClient.inProcess(m);
  await qts.irqInterceptIn('ioapic');
  const alloc = await GuestAlloc.forPc(qts);
  const ch = await QAtaChannel.piix(qts, new QPciBus(qts), alloc);
  return {
    m, ide, qts, alloc, ch, backends,
    cleanup: () => {
      m.removeDevice('ide');
      for (const b of backends) if (!b.dead) b.unref();
    },
  };
}

/** Little-endian word `n` of IDENTIFY data. */
export function word(id: Uint8Array, n: number): number {
  return id[2 * n]! | (id[2 * n + 1]! << 8);
}

/** An ATA string from IDENTIFY data (words swapped back into byte order). */
export function ataString(id: Uint8Array, first: number, count: number): string {
  let s = '';
  for (let i = 0; i < count; i++) s += String.fromCharCode(id[2 * (first + i) + 1]!, id[2 * (first + i)]!);
  return s;
}
