/**
 * The block devices of `spindle system`: backends from -drive, -blockdev and HMP drive_add,
 * and the device models (-drive if=ide|virtio, -device / device_add ide-hd, ide-cd,
 * virtio-blk-pci, xen-disk) plugged into the pc machine, with QEMU's names, defaults and
 * messages (if=ide; index N is bus N/2, unit N%2; ide-cd may be empty).
 *
 * Who holds what (QEMU's blockdev_auto_del): a backend made by -drive or drive_add, or the
 * anonymous backend made for a device whose drive= names a node, is held by the machine
 * (`owned`) until drive_del drops that reference, or its device goes (the reference goes
 * with it), or the machine ends. Nodes made by -blockdev are not backends and survive their
 * devices. The devices keep the backend objects they were given, never names, so a later
 * backend that reuses a name is never the one let go of.
 */
import type { PcMachine } from '../../../hw/pc/pc.js';
import { IdeDrive, PiixIde } from '../../../hw/ide/piix.js';
import { VirtioBlkPci } from '../../../hw/block/virtio-blk.js';
import { XenBridge } from '../../../hw/xen/xen-bridge.js';
import { XenDisk } from '../../../hw/xen/xen-disk.js';
import { createBackend, findBackend, type BlockBackend } from '../../backend/backend.js';
import { findNode, openNode, unref } from '../../block/graph.js';
import type { NodeOptions } from '../../block/types.js';
import type { ErrorAction } from '../../backend/device-ops.js';
import { imageOptions } from '../img/open.js';
import { snapshotOverlay } from './snapshot-overlay.js';
import { openParams, parseVdev } from './xen-params.js';
import { CliError } from '../fail.js';
import { adoptMonitorNode } from '../../monitor/commands/block.js';
import type { SystemConfig } from './args.js';
import { typedKeyval, type KeyvalObject } from './keyval.js';

/** A device's property values: strings from -device, JSON values from device_add. */
export type DeviceProps = Record<string, unknown>;

/** A refused device or drive, with QEMU's message (no option prefix). */
export class DeviceError extends Error {
  override name = 'DeviceError';
}

/** A device the user made (-device, device_add), by its id. */
export interface Peripheral {
  readonly id: string;
  readonly driver: string;
  /** The backends it was given (objects, not names). */
  readonly backends: BlockBackend[];
  /** Its IDE position, for IDE devices (which cannot be unplugged on a pc). */
  readonly ide?: [0 | 1, 0 | 1];
  /** Whether device_del asked for it and the guest has not let it go yet. */
  unplugging: boolean;
}

/** What the machine holds and must let go of at exit. */
export interface Plugged {
  /** Backends whose creating reference the machine holds (see the banner). */
  owned: Set<BlockBackend>;
  /** Scratch directories (-snapshot's overlays), removed at exit. */
  scratch: string[];
  ide: PiixIde;
  /** The xenbus stand-in, made with the first xen-disk. */
  xen: XenBridge | null;
  /** User-made devices by id. */
  peripherals: Map<string, Peripheral>;
  /** IDE positions taken ('bus.unit'). */
  ideUsed: Set<string>;
  /** Drives made so far (numbers unnamed ones, as -drive's index in the command line). */
  drives: number;
  /** Anonymous devices made so far. */
  anon: number;
  /** -snapshot: new drives get temporary overlays. */
  snapshot: boolean;
}

const DRIVE_KEYS = new Set(['file', 'if', 'format', 'id', 'readonly', 'cache', 'media', 'index', 'bus', 'unit', 'serial', 'werror', 'rerror', 'discard', 'aio']);
/** QEMU's BlockInterfaceType numbers, for drive_add's "Can't hot-add drive to type N". */
const IF_TYPE: Record<string, number> = { none: 0, ide: 1, virtio: 8 };

function str(v: unknown): string | undefined {
  return typeof v === 'string' ? v : undefined;
}

function fail(msg: string): never {
  throw new DeviceError(msg);
}

