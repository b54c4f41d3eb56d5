/**
 * QMP's NBD server and block exports, with QEMU's names and messages: `nbd-server-start`,
 * `nbd-server-add`, `nbd-server-remove`, `nbd-server-stop`, and the newer `block-export-add`,
 * `block-export-del` and `query-block-exports` (BLOCK_EXPORT_DELETED when one is gone).
 */
import { findBackend } from '../../backend/backend.js';
import { BlockError } from '../../block/error.js';
import { findNode } from '../../block/graph.js';
import type { BlockNode } from '../../block/node.js';
import { findIoThread, setNodeIoThread } from '../../block/iothread.js';
import { NbdServer, type NbdListenAddress } from '../../export/nbd/server.js';
import { VhostUserBlkExport } from '../../export/vhost-user/export.js';
import { QmpError } from '../errors.js';
import { defineCommand, type QmpMonitor } from '../qmp.js';

/** The process's NBD server (at most one, as QEMU's) and its block exports by id. */
export class ExportState {
  server: NbdServer | null = null;
  /** Block exports: id -> the NBD export name and the node. */
  readonly exports = new Map<string, { name: string; nodeName: string }>();
  /** vhost-user-blk exports by id (each listens on its own socket). */
  readonly vhost = new Map<string, VhostUserBlkExport>();

  /** Where BLOCK_EXPORT_DELETED goes (set when the commands are registered). */
  monitor: QmpMonitor | null = null;

  async start(addr: NbdListenAddress): Promise<void> {
    if (this.server) throw new QmpError('GenericError', 'NBD server already running');
    const s = new NbdServer();
    try {
      await s.listen(addr);
    } catch (e) {
      await s.close();
      throw new QmpError('GenericError', `Failed to start the NBD server: ${(e as Error).message}`);
    }
    this.server = s;
  }

  async add(id: string, nodeName: string, o: {
    name?: string; description?: string; writable?: boolean; allocationDepth?: boolean; iothread?: string; fixedIothread?: boolean;
  }): Promise<void> {
    if (!this.server) throw new QmpError('GenericError', 'NBD server not running');
    if (this.exports.has(id) || this.vhost.has(id)) throw new QmpError('GenericError', `Block export id '${id}' is already in use`);
    const be = findBackend(nodeName);
    const node = be ? null : findNode(nodeName);
    if (!be?.node && !node) throw new QmpError('GenericError', `Cannot find device=${nodeName} nor node-name=${nodeName}`);
    // The node moves into the iothread as QEMU's does; NBD's own I/O still runs on the main loop.
    if (o.iothread !== undefined) await moveToIothread((be?.node ?? node)!, o.iothread, o.fixedIothread ?? false);
    const name = o.name ?? nodeName;
    try {
      this.server.addExport({
        name, writable: o.writable ?? false, allocationDepth: o.allocationDepth ?? false,
        ...(o.description !== undefined ? { description: o.description } : {}),
        ...(be ? { backend: be } : { node: node! }),
      });
    } catch (e) {
      throw new QmpError('GenericError', e instanceof BlockError ? e.message : String(e));
    }
    this.exports.set(id, { name, nodeName });
  }

  async addVhostUserBlk(id: string, nodeName: string, o: {
    path: string; writable?: boolean; numQueues?: number; logicalBlockSize?: number; writethrough?: boolean; iothread?: string; fixedIothread?: boolean;
  }): Promise<void> {
    if (this.exports.has(id) || this.vhost.has(id)) throw new QmpError('GenericError', `Block export id '${id}' is already in use`);
    const be = findBackend(nodeName);
    const node = be ? null : findNode(nodeName);
    if (!be?.node && !node) throw new QmpError('GenericError', `Cannot find device=${nodeName} nor node-name=${nodeName}`);
    if (o.iothread !== undefined) await moveToIothread((be?.node ?? node)!, o.iothread, o.fixedIothread ?? false);
    try {
      this.vhost.set(id, new VhostUserBlkExport({
        id, path: o.path, writable: o.writable ?? false, writethrough: o.writethrough ?? false,
        ...(o.numQueues !== undefined ? { numQueues: o.numQueues } : {}),
        ...(o.logicalBlockSize !== undefined ? { logicalBlockSize: o.logicalBlockSize } : {}),
        ...(be ? { backend: be } : { node: node! }),
      }));
    } catch (e) {
      throw new QmpError('GenericError', e instanceof Error ? e.message : String(e));
    }
  }

