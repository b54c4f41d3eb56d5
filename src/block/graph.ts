/**
 * The graph API: open nodes, attach/detach/replace edges, references.
 *
 * Context: main loop, every function (assertMainLoop on the first line). This is the only
 * module that mutates `children`/`parents`; every change recomputes permissions as one
 * transaction and is undone whole if they are refused. Public changes of live nodes run
 * inside a drained section (withDrained) so no request is in flight below them.
 */
import { assertMainLoop } from './context.js';
import { edgeAttached, edgeDetached, idleBelow, withDrained } from './drain.js';
import { getDriver } from './drivers/index.js';
import { BlockError } from './error.js';
import { BlockChild, BlockNode, type BlockParent } from './node.js';
import { refreshPerms } from './perms.js';
import { warn } from './warn.js';
import { ChildRole, Perm, type ChildRef, type NodeOptions, type OpenContext, type PermPair, type RoleMask } from './types.js';

const nodes = new Map<string, BlockNode>();
const closing = new Set<Promise<void>>();
let autoNameCounter = 0;
/** Backends register a check so node names and backend names never collide. */
let externalNameTaken: (name: string) => boolean = () => false;

export const GENERIC_OPTION_KEYS = [
  'driver', 'node-name', 'read-only', 'auto-read-only', 'detect-zeroes', 'discard', 'cache', 'force-share',
] as const;

/** QEMU's id syntax: a letter, then letters, digits, '-', '.', '_'; at most 31 characters. */
export function checkIdSyntax(name: string, what: string): void {
  if (!/^[A-Za-z][A-Za-z0-9._-]*$/.test(name)) {
    throw new BlockError('EINVAL', `Invalid ${what} '${name}': it must start with a letter and contain only letters, digits, '-', '.' and '_'`);
  }
  if (name.length > 31) throw new BlockError('EINVAL', `Invalid ${what} '${name}': longer than 31 characters`);
}

export function setExternalNameCheck(fn: (name: string) => boolean): void {
  externalNameTaken = fn;
}

/** Context: main loop. */
export function findNode(name: string): BlockNode | undefined {
  return nodes.get(name);
}
export function allNodes(): BlockNode[] {
  return [...nodes.values()];
}

const openContext: OpenContext = { openChild };

/**
 * Opens a node as blockdev-add does; the caller owns the returned reference.
 * Context: main loop.
 */
export async function openNode(options: NodeOptions): Promise<BlockNode> {
  assertMainLoop('openNode');
  if (typeof options !== 'object' || options === null || typeof options.driver !== 'string') {
    throw new BlockError('EINVAL', "Parameter 'driver' is missing");
  }
  const drv = getDriver(options.driver);
  for (const key of Object.keys(options)) {
    if (!(GENERIC_OPTION_KEYS as readonly string[]).includes(key) && !drv.optionKeys.includes(key)) {
      throw new BlockError('EINVAL', `Block driver '${drv.format}' does not support the option '${key}'`);
    }
  }
  const dz = options['detect-zeroes'];
  if (dz !== undefined && dz !== 'off' && dz !== 'on' && dz !== 'unmap') {
    throw new BlockError('EINVAL', `Parameter 'detect-zeroes' does not accept value '${String(dz)}' (off, on, unmap)`);
  }
  if (dz === 'unmap' && !(options.discard === 'unmap' || options.discard === 'on')) {
    throw new BlockError('EINVAL', "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap");
  }
  let name = options['node-name'];
  const autoNamed = name === undefined;
  if (name === undefined) {
    name = `#block${autoNameCounter++}`;
  } else {
    checkIdSyntax(name, 'node-name');
    if (nodes.has(name)) throw new BlockError('EEXIST', `Duplicate nodes with node-name='${name}'`);
    if (externalNameTaken(name)) throw new BlockError('EEXIST', `node-name=${name} is conflicting with a device id`);
  }
  const node = new BlockNode(name, drv, options, autoNamed);
  nodes.set(name, node);
  try {
    await drv.open(node, options, openContext);
    refreshLimits(node);
  } catch (e) {
    while (node.children.length) detachEdge(node.children[node.children.length - 1]!);
    nodes.delete(name);
    node.deleted = true;
    node.refcnt = 0;
    throw e;
  }
  return node;
}

