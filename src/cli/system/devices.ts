/**
 * The block devices of `spindle system`: backends from -drive and -blockdev, and the device
 * models (-drive if=ide|none, -device ide-hd|ide-cd) plugged into the pc machine, with
 * QEMU's names and defaults (if=ide; index N is bus N/2, unit N%2; ide-cd may be empty).
 */
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import type { PcMachine } from '../../../hw/pc/pc.js';
import { IdeDrive, PiixIde } from '../../../hw/ide/piix.js';
import { VirtioBlkPci } from '../../../hw/block/virtio-blk.js';
import { XenBridge } from '../../../hw/xen/xen-bridge.js';
import { XenDisk } from '../../../hw/xen/xen-disk.js';
import { createBackend, findBackend, type BlockBackend } from '../../backend/backend.js';
import { findNode, openNode, unref } from '../../block/graph.js';
import type { BlockNode } from '../../block/node.js';
import type { NodeOptions } from '../../block/types.js';
import type { ErrorAction } from '../../backend/device-ops.js';
import { imageOptions } from '../img/open.js';
import { imgCreateQcow2 } from '../img/create-qcow2.js';
import { CliError } from '../fail.js';
import type { SystemConfig } from './args.js';
import type { KeyvalObject } from './keyval.js';

/** Keyval strings as the typed values blockdev options take. */
function typed(v: unknown): unknown {
  if (typeof v === 'object' && v !== null) return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, typed(x)]));
  if (v === 'on' || v === 'true') return true;
  if (v === 'off' || v === 'false') return false;
  if (typeof v === 'string' && /^\d+$/.test(v) && v.length < 16) return Number(v);
  return v;
}

/** What the machine holds and must let go of at exit. */
export interface Plugged {
  nodes: BlockNode[];
  backends: BlockBackend[];
  /** Scratch directories (-snapshot's overlays), removed at exit. */
  scratch: string[];
  ide: PiixIde;
  /** The xenbus stand-in, made with the first xen-disk. */
  xen: XenBridge | null;
}

const DRIVE_KEYS = new Set(['file', 'if', 'format', 'id', 'readonly', 'cache', 'media', 'index', 'bus', 'unit', 'serial', 'werror', 'rerror', 'discard', 'aio']);

function str(v: unknown): string | undefined {
  return typeof v === 'string' ? v : undefined;
}

