/**
 * External snapshots, as QEMU's QMP has them: a new overlay goes on top of the active node and
 * takes over its parents (the device's backend among them), drained, and the old top becomes
 * the overlay's backing file. `blockdev-snapshot-sync` creates the qcow2 overlay file itself
 * (mode absolute-paths) or opens an existing one; `blockdev-snapshot` uses a node added with
 * blockdev-add and `backing: null`.
 */
import { existsSync, writeFileSync } from 'node:fs';
import { findBackend } from '../../backend/backend.js';
import { createQcow2 } from '../../block/drivers/qcow2/create.js';
import { BlockError } from '../../block/error.js';
import { attachRoot, detachRoot, findNode, openNode, replaceNode, setBacking, unref } from '../../block/graph.js';
import type { BlockNode, BlockParent } from '../../block/node.js';
import { Perm } from '../../block/types.js';
import { QmpError } from '../errors.js';
import { defineCommand, type QmpMonitor } from '../qmp.js';

const CREATOR: BlockParent = { parentKind: 'job', describeUser: () => 'blockdev-snapshot-sync' };

const generic = (e: unknown): never => {
  if (e instanceof QmpError) throw e;
  throw new QmpError('GenericError', e instanceof Error ? e.message : String(e));
};

/** The active node a snapshot goes on: a backend's root, or a named node. */
function activeNode(device: string | undefined, nodeName: string | undefined): BlockNode {
  if (device !== undefined) {
    const be = findBackend(device);
    if (be?.node) return be.node;
    if (be) throw new QmpError('GenericError', `Device '${device}' has no medium`);
  }
  const n = nodeName !== undefined ? findNode(nodeName) : undefined;
  if (n) return n;
  throw new QmpError('GenericError', `Cannot find device='${device ?? ''}' nor node-name='${nodeName ?? ''}'`);
}

/** The file under a node's chain of `file` children, as the overlay's header names its backing file. */
function imageFilename(node: BlockNode): string | null {
  for (let n: BlockNode | undefined = node; n; n = n.file?.node) {
    const f = n.options['filename'];
    if (typeof f === 'string') return f;
  }
  return null;
}

/** Puts `overlay` on top of `top`: backing edge first, then every parent of `top` moves up. */
async function append(top: BlockNode, overlay: BlockNode): Promise<void> {
  if (overlay.backing) throw new QmpError('GenericError', `The overlay already has a backing image`);
  if (overlay.parents.length) throw new QmpError('GenericError', `The overlay is already in use`);
  if (!overlay.driver.supportsBacking) throw new QmpError('GenericError', `The overlay does not support backing images`);
  try {
    await setBacking(overlay, top);
    await replaceNode(top, overlay);
  } catch (e) {
    if (overlay.backing) await setBacking(overlay, null).catch(() => {});
    generic(e);
  }
}

async function createOverlayFile(path: string, top: BlockNode): Promise<void> {
  const backing = imageFilename(top);
  if (!backing) throw new QmpError('GenericError', `Cannot create a snapshot of node '${top.name}': it has no image file to name as the backing file`);
  writeFileSync(path, '');
  const file = await openNode({ driver: 'file', filename: path });
  try {
    const edge = attachRoot(CREATOR, file, 'root', { perm: Perm.CONSISTENT_READ | Perm.WRITE | Perm.RESIZE, shared: Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED });
    try {
      await createQcow2(edge, { size: top.driver.getLength(top), backingFile: backing, backingFormat: top.driver.format });
    } finally {
      detachRoot(edge);
    }
  } finally {
    unref(file);
  }
}

export function registerSnapshotCommands(monitor: QmpMonitor): void {
  monitor.register(defineCommand({
    name: 'blockdev-snapshot-sync',
    doc: 'Creates (or opens) a qcow2 overlay file and puts it on top of the active node',
    args: {
      device: { type: 'str', optional: true },
      'node-name': { type: 'str', optional: true },
      'snapshot-file': { type: 'str' },
      'snapshot-node-name': { type: 'str', optional: true },
      format: { type: 'str', optional: true },
      mode: { type: { enum: ['existing', 'absolute-paths'] }, optional: true },
    },
    run: async (a) => {
      const top = activeNode(a.device, a['node-name']);
      const format = a.format ?? 'qcow2';
      const mode = a.mode ?? 'absolute-paths';
      if (format !== 'qcow2' && mode !== 'existing') throw new QmpError('GenericError', `Spindle creates qcow2 overlays only, not '${format}' (use mode=existing)`);
      if (mode === 'existing' && !existsSync(a['snapshot-file'])) throw new QmpError('GenericError', `Could not open '${a['snapshot-file']}': No such file or directory`);
      if (a['snapshot-node-name'] !== undefined && findNode(a['snapshot-node-name'])) {
        throw new QmpError('GenericError', `Node name '${a['snapshot-node-name']}' is already in use`);
      }
      try {
        if (mode === 'absolute-paths') await createOverlayFile(a['snapshot-file'], top);
        const overlay = await openNode({
          driver: format,
          ...(a['snapshot-node-name'] !== undefined ? { 'node-name': a['snapshot-node-name'] } : {}),
          file: { driver: 'file', filename: a['snapshot-file'] },
          backing: null,
        });
        try {
          await append(top, overlay);
        } finally {
          unref(overlay); // its parents (the backend) hold it now
        }
      } catch (e) {
        generic(e);
      }
      return {};
    },
  }));
  monitor.register(defineCommand({
    name: 'blockdev-snapshot',
    doc: 'Puts an existing node (added with backing: null) on top of the active node',
    args: { node: { type: 'str' }, overlay: { type: 'str' } },
    run: async (a) => {
      const top = findNode(a.node);
      if (!top) throw new QmpError('GenericError', `Cannot find device='' nor node-name='${a.node}'`);
      const overlay = findNode(a.overlay);
      if (!overlay) throw new QmpError('GenericError', `Cannot find device='' nor node-name='${a.overlay}'`);
      if (top === overlay) throw new QmpError('GenericError', 'The overlay cannot be the node itself');
      try {
        await append(top, overlay);
      } catch (e) {
        if (e instanceof BlockError || !(e instanceof QmpError)) generic(e);
        throw e;
      }
      return {};
    },
  }));
}