export async function plugDevices(machine: PcMachine, cfg: SystemConfig): Promise<Plugged> {
  const p: Plugged = {
    owned: new Set(), scratch: [], ide: new PiixIde({ id: 'ide', bus: machine.chipset.bus, irqs: machine.ioapic }), xen: null,
    peripherals: new Map(), ideUsed: new Set(), drives: 0, anon: 0, snapshot: cfg.snapshot,
  };
  // The pc machine always has its IDE controller at 01.1.
  machine.addDevice(p.ide);
  for (const b of cfg.blockdevs) {
    const o = typedKeyval(b) as NodeOptions;
    if (typeof o['node-name'] !== 'string') throw new CliError("-blockdev: Parameter 'node-name' is missing");
    // As blockdev-add's: the monitor owns it, so blockdev-del may close it.
    adoptMonitorNode(await openNode(o));
  }
  for (const d of cfg.drives) await addDrive(machine, p, d, false);
  for (const dev of cfg.devices) {
    try {
      plugDevice(machine, p, dev, false);
    } catch (e) {
      if (e instanceof DeviceError) throw new CliError(`-device ${str(dev['driver']) ?? ''}: ${e.message}`);
      throw e;
    }
  }
  return p;
}

/** Takes an IDE position: the one wanted, or the first free. */
function takePosition(p: Plugged, want?: [number, number]): [0 | 1, 0 | 1] {
  const order: [number, number][] = want ? [want] : [[0, 0], [0, 1], [1, 0], [1, 1]];
  for (const [b, u] of order) {
    if (b > 1 || u > 1 || b < 0 || u < 0) fail(`IDE position bus ${b} unit ${u} does not exist (ide.0 and ide.1, units 0 and 1)`);
    if (!p.ideUsed.has(`${b}.${u}`)) {
      p.ideUsed.add(`${b}.${u}`);
      return [b as 0 | 1, u as 0 | 1];
    }
  }
  return fail(want ? `IDE position bus ${want[0]} unit ${want[1]} is in use` : 'no free IDE position (four drives at most)');
}

/**
 * -drive, and HMP drive_add (`hot`): opens the image and makes a named backend the machine
 * holds; at startup if=ide and if=virtio also plug their device, while drive_add takes only
 * if=none (QEMU's "Can't hot-add drive to type N"). Throws CliError at startup, DeviceError
 * for drive_add.
 */