export async function plugDevices(machine: PcMachine, cfg: SystemConfig): Promise<Plugged> {
  const p: Plugged = { nodes: [], backends: [], scratch: [], ide: new PiixIde({ id: 'ide', bus: machine.chipset.bus, irqs: machine.ioapic }), xen: null };
  // The pc machine always has its IDE controller at 01.1.
  machine.addDevice(p.ide);
  const used = new Set<string>();
  const takePosition = (want?: [number, number]): [0 | 1, 0 | 1] => {
    const order: [number, number][] = want ? [want] : [[0, 0], [0, 1], [1, 0], [1, 1]];
    for (const [b, u] of order) {
      if (b > 1 || u > 1 || b < 0 || u < 0) throw new CliError(`IDE position bus ${b} unit ${u} does not exist (ide.0 and ide.1, units 0 and 1)`);
      if (!used.has(`${b}.${u}`)) {
        used.add(`${b}.${u}`);
        return [b as 0 | 1, u as 0 | 1];
      }
    }
    throw new CliError(want ? `IDE position bus ${want[0]} unit ${want[1]} is in use` : 'no free IDE position (four drives at most)');
  };
  const backendFor = (opt: string, name: string): BlockBackend => {
    const be = findBackend(name);
    if (be) return be;
    const node = findNode(name);
    if (!node) throw new CliError(`${opt}: Property 'drive': Cannot find device '${name}' nor node '${name}'`);
    const anon = createBackend({}, node);
    p.backends.push(anon);
    return anon;
  };

  for (const b of cfg.blockdevs) {
    const o = typed(b) as NodeOptions;
    if (typeof o['node-name'] !== 'string') throw new CliError("-blockdev: Parameter 'node-name' is missing");
    p.nodes.push(await openNode(o));
  }
  for (const [i, d] of cfg.drives.entries()) {
    for (const k of Object.keys(d)) if (!DRIVE_KEYS.has(k)) throw new CliError(`-drive: Invalid parameter '${k}'`);
    const iface = str(d['if']) ?? 'ide';
    if (iface !== 'ide' && iface !== 'none' && iface !== 'virtio') throw new CliError(`-drive if=${iface}: Spindle has no ${iface} controller (ide, virtio, none)`);
    const cd = d['media'] === 'cdrom';
    if (d['media'] !== undefined && d['media'] !== 'cdrom' && d['media'] !== 'disk') throw new CliError(`-drive: media must be disk or cdrom, not '${String(d['media'])}'`);
    for (const k of ['werror', 'rerror'] as const) {
      const v = str(d[k]);
      const ok = k === 'werror' ? ['report', 'ignore', 'enospc', 'stop'] : ['report', 'ignore', 'stop'];
      if (v !== undefined && !ok.includes(v)) throw new CliError(`-drive: ${k} must be ${ok.join(', ')}, not '${v}'`);
    }
    const file = str(d['file']);
    const name = str(d['id']) ?? (iface === 'ide' ? `ide${i}-${cd ? 'cd' : 'hd'}0` : `${iface}${i}`);
    let be: BlockBackend;
    if (file) {
      // As qemu-img's -f/-t/-i: a missing format is probed (with QEMU's warning for raw).
      const cache = str(d['cache']) ?? 'writeback';
      const readOnly = cd || d['readonly'] === 'on' || d['readonly'] === 'true';
      const o = imageOptions({ filename: file, fmt: str(d['format']), cache, readOnly, ...(str(d['aio']) ? { aio: str(d['aio'])! } : {}) });
      const discard = str(d['discard']);
      if (discard !== undefined) {
        if (discard !== 'unmap' && discard !== 'ignore' && discard !== 'on' && discard !== 'off') throw new CliError(`-drive: discard must be unmap or ignore, not '${discard}'`);
        o.discard = discard;
      }
      const node = await openNode(cfg.snapshot && !readOnly ? await snapshotOverlay(file, o, p) : o);
      const policy = (k: 'werror' | 'rerror'): { [x: string]: ErrorAction } => {
        const v = str(d[k]);
        return v === undefined ? {} : { [k]: v as ErrorAction };
      };
      // writethrough and directsync: the backend flushes after every write, as QEMU's do.
      be = createBackend({ name, writeCache: cache !== 'writethrough' && cache !== 'directsync', ...policy('werror'), ...policy('rerror') }, node);
      unref(node);
    } else if (cd) {
      be = createBackend({ name });
    } else {
      throw new CliError("-drive: Parameter 'file' is missing");
    }
    p.backends.push(be);
    if (iface === 'none') continue;
    if (iface === 'virtio') {
      if (cd) throw new CliError('-drive if=virtio: media=cdrom needs if=ide');
      machine.addDevice(new VirtioBlkPci({ id: `${name}-virtio`, drive: be, bus: machine.chipset.bus }));
      continue;
    }
    const index = d['index'] !== undefined ? Number(d['index']) : undefined;
    const want: [number, number] | undefined = index !== undefined ? [index >> 1, index & 1]
      : d['bus'] !== undefined || d['unit'] !== undefined ? [Number(d['bus'] ?? 0), Number(d['unit'] ?? 0)] : undefined;
    const [bus, unit] = takePosition(want);
    p.ide.attach(bus, unit, new IdeDrive({ id: name, kind: cd ? 'cd' : 'hd', drive: cd && !file ? null : be, ...(str(d['serial']) ? { serial: str(d['serial'])! } : {}) }));
  }
  for (const [i, dev] of cfg.devices.entries()) plugDevice(machine, dev, i, p, backendFor, takePosition);
  return p;
}

/**
 * -snapshot: the image becomes the backing file of a temporary qcow2 overlay that takes the
 * writes and goes at exit, as QEMU's snapshot=on.
 */
async function snapshotOverlay(file: string, o: NodeOptions, p: Plugged): Promise<NodeOptions> {
  if (typeof o.driver !== 'string' || file.startsWith('json:')) throw new CliError(`-snapshot: '${file}' must be a plain image file`);
  const dir = mkdtempSync(join(tmpdir(), 'spindle-snapshot-'));
  p.scratch.push(dir);
  const overlay = join(dir, 'overlay.qcow2');
  await imgCreateQcow2(overlay, undefined, { q: true, b: resolve(file), F: o.driver });
  return { driver: 'qcow2', file: { driver: 'file', filename: overlay } };
}

/** Xen's names for disks: xvda.. (major 202, 16 minors each), or a number. */
export function parseVdev(opt: string, v: string | undefined): number {
  if (v === undefined) throw new CliError(`${opt}: Property 'vdev' is required`);
  if (/^\d+$/.test(v)) return Number(v);
  const m = /^xvd([a-z])$/.exec(v);
  if (!m) throw new CliError(`${opt}: invalid vdev '${v}' (xvda..xvdz or a number)`);
  return (202 << 8) | ((m[1]!.charCodeAt(0) - 97) << 4);
}

