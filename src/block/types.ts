/**
 * Shared block-layer types: permissions, child roles, options, the driver table.
 *
 * Both halves (graph API in graph.ts, I/O API in io.ts) use these; neither half's
 * functions live here.
 */
import type { BlockError } from './error.js';
import type { BlockChild, BlockNode } from './node.js';

/** Permission bits, numerically equal to QEMU's BLK_PERM_* so image locks interoperate. */
export const Perm = {
  CONSISTENT_READ: 0x01,
  WRITE: 0x02,
  WRITE_UNCHANGED: 0x04,
  RESIZE: 0x08,
  GRAPH_MOD: 0x10,
  ALL: 0x1f,
} as const;
export type PermMask = number;

export const PERM_NAMES: readonly [number, string][] = [
  [Perm.CONSISTENT_READ, 'consistent read'],
  [Perm.WRITE, 'write'],
  [Perm.WRITE_UNCHANGED, 'write unchanged'],
  [Perm.RESIZE, 'resize'],
  [Perm.GRAPH_MOD, 'change children'],
];

export function permNames(mask: PermMask): string {
  const names = PERM_NAMES.filter(([bit]) => mask & bit).map(([, n]) => n);
  return names.length ? names.join(', ') : 'none';
}

/** Role flags of an edge: what the parent uses the child for. */
export const ChildRole = {
  DATA: 0x01,
  METADATA: 0x02,
  COW: 0x04,
  FILTERED: 0x08,
  PRIMARY: 0x10,
} as const;
export type RoleMask = number;

export interface PermPair {
  perm: PermMask;
  shared: PermMask;
}

/** A vectored buffer: segments are used in order. */
export type IoVec = readonly Uint8Array[];

/** Completion of a callback-style request. Called exactly once. */
export type IoCallback = (err: BlockError | null) => void;

/** Request flags. */
export const ReqFlags = {
  /** write-zeroes may deallocate (punch a hole) instead of writing zeroes. */
  MAY_UNMAP: 0x1,
  /** write-zeroes must not fall back to writing a buffer of zeroes. */
  NO_FALLBACK: 0x2,
  /** Force unit access: the write is stable when it completes. */
  FUA: 0x4,
  /** Internal: this request is a read-modify-write part and already serialised. */
  SERIALISED: 0x8,
  /** Store compressed (formats that can: qcow2); whole clusters only. */
  COMPRESSED: 0x10,
} as const;

/** Answer of block-status for [offset, offset + bytes). */
export interface BlockStatus {
  /** The answer holds for this many bytes from `offset` (> 0). */
  bytes: number;
  /** Reads return data from this layer (or one below, for filters). */
  data: boolean;
  /** Reads return zeroes. */
  zero: boolean;
  /** Allocated at this layer (not read through to a backing file). */
  allocated: boolean;
  /** Host offset in the protocol file, when known. */
  offset?: number;
  /** The node that answered, for allocation depth and map output. */
  node?: BlockNode;
}

/**
 * A run of guest bytes and where it lives in the node's `file` child, for native fast paths
 * (BlockDriver.hostExtents). A fast path may read guest bytes [offset, offset+bytes) from
 * `host` in the file child, and write them there when `writable`, for as long as no
 * watchMappings listener has reported an overlapping range since it asked.
 */
export interface HostExtent {
  /** Guest offset (in the node) where the run starts. */
  offset: number;
  /** Length of the run in bytes (> 0). */
  bytes: number;
  /**
   * Byte offset in the file child where these guest bytes live contiguously, or -1 when they
   * are not plainly stored there (unallocated, zero, compressed, in a backing file,
   * encrypted, external data file, partially allocated subclusters...): such bytes must go
   * through the driver.
   */
  host: number;
  /**
   * Plain overwrites in place are correct (qcow2: COPIED set, refcount 1; image not corrupt,
   * not read-only). Always false when host is -1.
   */
  writable: boolean;
}

/** Listener of BlockDriver.watchMappings: guest range [offset, offset+bytes) is about to change. */
export type UnmapListener = (offset: number, bytes: number) => void;

export type DetectZeroes = 'off' | 'on' | 'unmap';

/** Options of a node, as blockdev-add takes them. */
export interface NodeOptions {
  driver: string;
  'node-name'?: string;
  'read-only'?: boolean;
  'auto-read-only'?: boolean;
  'detect-zeroes'?: DetectZeroes;
  discard?: 'ignore' | 'unmap' | 'off' | 'on';
  cache?: { direct?: boolean; 'no-flush'?: boolean };
  'force-share'?: boolean;
  [key: string]: unknown;
}

/** A child given in options: a node name to reference, or options for a new node. */
export type ChildRef = string | NodeOptions;

export interface Limits {
  /** Requests are aligned to this many bytes (read-modify-write below it). */
  requestAlignment: number;
  /** Largest single request, in bytes (0 = unlimited). */
  maxTransfer: number;
  /** Discard granularity. */
  discardAlignment: number;
  /** Buffer address alignment the node needs (O_DIRECT). */
  memAlignment: number;
}

export interface ReopenState {
  node: BlockNode;
  /** The options after the reopen (merged with the old ones). */
  options: NodeOptions;
  readOnly: boolean;
  /** Driver-private prepared state, handed from prepare to commit/abort. */
  opaque?: unknown;
}

/** What a driver gets at open time to build its part of the graph. */
export interface OpenContext {
  /** Opens (or looks up, for a string) a child and attaches it to `node`. Context: main loop. */
  openChild(node: BlockNode, ref: ChildRef | undefined, name: string, role: RoleMask, optional?: boolean): Promise<BlockChild | null>;
}

