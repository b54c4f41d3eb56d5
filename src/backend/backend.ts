/**
 * BlockBackend, the graph half: what the monitor and tools use.
 *
 * Context: main loop, every function. A backend is named (QEMU's id syntax, unique among
 * visible backends and node names), reference-counted, and holds one root edge to the node
 * tree, which can be swapped (media change) while its device keeps the backend. Devices get
 * a `BackendIO` from attachDevice and nothing else (contract 1 in DESIGN.md).
 *
 *   monitor ref ─┐
 *   device ref ──┴─> BlockBackend ──root──> BlockNode ──file──> ...
 */
import { assertMainLoop } from '../block/context.js';
import { withDrained } from '../block/drain.js';
import { BlockError } from '../block/error.js';
import { attachRoot, checkIdSyntax, detachRoot, findNode, setExternalNameCheck, setRootPerms } from '../block/graph.js';
import * as io from '../block/io.js';
import type { BlockChild, BlockNode, BlockParent } from '../block/node.js';
import { Perm, type PermPair } from '../block/types.js';
import type { DeviceHandle, DeviceOps, ErrorAction, IoStatus } from './device-ops.js';
import { emitBlockEvent } from './events.js';
import { BackendIOImpl, issue, type BackendCore, type BackendIO, type PendingReq } from './io.js';
import { BlockAcctStats } from './stats.js';
import type { ThrottleGroupMember } from './throttle-group.js';

const visible = new Map<string, BlockBackend>();
const live = new Set<BlockBackend>();
setExternalNameCheck((name) => visible.has(name));

const WRITE_PERMS = Perm.WRITE | Perm.WRITE_UNCHANGED | Perm.RESIZE;

export interface BackendOptions {
  /** Visible name ('' for an anonymous backend, e.g. one a tool or job uses). */
  name?: string;
  /** Permissions the root edge takes and shares. Default: read and write, share reads. */
  perm?: number;
  shared?: number;
  rerror?: ErrorAction;
  werror?: ErrorAction;
  writeCache?: boolean;
}

const ACTIONS: readonly ErrorAction[] = ['report', 'ignore', 'enospc', 'stop'];

export class BlockBackend implements BlockParent, BackendCore {
  readonly parentKind = 'backend' as const;
  refcnt = 1;
  dead = false;
  root: BlockChild | null = null;
  quiesce = 0;
  inFlight = 0;
  writeCache: boolean;
  rerror: ErrorAction;
  werror: ErrorAction;
  iostatus: IoStatus = 'ok';
  readonly queued: PendingReq[] = [];
  readonly stopped: PendingReq[] = [];
  /** I/O limits (block_set_io_throttle): the backend's, so they survive media change. */
  throttle: ThrottleGroupMember | null = null;
  /** query-blockstats' counters. */
  readonly stats = new BlockAcctStats();
  want: PermPair;
  device: DeviceHandle | null = null;
  ops: DeviceOps | null = null;
  #io: BackendIOImpl | null = null;
  #idleWaiters: (() => void)[] = [];

  constructor(readonly name: string, o: BackendOptions) {
    this.want = { perm: o.perm ?? (Perm.CONSISTENT_READ | Perm.WRITE), shared: o.shared ?? (Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED) };
    this.writeCache = o.writeCache ?? true;
    this.rerror = o.rerror ?? 'report';
    this.werror = o.werror ?? 'enospc';
  }