export async function addDrive(machine: PcMachine, p: Plugged, d: KeyvalObject, hot: boolean): Promise<BlockBackend> {
  const i = p.drives++;
  const bad: (msg: string) => never = (msg) => {
    throw hot ? new DeviceError(msg) : new CliError(`-drive: ${msg}`);
  };
  for (const k of Object.keys(d)) if (!DRIVE_KEYS.has(k)) bad(`Invalid parameter '${k}'`);
  const iface = str(d['if']) ?? 'ide';
  if (iface !== 'ide' && iface !== 'none' && iface !== 'virtio') bad(`if=${iface}: Spindle has no ${iface} controller (ide, virtio, none)`);
  const cd = d['media'] === 'cdrom';
  if (d['media'] !== undefined && d['media'] !== 'cdrom' && d['media'] !== 'disk') bad(`media must be disk or cdrom, not '${String(d['media'])}'`);
  for (const k of ['werror', 'rerror'] as const) {
    const v = str(d[k]);
    const ok = k === 'werror' ? ['report', 'ignore', 'enospc', 'stop'] : ['report', 'ignore', 'stop'];
    if (v !== undefined && !ok.includes(v)) bad(`${k} must be ${ok.join(', ')}, not '${v}'`);
  }
  const file = str(d['file']);
  const name = str(d['id']) ?? (iface === 'ide' ? `ide${i}-${cd ? 'cd' : 'hd'}0` : `${iface}${i}`);
  if (hot && findBackend(name)) bad(`Device with id '${name}' already exists`);
  let be: BlockBackend;
  if (file) {
    // As qemu-img's -f/-t/-i: a missing format is probed (with QEMU's warning for raw).
    const cache = str(d['cache']) ?? 'writeback';
    const readOnly = cd || d['readonly'] === 'on' || d['readonly'] === 'true';
    const o = imageOptions({ filename: file, fmt: str(d['format']), cache, readOnly, ...(str(d['aio']) ? { aio: str(d['aio'])! } : {}) });
    const discard = str(d['discard']);
    if (discard !== undefined) {
      if (discard !== 'unmap' && discard !== 'ignore' && discard !== 'on' && discard !== 'off') bad(`discard must be unmap or ignore, not '${discard}'`);
      o.discard = discard;
    }
    const node = await openNode(p.snapshot && !readOnly ? await snapshotOverlay(file, o, p) : o);
    const policy = (k: 'werror' | 'rerror'): { [x: string]: ErrorAction } => {
      const v = str(d[k]);
      return v === undefined ? {} : { [k]: v as ErrorAction };
    };
    // writethrough and directsync: the backend flushes after every write, as QEMU's do.
    try {
      be = createBackend({ name, writeCache: cache !== 'writethrough' && cache !== 'directsync', ...policy('werror'), ...policy('rerror') }, node);
    } finally {
      unref(node);
    }
  } else if (cd || iface === 'none') {
    // An empty drive (QEMU allows if=none without a medium, as for a CD-ROM).
    be = createBackend({ name });
  } else {
    return bad("Parameter 'file' is missing");
  }
  p.owned.add(be);
  if (iface === 'none') return be;
  if (hot) {
    release(p, be);
    return bad(`Can't hot-add drive to type ${IF_TYPE[iface]}`);
  }
  if (iface === 'virtio') {
    if (cd) bad('if=virtio: media=cdrom needs if=ide');
    machine.addDevice(new VirtioBlkPci({ id: `${name}-virtio`, drive: be, bus: machine.chipset.bus }));
    return be;
  }
  const index = d['index'] !== undefined ? Number(d['index']) : undefined;
  const want: [number, number] | undefined = index !== undefined ? [index >> 1, index & 1]
    : d['bus'] !== undefined || d['unit'] !== undefined ? [Number(d['bus'] ?? 0), Number(d['unit'] ?? 0)] : undefined;
  let bus: 0 | 1;
  let unit: 0 | 1;
  try {
    [bus, unit] = takePosition(p, want);
  } catch (e) {
    throw e instanceof DeviceError ? new CliError(e.message) : e;
  }
  p.ide.attach(bus, unit, new IdeDrive({ id: name, kind: cd ? 'cd' : 'hd', drive: cd && !file ? null : be, ...(str(d['serial']) ? { serial: str(d['serial'])! } : {}) }));
  return be;
}

/** Drops the machine's reference to `be`, if it holds one (QEMU's blockdev_auto_del). */
export function release(p: Plugged, be: BlockBackend): void {
  if (!p.owned.delete(be)) return;
  if (!be.dead) be.unref();
}

const PROPS: Record<string, readonly string[]> = {
  'ide-hd': ['drive', 'bus', 'unit', 'serial', 'model', 'werror', 'rerror'],
  'ide-cd': ['drive', 'bus', 'unit', 'serial', 'model', 'rerror'],
  'virtio-blk-pci': ['drive', 'addr', 'serial', 'num-queues', 'queue-size', 'disable-legacy', 'vectors', 'werror', 'rerror'],
  'xen-disk': ['drive', 'vdev'],
};

/** The QOM type that owns a device's drive property (virtio-blk-pci aliases its child's). */
const DRIVE_OWNER: Record<string, string> = { 'virtio-blk-pci': 'virtio-blk-device' };

/** A property as a string (-device gives strings; device_add may give numbers or booleans). */
function text(dev: DeviceProps, k: string): string | undefined {
  const v = dev[k];
  if (v === undefined) return undefined;
  if (typeof v === 'string') return v;
  if (typeof v === 'number' || typeof v === 'boolean') return String(v);
  return fail(`Parameter '${k}' expects a scalar value`);
}

function integer(driver: string, dev: DeviceProps, k: string): number | undefined {
  const v = text(dev, k);
  if (v === undefined) return undefined;
  const n = /^(0x[0-9a-f]+|\d+)$/i.test(v) ? Number(v) : NaN;
  if (!Number.isSafeInteger(n)) fail(`Parameter '${driver}.${k}' expects an integer, not '${v}'`);
  return n;
}

