/**
 * QMP's removable-media commands, as QEMU words them: `eject` (open the tray, then take the
 * medium out), `blockdev-open-tray`, `blockdev-close-tray`, `blockdev-remove-medium`,
 * `blockdev-insert-medium` and `blockdev-change-medium` (all of it in one). A
 * tray the guest locked is not opened without `force`: the guest is asked to eject (the
 * request reaches it as a media event) and the command fails with QEMU's message.
 * DEVICE_TRAY_MOVED goes to every client when a tray moves.
 */
import { liveBackends, findBackend, type BlockBackend } from '../../backend/backend.js';
import { BlockError } from '../../block/error.js';
import { findNode, openNode, unref } from '../../block/graph.js';
import type { BlockNode } from '../../block/node.js';
import { imageOptions } from '../../cli/img/open.js';
import { defineCommand, QmpError, type QmpMonitor } from '../qmp.js';

interface MediaArgs {
  device?: string;
  id?: string;
  force?: boolean;
}

/** `device` (a block device name, deprecated in QEMU) or `id` (the device's id). */
const TARGET = {
  device: { type: 'str', optional: true, doc: 'the block device name' },
  id: { type: 'str', optional: true, doc: "the device's id" },
} as const;

/** The backend named by `device` (a block device name) or `id` (the device's id), as QEMU finds it. */
function lookup(a: MediaArgs): BlockBackend {
  if ((a.device === undefined) === (a.id === undefined)) throw new QmpError('GenericError', "Need exactly one of 'device' and 'id'");
  const be = a.device !== undefined ? findBackend(a.device) : liveBackends().find((b) => b.device?.id === a.id);
  if (!be) throw new QmpError('DeviceNotFound', a.device !== undefined ? `Device '${a.device}' not found` : `Device '${a.id}' not found`);
  return be;
}

const label = (a: MediaArgs): string => a.device ?? a.id ?? '';

function trayMoved(monitor: QmpMonitor, be: BlockBackend, open: boolean): void {
  monitor.emit('DEVICE_TRAY_MOVED', { device: be.name, id: be.device?.id ?? '', 'tray-open': open });
}

/** blockdev-open-tray; true if the tray is open afterwards. */
function openTray(monitor: QmpMonitor, a: MediaArgs): BlockBackend {
  const be = lookup(a);
  const ops = be.ops;
  if (!ops?.changeMedia) throw new QmpError('GenericError', `Device '${label(a)}' is not removable`);
  if (!ops.isTrayOpen) throw new QmpError('GenericError', `Device '${label(a)}' does not have a tray`);
  if (ops.isTrayOpen()) return be;
  const locked = ops.isMediumLocked?.() ?? false;
  if (locked) ops.ejectRequest?.(a.force ?? false);
  if (!locked || a.force) {
    ops.changeMedia(false);
    trayMoved(monitor, be, true);
    return be;
  }
  throw new QmpError('GenericError', `Device '${label(a)}' is locked and force was not specified, wait for tray to open and try again`);
}

function closeTray(monitor: QmpMonitor, a: MediaArgs, be: BlockBackend): void {
  const ops = be.ops;
  if (!ops?.changeMedia) throw new QmpError('GenericError', `Device '${label(a)}' is not removable`);
  if (!ops.isTrayOpen) throw new QmpError('GenericError', `Device '${label(a)}' does not have a tray`);
  if (!ops.isTrayOpen()) return;
  ops.changeMedia(true);
  trayMoved(monitor, be, false);
}

/** Into an open, empty tray; the backend keeps its settings (error policy, throttling). */
function insertMedium(a: MediaArgs, be: BlockBackend, node: BlockNode): void {
  if (!be.ops?.isTrayOpen?.()) throw new QmpError('GenericError', `Tray of device '${label(a)}' is not open`);
  if (be.node) throw new QmpError('GenericError', `There already is a medium in device '${label(a)}'`);
  if (node.parents.some((e) => e.parent.parentKind === 'backend')) throw new QmpError('GenericError', `Node '${node.name}' is already in use`);
  try {
    // The tray stays open: closing it loads the medium (close-tray), as in QEMU.
    be.insertNode(node, false);
  } catch (e) {
    throw new QmpError('GenericError', e instanceof BlockError ? e.message : String(e));
  }
}

async function removeMedium(a: MediaArgs, be: BlockBackend): Promise<void> {
  if (!be.ops?.isTrayOpen?.()) throw new QmpError('GenericError', `Tray of device '${label(a)}' is not open`);
  await be.removeNode();
}

export function registerMediaCommands(monitor: QmpMonitor): void {
  monitor.register(defineCommand({
    name: 'eject',
    doc: 'Opens the tray (asking the guest first if it locked it) and removes the medium',
    args: { ...TARGET, force: { type: 'bool', optional: true, doc: 'open a locked tray anyway' } },
    run: async (a) => {
      const be = openTray(monitor, a);
      await removeMedium(a, be);
      return {};
    },
  }));
  monitor.register(defineCommand({
    name: 'blockdev-open-tray',
    doc: "Opens a removable-media device's tray",
    args: { ...TARGET, force: { type: 'bool', optional: true, doc: 'open a locked tray anyway' } },
    run: (a) => {
      openTray(monitor, a);
      return {};
    },
  }));
  monitor.register(defineCommand({
    name: 'blockdev-remove-medium',
    doc: 'Takes the medium out of an open tray',
    args: { id: { type: 'str', doc: "the device's id" } },
    run: async (a) => {
      await removeMedium(a, lookup(a));
      return {};
    },
  }));
  monitor.register(defineCommand({
    name: 'blockdev-insert-medium',
    doc: "Puts a node into an open, empty tray",
    args: { id: { type: 'str', doc: "the device's id" }, 'node-name': { type: 'str' } },
    run: (a) => {
      const be = lookup(a);
      const node = findNode(a['node-name']);
      if (!node) throw new QmpError('GenericError', `Node '${a['node-name']}' not found`);
      insertMedium(a, be, node);
      return {};
    },
  }));
  monitor.register(defineCommand({
    name: 'blockdev-change-medium',
    doc: 'Opens an image and puts it in the tray in place of the medium there (tray opened and closed)',
    args: {
      ...TARGET,
      filename: { type: 'str' },
      format: { type: 'str', optional: true },
      force: { type: 'bool', optional: true },
      'read-only-mode': { type: { enum: ['retain', 'read-only', 'read-write'] }, optional: true },
    },
    run: async (a) => {
      const be = lookup(a);
      const mode = a['read-only-mode'] ?? 'retain';
      const readOnly = mode === 'read-only' || (mode === 'retain' && (be.node?.readOnly ?? false));
      let node: BlockNode;
      try {
        node = await openNode(imageOptions({ filename: a.filename, fmt: a.format, readOnly }, false));
      } catch (e) {
        throw new QmpError('GenericError', e instanceof Error ? e.message : String(e));
      }
      try {
        const wasOpen = be.ops?.isTrayOpen?.() ?? false;
        openTray(monitor, a);
        await removeMedium(a, be);
        insertMedium(a, be, node);
        if (!wasOpen) closeTray(monitor, a, be);
      } finally {
        unref(node); // the backend holds it now, or it goes
      }
      return {};
    },
  }));
  monitor.register(defineCommand({
    name: 'blockdev-close-tray',
    doc: "Closes a removable-media device's tray",
    args: TARGET,
    run: (a) => {
      closeTray(monitor, a, lookup(a));
      return {};
    },
  }));
}