  describeUser(): string {
    if (this.device) return `device '${this.device.id}'${this.name ? ` (block device '${this.name}')` : ''}`;
    return this.name ? `block device '${this.name}'` : 'an anonymous block device';
  }
  childDrainedBegin(): void {
    if (this.quiesce++ === 0) this.ops?.drainedBegin?.();
    // QEMU: throttled requests go at once, unlimited, so the drain can finish.
    this.throttle?.drainedBegin();
  }
  childDrainedEnd(): void {
    this.throttle?.drainedEnd();
    if (--this.quiesce > 0) return;
    this.ops?.drainedEnd?.();
    const q = this.queued.splice(0);
    for (const r of q) issue(r);
  }
  childResized(): void {
    this.ops?.resize?.();
  }
  reportError(op: 'read' | 'write', action: ErrorAction, err: BlockError): void {
    emitBlockEvent({
      event: 'BLOCK_IO_ERROR', device: this.name, nodeName: this.root?.node.name ?? '', operation: op, action,
      nospace: err.code === 'ENOSPC', reason: err.message,
    });
    if (action === 'stop') emitBlockEvent({ event: 'BACKEND_STOPPED', device: this.name });
  }
  requestDone(): void {
    if (this.inFlight === 0 && this.#idleWaiters.length) for (const w of this.#idleWaiters.splice(0)) w();
  }

  /** Context: main loop. */
  get node(): BlockNode | null {
    return this.root?.node ?? null;
  }

  /**
   * Inserts a root node (media change: the device is told, unless `load` is false: a device
   * with a tray learns of it when the tray closes). Context: main loop.
   */
  insertNode(node: BlockNode, load = true): void {
    assertMainLoop('insertNode');
    this.#alive();
    if (this.root) throw new BlockError('EBUSY', `Block device '${this.name}' already has a medium (node '${this.root.node.name}')`);
    const want = node.readOnly ? { perm: this.want.perm & ~WRITE_PERMS, shared: this.want.shared } : this.want;
    this.root = attachRoot(this, node, 'root', want);
    if (this.ops && load) this.ops.changeMedia?.(true);
    emitBlockEvent({ event: 'MEDIA_CHANGED', device: this.name, inserted: true });
  }

  /** Removes the root node, drained; I/O fails with ENOMEDIUM after. Context: main loop. */
  async removeNode(): Promise<void> {
    assertMainLoop('removeNode');
    const root = this.root;
    if (!root) return;
    await withDrained([root.node], () => {
      if (this.root !== root) return;
      this.root = null;
      detachRoot(root);
    });
    this.ops?.changeMedia?.(false);
    emitBlockEvent({ event: 'MEDIA_CHANGED', device: this.name, inserted: false });
  }

  /** Changes what the root edge takes and shares, as a permission transaction. */
  setPerm(want: PermPair): void {
    assertMainLoop('setPerm');
    if (this.root) setRootPerms(this.root, want);
    this.want = want;
  }

  /**
   * Attaches the device model; it gets the I/O handle and nothing else.
   * Context: main loop.
   */
  attachDevice(dev: DeviceHandle, ops: DeviceOps = {}): BackendIO {
    assertMainLoop('attachDevice');
    this.#alive();
    if (this.device) throw new BlockError('EBUSY', `Block device '${this.name}' is already in use by device '${this.device.id}'`);
    this.device = dev;
    this.ops = ops;
    this.refcnt++;
    this.#io = new BackendIOImpl(this);
    return this.#io;
  }

  /** Detaches the device (unplug); the backend dies if nobody else holds it. */
  detachDevice(dev: DeviceHandle): void {
    assertMainLoop('detachDevice');
    if (this.device !== dev) throw new BlockError('EINVAL', `Device '${dev.id}' is not attached to block device '${this.name}'`);
    this.#io?.revoke();
    // Requests the error policy stopped belong to the departing device (its guest memory,
    // its callbacks): they go with it, never to be retried by a later resume.
    this.stopped.length = 0;
    this.#io = null;
    this.device = null;
    this.ops = null;
    this.unref();
  }

  ref(): void {
    assertMainLoop('backend ref');
    this.#alive();
    this.refcnt++;
  }

  /** The last reference detaches the root, frees the name (if still ours) and kills it. */
  unref(): void {
    assertMainLoop('backend unref');
    this.#alive();
    if (--this.refcnt > 0) return;
    this.dead = true;
    if (this.name && visible.get(this.name) === this) visible.delete(this.name);
    live.delete(this);
    this.throttle?.unregister();
    this.throttle = null;
    if (this.root) {
      const r = this.root;
      this.root = null;
      detachRoot(r);
    }
  }

  /** Resumes after a stop: requests stopped by the error policy are retried. */
  resume(): void {
    assertMainLoop('resume');
    this.iostatus = 'ok';
    for (const r of this.stopped.splice(0)) issue(r);
  }

  /** Resolves when no request of this backend is in flight. */
  idle(): Promise<void> {
    if (this.inFlight === 0) return Promise.resolve();
    return new Promise((r) => this.#idleWaiters.push(r));
  }

  /** Resizes the medium; the device hears it through DeviceOps.resize. Context: main loop. */
  async truncate(length: number): Promise<void> {
    assertMainLoop('block_resize');
    const root = this.root;
    if (!root) throw new BlockError('ENOMEDIUM', `No medium in block device '${this.name}'`);
    const old = { perm: root.perm, shared: root.shared };
    setRootPerms(root, { perm: old.perm | Perm.RESIZE, shared: old.shared });
    try {
      await io.truncate(root, length);
    } finally {
      if (this.root === root) setRootPerms(root, old);
    }
  }

  setErrorPolicy(rerror: ErrorAction, werror: ErrorAction): void {
    for (const [k, v] of [['rerror', rerror], ['werror', werror]] as const) {
      if (!ACTIONS.includes(v)) throw new BlockError('EINVAL', `Parameter '${k}' does not accept value '${v}' (${ACTIONS.join(', ')})`);
    }
    this.rerror = rerror;
    this.werror = werror;
  }

  /** Whether the name is visible (drive_del hides it at once). */
  get visible(): boolean {
    return this.name !== '' && visible.get(this.name) === this;
  }

  #alive(): void {
    if (this.dead) throw new Error(`use of dead block backend '${this.name}'`);
  }
}

/** Creates a backend, optionally with a root node. Context: main loop. */
export function createBackend(o: BackendOptions = {}, root?: BlockNode): BlockBackend {
  assertMainLoop('createBackend');
  const name = o.name ?? '';
  if (name) {
    checkIdSyntax(name, 'block device name');
    if (visible.has(name)) throw new BlockError('EEXIST', `Device with id '${name}' already exists`);
    if (findNode(name)) throw new BlockError('EEXIST', `Device name '${name}' conflicts with an existing node name`);
  }
  const b = new BlockBackend(name, o);
  b.setErrorPolicy(b.rerror, b.werror);
  if (root) b.insertNode(root);
  if (name) visible.set(name, b);
  live.add(b);
  return b;
}

/** Context: main loop. */
export function findBackend(name: string): BlockBackend | undefined {
  return visible.get(name);
}
export function allBackends(): BlockBackend[] {
  return [...visible.values()];
}
/** Every backend not yet dead, visible or not (leak checks). */
export function liveBackends(): BlockBackend[] {
  return [...live];
}

/**
 * drive_del: the medium goes and the name is free at once; the backend itself dies when
 * its device lets go (or now, if no device holds it). Context: main loop.
 */
export async function driveDel(b: BlockBackend): Promise<void> {
  assertMainLoop('drive_del');
  if (!b.visible) throw new BlockError('ENOENT', `Device '${b.name}' not found`);
  visible.delete(b.name);
  await b.removeNode();
  b.unref();
}