/** A params key as a Xen toolstack writes it: [FORMAT:]PATH, with aio: meaning raw. */
async function openParams(params: string): Promise<BlockBackend> {
  const m = /^(aio|raw|qcow2):(.*)$/.exec(params);
  const format = !m || m[1] === 'aio' ? 'raw' : m[1]!;
  const node = await openNode({ driver: format, file: { driver: 'file', filename: m ? m[2]! : params } });
  const be = createBackend({}, node);
  unref(node);
  return be;
}

function plugDevice(
  machine: PcMachine, dev: KeyvalObject, i: number, p: Plugged, backendFor: (opt: string, name: string) => BlockBackend,
  takePosition: (want?: [number, number]) => [0 | 1, 0 | 1],
): void {
  const driver = str(dev['driver']) ?? '';
  const opt = `-device ${driver}`;
  const id = str(dev['id']) ?? `${driver}${i}`;
  if (driver === 'ide-hd' || driver === 'ide-cd') {
    for (const k of Object.keys(dev)) if (!['driver', 'id', 'drive', 'bus', 'unit', 'serial', 'model'].includes(k)) throw new CliError(`${opt}: Property '${driver}.${k}' not found`);
    const driveName = str(dev['drive']);
    if (!driveName && driver === 'ide-hd') throw new CliError(`${opt}: Drive property not set`);
    const bus = str(dev['bus']);
    const m = bus === undefined ? null : /^ide\.([01])$/.exec(bus);
    if (bus !== undefined && !m) throw new CliError(`${opt}: Bus '${bus}' not found (ide.0 or ide.1)`);
    const want: [number, number] | undefined = m ? [Number(m[1]), Number(dev['unit'] ?? -1)] : undefined;
    let pos: [0 | 1, 0 | 1];
    if (want && want[1] < 0) {
      try {
        pos = takePosition([want[0], 0]);
      } catch {
        pos = takePosition([want[0], 1]);
      }
    } else pos = takePosition(want);
    const be = driveName ? backendFor(opt, driveName) : null;
    p.ide.attach(pos[0], pos[1], new IdeDrive({
      id, kind: driver === 'ide-hd' ? 'hd' : 'cd', drive: be,
      ...(str(dev['serial']) ? { serial: str(dev['serial'])! } : {}), ...(str(dev['model']) ? { model: str(dev['model'])! } : {}),
    }));
    return;
  }
  if (driver === 'virtio-blk-pci') {
    const known = ['driver', 'id', 'drive', 'addr', 'serial', 'num-queues', 'queue-size', 'disable-legacy', 'vectors'];
    for (const k of Object.keys(dev)) if (!known.includes(k)) throw new CliError(`${opt}: Property '${driver}.${k}' not found`);
    const driveName = str(dev['drive']);
    if (!driveName) throw new CliError(`${opt}: drive property not set`);
    const addr = str(dev['addr']);
    const slot = addr === undefined ? undefined : Number.parseInt(addr.split('.')[0]!, 16); // QEMU's addr is hex: 04, 0x4, 4.0
    if (slot !== undefined && (!Number.isInteger(slot) || slot < 0 || slot > 31)) throw new CliError(`${opt}: Property 'addr' expects a PCI slot like 04 or 0x4, not '${addr}'`);
    const num = (k: string): number | undefined => (dev[k] === undefined ? undefined : Number(dev[k]));
    machine.addDevice(new VirtioBlkPci({
      id, drive: backendFor(opt, driveName), bus: machine.chipset.bus,
      ...(slot !== undefined ? { slot } : {}),
      ...(num('num-queues') !== undefined ? { numQueues: num('num-queues')! } : {}),
      ...(num('queue-size') !== undefined ? { queueSize: num('queue-size')! } : {}),
      ...(num('vectors') !== undefined ? { vectors: num('vectors')! } : {}),
      ...(str(dev['serial']) ? { serial: str(dev['serial'])! } : {}),
      ...(dev['disable-legacy'] !== undefined ? { disableLegacy: dev['disable-legacy'] === 'on' || dev['disable-legacy'] === 'true' } : {}),
    }));
    return;
  }
  if (driver === 'xen-disk') {
    for (const k of Object.keys(dev)) if (!['driver', 'id', 'drive', 'vdev'].includes(k)) throw new CliError(`${opt}: Property '${driver}.${k}' not found`);
    if (!p.xen) {
      p.xen = new XenBridge({ id: 'xenbus' });
      machine.addDevice(p.xen);
    }
    const driveName = str(dev['drive']);
    machine.addDevice(new XenDisk({
      id, bridge: p.xen, vdev: parseVdev(opt, str(dev['vdev'])),
      ...(driveName ? { drive: backendFor(opt, driveName) } : { openDrive: openParams }),
    }));
    return;
  }
  throw new CliError(`${opt}: Spindle has no such device model yet`);
}
