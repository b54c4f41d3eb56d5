/**
 * QMP's block-graph commands, as QEMU names and words them:
 *
 *   query-block              one BlockInfo per backend (its medium as BlockDeviceInfo)
 *   query-named-block-nodes  every node as BlockDeviceInfo (flat: no nested backing-image)
 *   blockdev-add             opens a node tree from BlockdevOptions; the monitor owns the top
 *   blockdev-del             drops the monitor's reference to a node nobody else uses
 *   block_resize             resizes a backend's medium or a node; the device hears of it
 *
 * The monitor's references live in one set (QEMU's monitor_bdrv_states): blockdev-add puts a
 * node in, blockdev-del takes it out, and nothing else deletes a node (contract 2).
 *
 * Context: main loop.
 */
import { findBackend, type BlockBackend } from '../../backend/backend.js';
import { BlockError } from '../../block/error.js';
import { allNodes, attachRoot, detachRoot, findNode, openNode, settleCloses, unref } from '../../block/graph.js';
import * as io from '../../block/io.js';
import type { BlockNode, BlockParent } from '../../block/node.js';
import { ChildRole, Perm, type NodeOptions } from '../../block/types.js';
import { QmpError } from '../errors.js';
import type { QmpMonitor } from '../qmp.js';
import { defineCommand } from '../schema.js';
import { blockDeviceInfo, blockInfo, listedBackends } from './block-info.js';
import { checkBlockdevOptions } from './blockdev-options.js';

/** Nodes the monitor holds a reference to (blockdev-add, -blockdev). */
const monitorNodes = new Set<BlockNode>();

/**
 * Hands a node's reference to the monitor, as blockdev-add does (for -blockdev on a command
 * line): blockdev-del may then delete it. Context: main loop.
 */
export function adoptMonitorNode(node: BlockNode): void {
  monitorNodes.add(node);
}

/** Drops every reference the monitor holds (at exit). Context: main loop. */
export function releaseMonitorNodes(): void {
  for (const n of monitorNodes) if (!n.deleted) unref(n);
  monitorNodes.clear();
}

/** Block-layer errors reach the client as GenericError with the layer's message. */
async function blockOp<T>(fn: () => T | Promise<T>): Promise<T> {
  try {
    return await fn();
  } catch (e) {
    if (e instanceof BlockError) throw new QmpError('GenericError', e.message);
    throw e;
  }
}

/** The backends among a node's parents. */
function backendParents(node: BlockNode): BlockBackend[] {
  return node.parents.filter((e) => e.parent.parentKind === 'backend').map((e) => e.parent as BlockBackend);
}

/** QEMU's op blockers: a backing file is busy for its overlay, a job's node for the job. */
function busyReason(node: BlockNode): string | undefined {
  for (const e of node.parents) {
    if (e.parent.parentKind === 'node' && e.role & ChildRole.COW) return `node is used as backing hd of '${(e.parent as BlockNode).name}'`;
    if (e.parent.parentKind === 'job') return `block device is in use by ${e.parent.describeUser()}`;
  }
  return undefined;
}

async function blockdevDel(name: string): Promise<void> {
  const node = findNode(name);
  if (!node) throw new QmpError('GenericError', `Failed to find node with node-name='${name}'`);
  if (node.parents.some((e) => e.parent.parentKind === 'backend' || e.parent.parentKind === 'export')) {
    throw new QmpError('GenericError', `Node ${name} is in use`);
  }
  const busy = busyReason(node);
  if (busy) throw new QmpError('GenericError', `Node '${name}' is busy: ${busy}`);
  if (!monitorNodes.has(node)) throw new QmpError('GenericError', `Node ${name} is not owned by the monitor`);
  if (node.refcnt > 1) throw new QmpError('GenericError', `Block device ${name} is in use`);
  monitorNodes.delete(node);
  unref(node);
  // QEMU closes the image before answering: its file (and lock) is free when we return.
  await settleCloses();
}

