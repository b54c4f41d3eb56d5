/**
 * QMP's user-creatable objects, as far as Spindle has them: iothreads. `object-add`,
 * `object-del`, `query-iothreads`, and `x-blockdev-set-iothread` to move a node (and what it
 * is connected to) into one.
 */
import { BlockError } from '../../block/error.js';
import { findNode } from '../../block/graph.js';
import { allIoThreads, createIoThread, deleteIoThread, findIoThread, setNodeIoThread } from '../../block/iothread.js';
import { workerThreadId } from '../../export/vhost-user/iothread-workers.js';
import { QmpError } from '../errors.js';
import { defineCommand, type QmpMonitor } from '../qmp.js';

const asQmp = (e: unknown): never => {
  if (e instanceof BlockError) throw new QmpError('GenericError', e.message);
  throw e;
};

export function registerObjectCommands(monitor: QmpMonitor): void {
  monitor.register(defineCommand({
    name: 'object-add',
    doc: 'Creates an object (qom-type iothread, with its poll-* and aio-max-batch properties)',
    args: {
      'qom-type': { type: 'str' },
      id: { type: 'str' },
      'poll-max-ns': { type: 'int', optional: true },
      'poll-grow': { type: 'int', optional: true },
      'poll-shrink': { type: 'int', optional: true },
      'aio-max-batch': { type: 'int', optional: true },
    },
    run: (a) => {
      if (a['qom-type'] !== 'iothread') throw new QmpError('GenericError', `Invalid parameter '${a['qom-type']}'`);
      const { 'qom-type': _t, id, ...props } = a;
      try {
        createIoThread(id, props);
      } catch (e) {
        asQmp(e);
      }
      return {};
    },
  }));
  monitor.register(defineCommand({
    name: 'object-del',
    doc: 'Deletes an object no node uses',
    args: { id: { type: 'str' } },
    run: (a) => {
      try {
        deleteIoThread(a.id);
      } catch (e) {
        asQmp(e);
      }
      return {};
    },
  }));
  monitor.register(defineCommand({
    name: 'query-iothreads',
    doc: 'The iothreads, with their properties',
    args: {},
    // thread-id: the native thread serving the iothread's vhost-user rings once one runs (it
    // starts with the first ring); before that, the process's (where its nodes' I/O runs).
    run: () => allIoThreads().map((t) => ({ id: t.id, 'thread-id': workerThreadId(t.ctx) ?? process.pid, ...t.props })),
  }));
  monitor.register(defineCommand({
    name: 'x-blockdev-set-iothread',
    doc: "Moves a node, and the nodes connected to it, into an iothread's context (null: the main loop)",
    args: { 'node-name': { type: 'str' }, iothread: { type: 'any' }, force: { type: 'bool', optional: true } },
    run: async (a) => {
      if (a.iothread !== null && typeof a.iothread !== 'string') throw new QmpError('GenericError', "Invalid parameter type for 'iothread', expected: string or null");
      const node = findNode(a['node-name']);
      if (!node) throw new QmpError('GenericError', `Cannot find node ${a['node-name']}`);
      const t = a.iothread === null ? null : findIoThread(a.iothread);
      if (t === undefined) throw new QmpError('GenericError', `Cannot find iothread ${String(a.iothread)}`);
      try {
        await setNodeIoThread(node, t, a.force ?? false);
      } catch (e) {
        asQmp(e);
      }
      return {};
    },
  }));
}