function onOff(driver: string, dev: DeviceProps, k: string): boolean | undefined {
  const v = text(dev, k);
  if (v === undefined) return undefined;
  if (v === 'on' || v === 'true') return true;
  if (v === 'off' || v === 'false') return false;
  return fail(`Parameter '${driver}.${k}' expects 'on' or 'off'`);
}

/**
 * -device and device_add: makes the device, with QEMU's checks in QEMU's order (the model,
 * then the bus and whether it can take a device now, the id, the properties), and plugs it;
 * `hot` (device_add) hot-plugs PCI devices through ACPI and refuses IDE, whose bus on a pc
 * cannot hotplug. Throws DeviceError with QEMU's message. Returns the device's id.
 */
export function plugDevice(machine: PcMachine, p: Plugged, dev: DeviceProps, hot: boolean): string {
  const driver = text(dev, 'driver') ?? fail("Parameter 'driver' is missing");
  const known = PROPS[driver];
  if (!known) return fail(hot ? `'${driver}' is not a valid device model name` : 'Spindle has no such device model yet');
  const ide = driver === 'ide-hd' || driver === 'ide-cd';
  let ideBus: 0 | 1 | undefined;
  if (ide) {
    const bus = text(dev, 'bus');
    const m = bus === undefined ? null : /^ide\.([01])$/.exec(bus);
    if (bus !== undefined && !m) fail(`Bus '${bus}' not found (ide.0 or ide.1)`);
    ideBus = m ? (Number(m[1]) as 0 | 1) : p.ideUsed.has('0.0') && p.ideUsed.has('0.1') ? 1 : 0;
    // Hot-plugged IDE drives are a Spindle extension (QEMU refuses): the guest finds them when
    // it next probes the position.
  }
  const given = text(dev, 'id');
  if (given !== undefined) {
    if (!/^[A-Za-z][A-Za-z0-9._-]*$/.test(given)) fail("Parameter 'id' expects an identifier");
    if (p.peripherals.has(given) || machine.device(given)) fail(`Duplicate device ID '${given}'`);
  }
  for (const k of Object.keys(dev)) if (k !== 'driver' && k !== 'id' && !known.includes(k)) fail(`Property '${driver}.${k}' not found`);
  const id = given ?? `${driver}.anon${p.anon++}`;
  const driveName = text(dev, 'drive');
  // The drive: a backend by name, or a node, under an anonymous backend made for the device.
  const made: BlockBackend[] = [];
  // The device's error policy (BlockConf's werror/rerror), set on its backend as QEMU does.
  const policy = (['werror', 'rerror'] as const).map((k) => {
    const v = text(dev, k);
    const ok = k === 'werror' ? ['auto', 'report', 'ignore', 'enospc', 'stop'] : ['auto', 'report', 'ignore', 'stop'];
    if (v !== undefined && !ok.includes(v)) fail(`Parameter '${k}' does not accept value '${v}'`);
    return v === 'auto' ? undefined : (v as ErrorAction | undefined);
  });
  const backend = (): BlockBackend | null => {
    if (driveName === undefined) return null;
    let be = findBackend(driveName);
    if (be) {
      if (be.device) fail(`Drive '${driveName}' is already in use by another device`);
    } else {
      const node = findNode(driveName);
      if (!node) return fail(`Property '${DRIVE_OWNER[driver] ?? driver}.drive' can't find value '${driveName}'`);
      be = createBackend({}, node);
      made.push(be);
    }
    if (policy[0] !== undefined || policy[1] !== undefined) be.setErrorPolicy(policy[1] ?? be.rerror, policy[0] ?? be.werror);
    return be;
  };
  const record = (backends: BlockBackend[], pos?: [0 | 1, 0 | 1]): string => {
    for (const be of made) p.owned.add(be);
    if (given !== undefined) p.peripherals.set(id, { id, driver, backends, unplugging: false, ...(pos ? { ide: pos } : {}) });
    return id;
  };
  try {
    if (ide) {
      if (!driveName && driver === 'ide-hd') fail('No drive specified');
      const want: [number, number] | undefined = text(dev, 'bus') !== undefined ? [ideBus!, integer(driver, dev, 'unit') ?? -1] : undefined;
      let pos: [0 | 1, 0 | 1];
      if (want && want[1] < 0) {
        try {
          pos = takePosition(p, [want[0], 0]);
        } catch {
          pos = takePosition(p, [want[0], 1]);
        }
      } else pos = takePosition(p, want);
      let be: BlockBackend | null;
      try {
        be = backend();
        p.ide.attach(pos[0], pos[1], new IdeDrive({
          id, kind: driver === 'ide-hd' ? 'hd' : 'cd', drive: be,
          ...(text(dev, 'serial') ? { serial: text(dev, 'serial')! } : {}), ...(text(dev, 'model') ? { model: text(dev, 'model')! } : {}),
        }));
      } catch (e) {
        p.ideUsed.delete(`${pos[0]}.${pos[1]}`);
        throw e;
      }
      return record(be ? [be] : [], pos);
    }
    if (driver === 'virtio-blk-pci') {
      if (driveName === undefined) fail('drive property not set');
      const addr = dev['addr'];
      let slot: number | undefined;
      if (typeof addr === 'number') slot = addr >> 3; // an integer addr is a devfn, as QEMU's
      else if (addr !== undefined) {
        const a = text(dev, 'addr')!;
        slot = /^(0x)?[0-9a-f]{1,2}(\.[0-7])?$/i.test(a) ? Number.parseInt(a.split('.')[0]!, 16) : NaN; // QEMU's addr is hex: 04, 0x4, 4.0
        if (!Number.isInteger(slot) || slot < 0 || slot > 31) fail(`Property 'addr' expects a PCI slot like 04 or 0x4, not '${a}'`);
      }
      if (slot !== undefined && machine.chipset.bus.occupiedSlots().has(slot)) fail(`PCI: slot ${slot} function 0 not available for ${driver}, in use by another device`);
      const numQueues = integer(driver, dev, 'num-queues');
      const queueSize = integer(driver, dev, 'queue-size');
      const vectors = integer(driver, dev, 'vectors');
      const disableLegacy = onOff(driver, dev, 'disable-legacy');
      const be = backend()!;
      const d = new VirtioBlkPci({
        id, drive: be, bus: machine.chipset.bus,
        ...(slot !== undefined ? { slot } : {}),
        ...(numQueues !== undefined ? { numQueues } : {}),
        ...(queueSize !== undefined ? { queueSize } : {}),
        ...(vectors !== undefined ? { vectors } : {}),
        ...(text(dev, 'serial') ? { serial: text(dev, 'serial')! } : {}),
        ...(disableLegacy !== undefined ? { disableLegacy } : {}),
      });
      if (hot) machine.hotplugDevice(d);
      else machine.addDevice(d);
      return record([be]);
    }
    // xen-disk
    let vdev: number;
    try {
      vdev = parseVdev('', text(dev, 'vdev'));
    } catch (e) {
      return fail((e as Error).message.replace(/^: /, ''));
    }
    if (!p.xen) {
      p.xen = new XenBridge({ id: 'xenbus' });
      machine.addDevice(p.xen);
    }
    const be = backend();
    machine.addDevice(new XenDisk({ id, bridge: p.xen, vdev, ...(be ? { drive: be } : { openDrive: openParams }) }));
    return record(be ? [be] : []);
  } catch (e) {
    // Nothing is left behind: backends made for the device go with it.
    for (const be of made) if (!be.dead) be.unref();
    if (e instanceof DeviceError || e instanceof CliError) throw e;
    throw new DeviceError(e instanceof Error ? e.message : String(e));
  }
}

/**
 * Ends a device's life after it left the machine: its entry goes, and the machine lets go of
 * the backends it held for it (QEMU's blockdev_auto_del): a -drive or drive_add backend, or
 * the anonymous one made for a node. A backend drive_del already let go of is not touched.
 */
export function deviceGone(p: Plugged, id: string): Peripheral | undefined {
  const per = p.peripherals.get(id);
  if (!per) return undefined;
  p.peripherals.delete(id);
  for (const be of per.backends) release(p, be);
  return per;
}