export function refreshLimits(node: BlockNode): void {
  const l = node.driver.refreshLimits?.(node) ?? {};
  let align = l.requestAlignment ?? 1;
  let mem = l.memAlignment ?? 1;
  for (const c of node.children) {
    if (c.role & (ChildRole.FILTERED | ChildRole.PRIMARY) && l.requestAlignment === undefined) {
      align = Math.max(align, c.node.limits.requestAlignment);
    }
    mem = Math.max(mem, c.node.limits.memAlignment);
  }
  node.limits = {
    requestAlignment: align,
    maxTransfer: l.maxTransfer ?? 0,
    discardAlignment: l.discardAlignment ?? align,
    memAlignment: mem,
  };
}

async function openChild(node: BlockNode, ref: ChildRef | undefined, name: string, role: RoleMask, optional = false): Promise<BlockChild | null> {
  assertMainLoop('openChild');
  if (ref === undefined || ref === null) {
    if (optional) return null;
    throw new BlockError('EINVAL', `A block device must be specified for "${name}" of node '${node.name}'`);
  }
  let child: BlockNode;
  if (typeof ref === 'string') {
    const found = nodes.get(ref);
    if (!found) throw new BlockError('ENOENT', `Cannot find device='' nor node-name='${ref}'`);
    child = found;
    ref_(child);
  } else {
    child = await openNode(inheritOptions(node, ref, role));
  }
  try {
    return attachEdge(node, child, name, role, null);
  } finally {
    unref(child);
  }
}

/**
 * Options a new child takes from its parent unless given: backing files open read-only;
 * other children follow the parent's read-only flag, cache mode and discard setting.
 */
function inheritOptions(parent: BlockNode, ref: NodeOptions, role: RoleMask): NodeOptions {
  const o: NodeOptions = { ...ref };
  if (o['read-only'] === undefined && (role & ChildRole.COW || parent.readOnly)) o['read-only'] = true;
  if (role & ChildRole.COW) return o;
  const cache = parent.options.cache;
  if (cache) o.cache = { ...cache, ...o.cache };
  if (o.discard === undefined && parent.options.discard !== undefined) o.discard = parent.options.discard;
  return o;
}

function wouldCycle(parent: BlockParent, child: BlockNode): boolean {
  if (parent.parentKind !== 'node') return false;
  const target = parent as BlockNode;
  const seen = new Set<BlockNode>();
  const walk = (n: BlockNode): boolean => {
    if (n === target) return true;
    if (seen.has(n)) return false;
    seen.add(n);
    return n.children.some((c) => walk(c.node));
  };
  return walk(child);
}

/**
 * Attaches `child` under `parent`. Non-node parents (backends, jobs) give their permissions
 * in `want`; node parents get theirs from their driver. Takes a reference on `child`.
 * Throws (and changes nothing) if permissions conflict.
 */
function attachEdge(parent: BlockParent, child: BlockNode, name: string, role: RoleMask, want: PermPair | null): BlockChild {
  if (child.deleted) throw new BlockError('EINVAL', `Node '${child.name}' has been deleted`);
  if (wouldCycle(parent, child)) {
    throw new BlockError('EINVAL', `Making '${child.name}' a child of ${parent.describeUser()} would create a cycle`);
  }
  const e = new BlockChild(parent, child, name, role, Perm.ALL);
  child.parents.push(e);
  if (parent.parentKind === 'node') (parent as BlockNode).children.push(e);
  const pinned = new Map<BlockChild, PermPair>();
  if (want) pinned.set(e, want);
  else {
    const p = parent as BlockNode;
    pinned.set(e, p.driver.childPerms(p, e, p.perm, p.shared));
  }
  try {
    refreshPerms([child], pinned);
  } catch (err) {
    removeFromLists(e);
    throw err;
  }
  child.refcnt++;
  edgeAttached(e);
  return e;
}

