/**
 * iothreads (QEMU's `-object iothread,id=X`): each owns an AioContext that nodes can be moved
 * into. A move takes the node's whole connected part of the graph (parents and children share
 * one context), drained, as QEMU's bdrv_try_change_aio_context. The native event loops behind
 * the contexts come with the dataplane; until then a context is where a node is *said* to run,
 * and the move, its checks and its draining are the real thing.
 */
import { assertMainLoop, AioContext, mainContext } from './context.js';
import { withDrained } from './drain.js';
import { BlockError } from './error.js';
import { allNodes } from './graph.js';
import type { BlockNode } from './node.js';

/** QEMU's iothread properties (polling and batching knobs). */
export interface IoThreadProps {
  'poll-max-ns': number;
  'poll-grow': number;
  'poll-shrink': number;
  'aio-max-batch': number;
}

export class IoThread {
  readonly ctx: AioContext;
  constructor(readonly id: string, readonly props: IoThreadProps) {
    this.ctx = new AioContext(`iothread ${id}`);
  }
}

const iothreads = new Map<string, IoThread>();

const DEFAULTS: IoThreadProps = { 'poll-max-ns': 32768, 'poll-grow': 0, 'poll-shrink': 0, 'aio-max-batch': 0 };

export function createIoThread(id: string, props: Partial<IoThreadProps> = {}): IoThread {
  assertMainLoop('createIoThread');
  if (!/^[A-Za-z][A-Za-z0-9._-]*$/.test(id)) throw new BlockError('EINVAL', `Parameter 'id' expects an identifier, not '${id}'`);
  if (iothreads.has(id)) throw new BlockError('EEXIST', `attempt to add duplicate property '${id}' to object (type 'container')`);
  for (const [k, v] of Object.entries(props)) {
    if (!Number.isSafeInteger(v) || (v as number) < 0) throw new BlockError('EINVAL', `iothread '${id}': ${k} must be a non-negative integer`);
  }
  const t = new IoThread(id, { ...DEFAULTS, ...props });
  iothreads.set(id, t);
  return t;
}

export function findIoThread(id: string): IoThread | undefined {
  return iothreads.get(id);
}

export function allIoThreads(): IoThread[] {
  return [...iothreads.values()];
}

/** Deletes an iothread no node runs in. */
export function deleteIoThread(id: string): void {
  assertMainLoop('deleteIoThread');
  const t = iothreads.get(id);
  if (!t) throw new BlockError('ENOENT', `object '${id}' not found`);
  const user = allNodes().find((n) => n.aioContext === t.ctx);
  if (user) throw new BlockError('EBUSY', `iothread '${id}' is in use by node '${user.name}'`);
  iothreads.delete(id);
}

/** The nodes connected to `node` through node-to-node edges, and whether a backend holds any. */
function component(node: BlockNode): { nodes: BlockNode[]; backendUser: string | null } {
  const seen = new Set<BlockNode>([node]);
  const todo = [node];
  let backendUser: string | null = null;
  const visit = (n: BlockNode): void => {
    if (seen.has(n)) return;
    seen.add(n);
    todo.push(n);
  };
  while (todo.length) {
    const n = todo.pop()!;
    for (const c of n.children) visit(c.node);
    for (const p of n.parents) {
      if (p.parent.parentKind === 'node') visit(p.parent as BlockNode);
      else if (p.parent.parentKind === 'backend') backendUser ??= p.parent.describeUser();
    }
  }
  return { nodes: [...seen], backendUser };
}

/**
 * Moves `node` (with everything connected to it) into `target` (null: the main loop),
 * drained. A node a block backend uses may be in use by a device that cannot follow: refused
 * unless `force`, as QEMU's x-blockdev-set-iothread.
 */
export async function setNodeIoThread(node: BlockNode, target: IoThread | null, force = false): Promise<void> {
  assertMainLoop('setNodeIoThread');
  const { nodes, backendUser } = component(node);
  if (backendUser && !force) {
    throw new BlockError('EBUSY', `Node ${node.name} is associated with a BlockBackend and could be in use (use force=true to override this check)`);
  }
  const ctx = target ? target.ctx : mainContext;
  await withDrained(nodes, () => {
    for (const n of nodes) n.aioContext = ctx;
  });
}