/** block_resize's temporary user of a node nobody attached a backend to. */
const RESIZER: BlockParent = { parentKind: 'job', describeUser: () => 'block_resize' };

interface ResizeArgs {
  device?: string;
  'node-name'?: string;
  size: number;
}

/** QEMU's bdrv_lookup_bs: a backend's medium by `device`, else a node by `node-name`. */
function lookupNode(a: ResizeArgs): { node: BlockNode; be: BlockBackend | undefined } {
  if (a.device !== undefined) {
    const be = findBackend(a.device);
    if (be) {
      if (!be.node) throw new QmpError('GenericError', `Device '${a.device}' has no medium`);
      return { node: be.node, be };
    }
  }
  if (a['node-name'] !== undefined) {
    const node = findNode(a['node-name']);
    if (node) return { node, be: undefined };
  }
  throw new QmpError('GenericError', `Cannot find device='${a.device ?? ''}' nor node-name='${a['node-name'] ?? ''}'`);
}

async function blockResize(a: ResizeArgs): Promise<void> {
  const { node, be: named } = lookupNode(a);
  if (a.size < 0) throw new QmpError('GenericError', "Parameter 'size' expects a >0 size");
  if (busyReason(node)) throw new QmpError('GenericError', `Device '${a.device ?? a['node-name'] ?? ''}' is in use`);
  if (node.readOnly) throw new QmpError('GenericError', 'Image is read-only');
  // Through the backend that holds the node, so its own edge takes the resize permission
  // and its device hears of the new size (DeviceOps.resize); else as a passing user.
  const be = named ?? backendParents(node)[0];
  if (be) return blockOp(() => be.truncate(a.size));
  await blockOp(async () => {
    const edge = attachRoot(RESIZER, node, 'root', { perm: Perm.RESIZE, shared: Perm.ALL });
    try {
      await io.truncate(edge, a.size);
    } finally {
      detachRoot(edge);
    }
  });
}

export function registerBlockCommands(monitor: QmpMonitor): void {
  monitor.register(defineCommand({
    name: 'query-block',
    doc: 'Every block device (backend): its device, tray and medium',
    args: {},
    run: () => listedBackends().map(blockInfo),
  }));
  monitor.register(defineCommand({
    name: 'query-named-block-nodes',
    doc: 'Every node of the block graph, as BlockDeviceInfo',
    args: { flat: { type: 'bool', optional: true, doc: 'leave out the backing chain below each image' } },
    run: (a) => allNodes().map((n) => blockDeviceInfo(n, null, a.flat === true)),
  }));
  monitor.register(defineCommand({
    name: 'blockdev-add',
    doc: 'Opens a block node tree (BlockdevOptions); the monitor owns its top node',
    args: {
      driver: { type: 'str', doc: 'the block driver' },
      'node-name': { type: 'str', optional: true, doc: 'the name of the new node' },
    },
    open: true,
    run: async (a) => {
      const o = a as unknown as Record<string, unknown>;
      checkBlockdevOptions(o);
      if (a['node-name'] === undefined) throw new QmpError('GenericError', "'node-name' must be specified for the root node");
      const node = await blockOp(() => openNode(o as NodeOptions));
      monitorNodes.add(node);
      return {};
    },
  }));
  monitor.register(defineCommand({
    name: 'blockdev-del',
    doc: 'Deletes a node blockdev-add made, once nothing uses it',
    args: { 'node-name': { type: 'str', doc: 'the node to delete' } },
    run: async (a) => {
      await blockdevDel(a['node-name']);
      return {};
    },
  }));
  monitor.register(defineCommand({
    name: 'block_resize',
    doc: "Resizes a block device's medium or a node",
    args: {
      device: { type: 'str', optional: true, doc: 'the block device name' },
      'node-name': { type: 'str', optional: true, doc: 'the node name' },
      size: { type: 'int', doc: 'the new size in bytes' },
    },
    run: async (a) => {
      await blockResize(a);
      return {};
    },
  }));
}