function removeFromLists(e: BlockChild): void {
  const i = e.node.parents.indexOf(e);
  if (i >= 0) e.node.parents.splice(i, 1);
  if (e.parent.parentKind === 'node') {
    const kids = (e.parent as BlockNode).children;
    const j = kids.indexOf(e);
    if (j >= 0) kids.splice(j, 1);
  }
}

function detachEdge(e: BlockChild): void {
  edgeDetached(e);
  removeFromLists(e);
  const child = e.node;
  try {
    refreshPerms([child]);
  } catch {
    // Dropping a user only relaxes permissions; a driver refusing that cannot undo the detach.
  }
  unref(child);
}

/**
 * Attaches a root user (backend, job, export) to `node` with the permissions it asks for.
 * Context: main loop.
 */
export function attachRoot(parent: BlockParent, node: BlockNode, name: string, want: PermPair): BlockChild {
  assertMainLoop('attachRoot');
  return attachEdge(parent, node, name, ChildRole.PRIMARY | ChildRole.DATA, want);
}

/** Drops an edge held by a root user. Context: main loop. */
export function detachRoot(e: BlockChild): void {
  assertMainLoop('detachRoot');
  if (e.parent.parentKind === 'node') throw new BlockError('EINVAL', 'detachRoot on a node edge');
  detachEdge(e);
}

/** Changes the permissions of a root user's edge, as a transaction. Context: main loop. */
export function setRootPerms(e: BlockChild, want: PermPair): void {
  assertMainLoop('setRootPerms');
  refreshPerms([e.node], new Map([[e, want]]));
}

/** Attaches a child under a node, drained. Context: main loop. */
export async function attachChild(parent: BlockNode, child: BlockNode, name: string, role: RoleMask): Promise<BlockChild> {
  assertMainLoop('attachChild');
  if (parent.children.some((c) => c.name === name)) {
    throw new BlockError('EEXIST', `Node '${parent.name}' already has a child named '${name}'`);
  }
  return withDrained([parent, child], () => {
    const e = attachEdge(parent, child, name, role, null);
    refreshLimits(parent);
    return e;
  });
}

/** Detaches a child from its node parent, drained. Context: main loop. */
export async function detachChild(e: BlockChild): Promise<void> {
  assertMainLoop('detachChild');
  const parent = e.parent as BlockNode;
  const child = e.node;
  child.refcnt++; // keep it alive through the drained section's end
  try {
    await withDrained([parent, child], () => {
      detachEdge(e);
      refreshLimits(parent);
    });
  } finally {
    unref(child);
  }
}

/**
 * Points every edge in `edges` at `to`, as one transaction. Context: main loop, drained.
 */
function moveEdges(edges: readonly BlockChild[], to: BlockNode): void {
  const from = new Map<BlockChild, BlockNode>();
  for (const e of edges) {
    if (wouldCycle(e.parent, to)) {
      throw new BlockError('EINVAL', `Making '${to.name}' a child of ${e.parent.describeUser()} would create a cycle`);
    }
  }
  for (const e of edges) {
    from.set(e, e.node);
    edgeDetached(e);
    e.node.parents.splice(e.node.parents.indexOf(e), 1);
    e.node = to;
    to.parents.push(e);
    edgeAttached(e);
  }
  const starts = [to, ...new Set(from.values())];
  const pinned = new Map<BlockChild, PermPair>();
  for (const e of edges) {
    if (e.parent.parentKind === 'node') {
      const p = e.parent as BlockNode;
      pinned.set(e, p.driver.childPerms(p, e, p.perm, p.shared));
    } else pinned.set(e, { perm: e.perm, shared: e.shared });
  }
  try {
    refreshPerms(starts, pinned);
  } catch (err) {
    for (const e of edges) {
      edgeDetached(e);
      to.parents.splice(to.parents.indexOf(e), 1);
      e.node = from.get(e)!;
      e.node.parents.push(e);
      edgeAttached(e);
    }
    throw err;
  }
  to.refcnt += edges.length;
  for (const e of edges) {
    if (e.parent.parentKind === 'node') refreshLimits(e.parent as BlockNode);
    unref(from.get(e)!);
  }
}

