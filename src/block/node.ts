/**
 * BlockNode and BlockChild: the graph's data.
 *
 *     parent (node | backend | job) --BlockChild{name, role, perm, shared}--> BlockNode
 *
 * Every edge sits in its parent's `children` (when the parent is a node) and in its child's
 * `parents`. Only graph.ts mutates these lists; `file` and `backing` are views of them.
 */
import type { AioContext } from './context.js';
import { mainContext } from './context.js';
import { nodeChildDrainedBegin, nodeChildDrainedEnd } from './drain.js';
import { ChildRole, type BlockDriver, type DetectZeroes, type Limits, type NodeOptions, type PermMask, type RoleMask } from './types.js';

/** Whoever holds an edge to a node. */
export interface BlockParent {
  readonly parentKind: 'node' | 'backend' | 'job' | 'export';
  /** How errors name this user: "node 'ov0'", "block device 'drive0'". */
  describeUser(): string;
  /** The child below started or stopped draining (propagated upwards). */
  childDrainedBegin?(child: BlockChild): void;
  childDrainedEnd?(child: BlockChild): void;
  /** The child's length changed. */
  childResized?(child: BlockChild): void;
}

export class BlockChild {
  /** Applied permissions; changed only by the permission transaction in perms.ts. */
  perm: PermMask = 0;
  shared: PermMask;
  constructor(
    readonly parent: BlockParent,
    public node: BlockNode,
    readonly name: string,
    readonly role: RoleMask,
    shared: PermMask,
  ) {
    this.shared = shared;
  }
  toString(): string {
    return `${this.parent.describeUser()} --${this.name}--> '${this.node.name}'`;
  }
}

/** An in-flight write or read-modify-write, tracked so overlapping ones serialise. */
export interface TrackedRange {
  offset: number;
  end: number;
  waiters: (() => void)[] | null;
  prev: TrackedRange | null;
  next: TrackedRange | null;
}

export class BlockNode implements BlockParent {
  readonly parentKind = 'node' as const;
  readonly children: BlockChild[] = [];
  readonly parents: BlockChild[] = [];
  refcnt = 1;
  /** Set once the last reference is gone; any later use is a bug. */
  deleted = false;
  readOnly: boolean;
  detectZeroes: DetectZeroes;
  discardUnmap: boolean;
  /** Cumulative permissions taken and shared by the parents (applied). */
  perm: PermMask = 0;
  shared: PermMask = 0x1f;
  /** Drained sections open on this node. */
  quiesce = 0;
  inFlight = 0;
  writesInFlight = 0;
  /** In-flight writes, an intrusive list through the pooled request records. */
  writeHead: TrackedRange | null = null;
  /** Read-modify-write cycles in flight; overlapping writes wait for them. */
  readonly serialising: TrackedRange[] = [];
  drainWaiters: (() => void)[] = [];
  limits: Limits = { requestAlignment: 1, maxTransfer: 0, discardAlignment: 1, memAlignment: 1 };
  aioContext: AioContext = mainContext;
  /** Driver-private state. */
  opaque: unknown = undefined;
  /** Whether the name was generated (#blockN) rather than given. */
  readonly autoNamed: boolean;
  stats = { rdBytes: 0, wrBytes: 0, rdOps: 0, wrOps: 0, flushOps: 0, discardOps: 0, failedOps: 0 };

  constructor(
    readonly name: string,
    readonly driver: BlockDriver,
    public options: NodeOptions,
    autoNamed: boolean,
  ) {
    this.autoNamed = autoNamed;
    this.readOnly = options['read-only'] === true;
    this.detectZeroes = options['detect-zeroes'] ?? 'off';
    this.discardUnmap = options.discard === 'unmap' || options.discard === 'on';
  }

  describeUser(): string {
    return `node '${this.name}'`;
  }
  childDrainedBegin(child: BlockChild): void {
    nodeChildDrainedBegin(this, child);
  }
  childDrainedEnd(child: BlockChild): void {
    nodeChildDrainedEnd(this, child);
  }
  childResized(_child: BlockChild): void {
    for (const e of this.parents) e.parent.childResized?.(e);
  }

  /** The `file` child (protocol layer or filtered child), a view of `children`. */
  get file(): BlockChild | undefined {
    return this.childNamed('file');
  }
  /** The `backing` child (COW source), a view of `children`. */
  get backing(): BlockChild | undefined {
    return this.childNamed('backing');
  }
  /** A plain loop: this runs on the I/O path of every filter and format. */
  childNamed(name: string): BlockChild | undefined {
    const kids = this.children;
    for (let i = 0; i < kids.length; i++) if (kids[i]!.name === name) return kids[i];
    return undefined;
  }
  /** The child that holds this node's data, for filters and formats. */
  get primary(): BlockChild | undefined {
    return this.children.find((c) => (c.role & (ChildRole.PRIMARY | ChildRole.FILTERED)) !== 0);
  }
  get length(): number {
    return this.driver.getLength(this);
  }
}

export function stateOf<S>(node: BlockNode): S {
  return node.opaque as S;
}