/**
 * A block driver: one const table per driver, registered in drivers/index.ts.
 *
 * I/O entry points come in two forms. The callback form (`readv`/`writev`) is the hot path
 * and must not allocate per request; the async form (`coReadv`/`coWritev`) is for drivers
 * whose logic reads best as straight-line code. The I/O layer calls whichever exists.
 */
export interface BlockDriver {
  readonly format: string;
  /** A protocol driver opens a filename itself and sits at the bottom of a chain. */
  readonly protocol?: boolean;
  /** A filter forwards requests to its one FILTERED child. */
  readonly isFilter?: boolean;
  readonly supportsBacking?: boolean;
  /** Writes past the end grow the node and reads past it return zeroes (files). */
  readonly growable?: boolean;
  /** Option keys this driver accepts beyond the generic ones (for validation). */
  readonly optionKeys: readonly string[];

  open(node: BlockNode, options: NodeOptions, ctx: OpenContext): Promise<void>;
  /**
   * Called once the last reference is gone and nothing is in flight, with the children still
   * attached: state cached in memory goes to them now (a promise delays the close).
   */
  beforeClose?(node: BlockNode): Promise<void> | undefined;
  close?(node: BlockNode): Promise<void> | void;
  /** Current length in bytes (cached by the driver; cheap). */
  getLength(node: BlockNode): number;
  /** Permissions this node needs on `child` given what its own parents want of it. */
  childPerms(node: BlockNode, child: BlockChild, parentPerm: PermMask, parentShared: PermMask): PermPair;
  refreshLimits?(node: BlockNode): Partial<Limits>;

  readv?(node: BlockNode, offset: number, bytes: number, iov: IoVec, flags: number, cb: IoCallback): void;
  writev?(node: BlockNode, offset: number, bytes: number, iov: IoVec, flags: number, cb: IoCallback): void;
  coReadv?(node: BlockNode, offset: number, bytes: number, iov: IoVec, flags: number): Promise<void>;
  coWritev?(node: BlockNode, offset: number, bytes: number, iov: IoVec, flags: number): Promise<void>;
  flush?(node: BlockNode): Promise<void>;
  discard?(node: BlockNode, offset: number, bytes: number): Promise<void>;
  writeZeroes?(node: BlockNode, offset: number, bytes: number, flags: number): Promise<void>;
  blockStatus?(node: BlockNode, offset: number, bytes: number): Promise<BlockStatus>;
  truncate?(node: BlockNode, length: number, exact: boolean): Promise<void>;

  /** Permission hooks (image locking): check may refuse, set commits, abort rolls back. */
  checkPerm?(node: BlockNode, perm: PermMask, shared: PermMask): void;
  setPerm?(node: BlockNode, perm: PermMask, shared: PermMask): void;
  abortPerm?(node: BlockNode): void;

  reopen?: {
    prepare(state: ReopenState): Promise<void> | void;
    commit(state: ReopenState): void;
    abort(state: ReopenState): void;
  };
  /** Driver-specific blockdev-add options that recreate this node (children by node name). */
  describe?(node: BlockNode): Record<string, unknown>;
  /** Format-specific facts for `img info`. */
  info?(node: BlockNode): Record<string, unknown>;
  /** Allocated bytes on the host (for `img info`'s actual-size). */
  allocatedSize?(node: BlockNode): number;

  /**
   * Where guest bytes [offset, offset+bytes) live in the `file` child, for native fast paths.
   * The extents cover exactly that range (clipped to the node's length; [] past its end), in
   * order; neighbours merge when their hosts are contiguous (or both -1) and their `writable`
   * flags agree. Looks the mapping up as a read would (no other I/O). Errors in the image's
   * metadata give host -1 (the request then goes through the driver, which reports them);
   * the promise rejects only for a bad range.
   *
   * Racing with watchMappings: the answer was true at one instant after the call began. A
   * listener call overlapping the range that arrives before the promise settles (it may be
   * delivered just before the result is) can make it stale: callers discard such answers.
   */
  hostExtents?(node: BlockNode, offset: number, bytes: number): Promise<HostExtent[]>;
  /**
   * Registers `onUnmap(offset, bytes)`, called synchronously BEFORE any change that would make
   * an extent hostExtents returned (host >= 0) stop being true for guest range
   * [offset, offset+bytes): the L2 entry of a normal cluster being discarded, zeroed,
   * copied-on-write to a new cluster, its COPIED flag being cleared, the L2/L1 table being
   * replaced (snapshot create/apply/delete, amend, truncate/shrink, rebase...), the image
   * turning read-only or corrupt (`writable` goes), the node starting to close. Over-reporting
   * is fine (a whole-image range is used for rare operations); under-reporting is a
   * data-corruption bug. The listener runs inside the driver's metadata update, which goes on
   * when it returns: it must not throw (a throw is reported as a warning and ignored). A
   * hostExtents call it makes answers as of after the change.
   * Returns an unregister function (idempotent).
   *
   * The driver's own in-place writes are not reported, and neither is the allocation of
   * clusters that read as unallocated or zero (those answered host -1 and stay correct).
   * Context: main loop.
   */
  watchMappings?(node: BlockNode, onUnmap: UnmapListener): () => void;
}

export function hasCallbackIo(drv: BlockDriver): drv is BlockDriver & Required<Pick<BlockDriver, 'readv' | 'writev'>> {
  return typeof drv.readv === 'function' && typeof drv.writev === 'function';
}