/** Points one edge at another node (e.g. a new backing file). Context: main loop. */
export async function replaceChildNode(e: BlockChild, to: BlockNode): Promise<void> {
  assertMainLoop('replaceChildNode');
  const old = e.node;
  old.refcnt++;
  try {
    await withDrained([old, to], () => moveEdges([e], to));
  } finally {
    unref(old);
  }
}

/**
 * Moves every parent of `from` to `to` (snapshot, mirror pivot). Edges from `to` itself
 * (an overlay whose backing is `from`) stay. Context: main loop.
 */
export async function replaceNode(from: BlockNode, to: BlockNode): Promise<void> {
  assertMainLoop('replaceNode');
  from.refcnt++;
  try {
    await withDrained([from, to], () => {
      const edges = from.parents.filter((e) => e.parent !== to);
      moveEdges(edges, to);
    });
  } finally {
    unref(from);
  }
}

/** Sets, replaces or (with null) removes the backing child. Context: main loop. */
export async function setBacking(node: BlockNode, backing: BlockNode | null): Promise<void> {
  assertMainLoop('setBacking');
  if (backing && !node.driver.supportsBacking) {
    throw new BlockError('ENOTSUP', `Driver '${node.driver.format}' of node '${node.name}' does not support backing files`);
  }
  const cur = node.backing;
  if (cur && backing) return replaceChildNode(cur, backing);
  if (cur) return detachChild(cur);
  if (backing) await attachChild(node, backing, 'backing', ChildRole.COW);
}

/** Drops `top`'s backing chain down to `base`: `top` reads through `base` directly. */
export async function dropIntermediate(top: BlockNode, base: BlockNode): Promise<void> {
  assertMainLoop('dropIntermediate');
  await setBacking(top, base);
}

/** Context: main loop. */
export function ref(node: BlockNode): void {
  assertMainLoop('ref');
  ref_(node);
}
function ref_(node: BlockNode): void {
  if (node.deleted) throw new Error(`ref of deleted node '${node.name}'`);
  node.refcnt++;
}

/**
 * Drops a reference; the last one closes the node, frees its name and drops its children.
 * Context: main loop.
 */
export function unref(node: BlockNode): void {
  assertMainLoop('unref');
  if (node.deleted || node.refcnt <= 0) throw new Error(`unref of dead node '${node.name}'`);
  if (--node.refcnt > 0) return;
  if (node.parents.length) throw new Error(`node '${node.name}' reached refcount 0 with parents`);
  node.deleted = true;
  if (nodes.get(node.name) === node) nodes.delete(node.name);
  // Requests still in flight below (a parent let go without draining) finish first:
  // closing a file under them would complete them against a dead descriptor.
  const idle = idleBelow(node);
  const before = idle ? idle.then(() => beforeClose(node)) : beforeClose(node);
  if (!before) {
    closeDeleted(node);
    return;
  }
  const p: Promise<void> = before.then(() => closeDeleted(node)).catch(() => undefined).finally(() => closing.delete(p));
  closing.add(p);
}

/** The driver's last writes before its children go; a failure is reported, the close goes on. */
function beforeClose(node: BlockNode): Promise<void> | undefined {
  const p = node.driver.beforeClose?.(node);
  return p?.catch((e: unknown) => warn(`closing '${node.name}': ${e instanceof Error ? e.message : String(e)}`));
}

function closeDeleted(node: BlockNode): void {
  while (node.children.length) detachEdge(node.children[node.children.length - 1]!);
  const closed = node.driver.close?.(node);
  if (closed) {
    const p = closed.catch(() => undefined).finally(() => closing.delete(p));
    closing.add(p);
  }
}

/** Resolves when every node close started so far has finished (tests, process exit). */
export async function settleCloses(): Promise<void> {
  while (closing.size) await Promise.all([...closing]);
}

export { withDrained } from './drain.js';