  async del(id: string, mode: 'safe' | 'hard'): Promise<void> {
    const v = this.vhost.get(id);
    if (v) {
      try {
        await v.close(mode);
      } catch (err) {
        throw new QmpError('GenericError', err instanceof Error ? err.message : String(err));
      }
      this.vhost.delete(id);
      this.monitor?.emit('BLOCK_EXPORT_DELETED', { id });
      return;
    }
    const e = this.exports.get(id);
    if (!e || !this.server) throw new QmpError('GenericError', `Export '${id}' is not found`);
    try {
      await this.server.removeExport(e.name, mode);
    } catch (err) {
      throw new QmpError('GenericError', err instanceof BlockError ? err.message : String(err));
    }
    this.exports.delete(id);
    this.monitor?.emit('BLOCK_EXPORT_DELETED', { id });
  }

  async stop(): Promise<void> {
    if (!this.server) throw new QmpError('GenericError', 'NBD server not running');
    const s = this.server;
    this.server = null;
    await s.close();
    for (const id of [...this.exports.keys()]) {
      this.exports.delete(id);
      this.monitor?.emit('BLOCK_EXPORT_DELETED', { id });
    }
  }

  /** At exit: the server and its exports go. */
  async close(): Promise<void> {
    if (this.server) await this.stop();
    for (const id of [...this.vhost.keys()]) await this.del(id, 'hard');
  }
}

/**
 * As QEMU: an export runs where its node does, so the node moves (drained) into the iothread;
 * if it cannot, that is an error only with fixed-iothread.
 */
async function moveToIothread(node: BlockNode, iothread: string, fixed: boolean): Promise<void> {
  const t = findIoThread(iothread);
  if (!t) throw new QmpError('GenericError', `iothread "${iothread}" not found`);
  try {
    await setNodeIoThread(node, t, true);
  } catch (e) {
    if (fixed) throw new QmpError('GenericError', `Cannot change iothread of active block backend: ${(e as Error).message}`);
  }
}

/** QEMU's SocketAddressLegacy ({type, data}) or SocketAddress ({type, path | host, port}). */
export function nbdAddress(addr: Record<string, unknown>): NbdListenAddress {
  const d = (addr['data'] && typeof addr['data'] === 'object' ? addr['data'] : addr) as Record<string, unknown>;
  if (addr['type'] === 'unix') {
    if (typeof d['path'] !== 'string') throw new QmpError('GenericError', "Parameter 'addr.data.path' is missing");
    return { path: d['path'] };
  }
  if (addr['type'] === 'inet') {
    const port = Number(d['port']);
    if (!Number.isInteger(port) || port < 0 || port > 65535) throw new QmpError('GenericError', "Parameter 'addr.data.port' expects a port number");
    return { host: typeof d['host'] === 'string' && d['host'] ? d['host'] : '127.0.0.1', port };
  }
  throw new QmpError('GenericError', `Parameter 'addr.type' does not accept value '${String(addr['type'])}'`);
}

/** vhost-user-blk's addr: a SocketAddress of type unix (the protocol needs fd passing). */
export function vhostAddress(addr: unknown): string {
  if (!addr || typeof addr !== 'object') throw new QmpError('GenericError', "Parameter 'addr' is missing");
  const a = addr as Record<string, unknown>;
  if (a['type'] !== 'unix') throw new QmpError('GenericError', `vhost-user-blk needs addr.type=unix, not '${String(a['type'])}'`);
  if (typeof a['path'] !== 'string' || !a['path']) throw new QmpError('GenericError', "Parameter 'addr.path' is missing");
  return a['path'];
}

export function registerExportCommands(monitor: QmpMonitor, st: ExportState): void {
  st.monitor = monitor;
  monitor.register(defineCommand({
    name: 'nbd-server-start',
    doc: 'Starts the NBD server on a UNIX or TCP address (loopback when no host is given)',
    args: { addr: { type: 'any' }, 'tls-creds': { type: 'str', optional: true }, 'max-connections': { type: 'int', optional: true } },
    run: async (a) => {
      if (a['tls-creds'] !== undefined) throw new QmpError('GenericError', 'TLS is not supported by this NBD server');
      if (!a.addr || typeof a.addr !== 'object') throw new QmpError('GenericError', "Invalid parameter type for 'addr', expected: object");
      await st.start(nbdAddress(a.addr as Record<string, unknown>));
      return {};
    },
  }));
  monitor.register(defineCommand({
    name: 'nbd-server-add',
    doc: 'Exports a block device or node over NBD (named after it unless `name` is given)',
    args: { device: { type: 'str' }, name: { type: 'str', optional: true }, description: { type: 'str', optional: true }, writable: { type: 'bool', optional: true } },
    run: async (a) => {
      await st.add(a.name ?? a.device, a.device, { name: a.name ?? a.device, ...(a.description !== undefined ? { description: a.description } : {}), writable: a.writable ?? false });
      return {};
    },
  }));
  monitor.register(defineCommand({
    name: 'nbd-server-remove',
    doc: "Removes an NBD export ('safe' refuses while clients use it, 'hard' disconnects them)",
    args: { name: { type: 'str' }, mode: { type: { enum: ['safe', 'hard'] }, optional: true } },
    run: async (a) => {
      const id = [...st.exports].find(([, e]) => e.name === a.name)?.[0];
      if (id === undefined) throw new QmpError('GenericError', `Export '${a.name}' is not found`);
      await st.del(id, a.mode ?? 'safe');
      return {};
    },
  }));
  monitor.register(defineCommand({
    name: 'nbd-server-stop',
    doc: 'Stops the NBD server; its exports go',
    args: {},
    run: async () => {
      await st.stop();
      return {};
    },
  }));
  monitor.register(defineCommand({
    name: 'block-export-add',
    doc: 'Exports a node: type nbd on the running NBD server, or vhost-user-blk on its own UNIX socket',
    args: {
      type: { type: { enum: ['nbd', 'vhost-user-blk'] } },
      id: { type: 'str' },
      'node-name': { type: 'str' },
      writable: { type: 'bool', optional: true },
      writethrough: { type: 'bool', optional: true },
      name: { type: 'str', optional: true },
      description: { type: 'str', optional: true },
      'allocation-depth': { type: 'bool', optional: true },
      addr: { type: 'any', optional: true },
      'num-queues': { type: 'int', optional: true },
      'logical-block-size': { type: 'int', optional: true },
      iothread: { type: 'str', optional: true },
      'fixed-iothread': { type: 'bool', optional: true },
    },
    run: async (a) => {
      if (a.type === 'vhost-user-blk') {
        await st.addVhostUserBlk(a.id, a['node-name'], {
          path: vhostAddress(a.addr), writable: a.writable ?? false, writethrough: a.writethrough ?? false,
          ...(a['num-queues'] !== undefined ? { numQueues: a['num-queues'] } : {}),
          ...(a['logical-block-size'] !== undefined ? { logicalBlockSize: a['logical-block-size'] } : {}),
          ...(a.iothread !== undefined ? { iothread: a.iothread } : {}),
          ...(a['fixed-iothread'] !== undefined ? { fixedIothread: a['fixed-iothread'] } : {}),
        });
        return {};
      }
      for (const k of ['addr', 'num-queues', 'logical-block-size'] as const) {
        if (a[k] !== undefined) throw new QmpError('GenericError', `Parameter '${k}' is unexpected`);
      }
      await st.add(a.id, a['node-name'], {
        ...(a.iothread !== undefined ? { iothread: a.iothread } : {}),
        ...(a['fixed-iothread'] !== undefined ? { fixedIothread: a['fixed-iothread'] } : {}),
        ...(a.name !== undefined ? { name: a.name } : {}),
        ...(a.description !== undefined ? { description: a.description } : {}),
        writable: a.writable ?? false,
        allocationDepth: a['allocation-depth'] ?? false,
      });
      return {};
    },
  }));
  monitor.register(defineCommand({
    name: 'block-export-del',
    doc: "Removes a block export ('safe' refuses while clients use it, 'hard' disconnects them)",
    args: { id: { type: 'str' }, mode: { type: { enum: ['safe', 'hard'] }, optional: true } },
    run: async (a) => {
      await st.del(a.id, a.mode ?? 'safe');
      return {};
    },
  }));
  monitor.register(defineCommand({
    name: 'query-block-exports',
    doc: 'The block exports',
    args: {},
    run: () => [
      ...[...st.exports].map(([id, e]) => ({ type: 'nbd', id, 'node-name': e.nodeName, 'shutting-down': false })),
      ...[...st.vhost].map(([id, e]) => ({ type: 'vhost-user-blk', id, 'node-name': e.nodeName, 'shutting-down': false })),
    ],
  }));
}
