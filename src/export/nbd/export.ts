/**
 * NbdExport: one named export, holding its node through a BlockBackend of its own, as QEMU's
 * block exports do (the export is the backend's "device"; a guest's device on the same node
 * keeps its own backend).
 *
 *   NbdServer ──exports──> NbdExport ──BackendIO──> BlockBackend ──root──> node ...
 *                              ^  clients (NbdConn)
 *
 * Reads, writes, flush, discard and plain write-zeroes go through the BackendIO (queued while
 * drained, counted in the statistics). Block status and fast write-zeroes need what BackendIO
 * does not offer (a status query, NO_FALLBACK), so they use the backend's root edge directly,
 * and wait while the backend is drained (`whenUndrained`).
 *
 * Context: main loop for everything here except the I/O helpers (any AioContext).
 */
import { createBackend, type BlockBackend } from '../../backend/backend.js';
import type { BackendIO } from '../../backend/io.js';
import { BlockError } from '../../block/error.js';
import * as io from '../../block/io.js';
import type { BlockChild, BlockNode } from '../../block/node.js';
import { Perm, ReqFlags, type BlockStatus } from '../../block/types.js';
import { hostFileTarget } from '../host-file.js';
import * as P from './protocol.js';

export interface NbdExportOptions {
  /** Export name clients ask for ('' is the default export). */
  name: string;
  description?: string;
  /** The node to export, or a backend whose current node is exported (QEMU's `device`). */
  node?: BlockNode;
  backend?: BlockBackend;
  writable: boolean;
  /** Offer the `qemu:allocation-depth` metadata context. */
  allocationDepth?: boolean;
}

/** What an export needs of a connection using it. */
export interface ExportClient {
  /** Drops the connection at once; in-flight requests finish, their replies are dropped. */
  abort(): void;
  readonly inFlight: number;
}

export interface ExportInfo {
  name: string;
  description: string;
  writable: boolean;
  size: number;
  node: string;
  clients: number;
  allocationDepth: boolean;
}

/** Answer of one allocation-depth query. */
export interface DepthAnswer {
  bytes: number;
  depth: number;
}

/** How many data runs an export remembers (see knownData). */
const KNOWN_DATA_RUNS = 8;

export class NbdExport {
  readonly name: string;
  readonly description: string;
  readonly writable: boolean;
  readonly allocationDepth: boolean;
  readonly backend: BlockBackend;
  readonly io: BackendIO;
  readonly clients = new Set<ExportClient>();
  /** Hidden from new clients; released once its clients are gone. */
  removed = false;
  #drained = false;
  /**
   * Ranges block status recently called data, [start, end) pairs, newest first: reads inside
   * them need no status query. Several, because clients read several regions at once (nbdcopy
   * gives each of its connections its own part of the disk).
   */
  readonly #data: number[] = [];
  #undrained: (() => void)[] = [];
  #released = false;
  #releaseWaiters: (() => void)[] = [];
  readonly #handle: { readonly id: string };

  constructor(o: NbdExportOptions) {
    this.name = o.name;
    this.description = o.description ?? '';
    this.writable = o.writable;
    this.allocationDepth = o.allocationDepth ?? false;
    if (o.node && o.backend) throw new BlockError('EINVAL', `Export '${o.name}' takes a node or a backend, not both`);
    const node = o.node ?? o.backend?.node ?? null;
    if (!node) throw new BlockError('ENOMEDIUM', o.backend ? `Block device '${o.backend.name}' has no medium to export` : `Export '${o.name}' needs a node or a backend`);
    if (o.writable && node.readOnly) throw new BlockError('EPERM', `Cannot export read-only node '${node.name}' as writable`);
    // QEMU: the export takes read (and write) and shares everything.
    // Errors go back to the client (QEMU's export backends report; they never stop).
    this.backend = createBackend({ perm: Perm.CONSISTENT_READ | (o.writable ? Perm.WRITE : 0), shared: Perm.ALL, rerror: 'report', werror: 'report' }, node);
    this.#handle = { id: `nbd-export:${o.name}` };
    try {
      this.io = this.backend.attachDevice(this.#handle, {
        drainedBegin: () => void (this.#drained = true),
        drainedEnd: () => {
          this.#drained = false;
          for (const fn of this.#undrained.splice(0)) fn();
        },
      });
    } catch (e) {
      this.backend.unref();
      throw e;
    }
  }

  get size(): number {
    return this.io.getLength();
  }

  /** Transmission flags for a client (SEND_DF only once structured replies are negotiated). */
  flags(structured: boolean): number {
    let f = P.FLAG_HAS_FLAGS | P.FLAG_SEND_FLUSH | P.FLAG_SEND_FUA | P.FLAG_SEND_CACHE;
    // One backend serves every connection: flush and FUA are visible to all of them.
    f |= P.FLAG_CAN_MULTI_CONN;
    if (structured) f |= P.FLAG_SEND_DF;
    if (this.writable) f |= P.FLAG_SEND_TRIM | P.FLAG_SEND_WRITE_ZEROES | P.FLAG_SEND_FAST_ZERO;
    else f |= P.FLAG_READ_ONLY;
    return f;
  }

  /** Minimum block size: the node's request alignment (1 unless O_DIRECT or a device needs more). */
  minBlock(): number {
    const a = this.backend.node?.limits.requestAlignment ?? 1;
    return a >= 1 && a <= 65536 && (a & (a - 1)) === 0 ? a : 512;
  }

  info(): ExportInfo {
    return {
      name: this.name, description: this.description, writable: this.writable, size: this.size,
      node: this.backend.node?.name ?? '', clients: this.clients.size, allocationDepth: this.allocationDepth,
    };
  }

  /**
   * Whether [offset, offset+bytes) lies in the range last reported as data. A stale answer
   * is harmless: a range that became a hole is sent as data, which reads the same.
   */
  knownData(offset: number, bytes: number): boolean {
    const d = this.#data;
    for (let i = 0; i < d.length; i += 2) if (offset >= d[i]! && offset + bytes <= d[i + 1]!) return true;
    return false;
  }
  sawData(offset: number, bytes: number): void {
    const d = this.#data;
    let start = offset;
    let end = offset + bytes;
    // Overlapping or adjacent runs (concurrent readers) grow into one.
    for (let i = 0; i < d.length; ) {
      if (start <= d[i + 1]! && end >= d[i]!) {
        start = Math.min(start, d[i]!);
        end = Math.max(end, d[i + 1]!);
        d.splice(i, 2);
      } else {
        i += 2;
      }
    }
    d.unshift(start, end);
    if (d.length > 2 * KNOWN_DATA_RUNS) d.length = 2 * KNOWN_DATA_RUNS;
  }

  /**
   * The host file reads of this export may be sent from (sendfile.ts), or -1: its node is not
   * a plain file (host-file.ts), the backend is drained, or `SPINDLE_NBD_SENDFILE=0`.
   */
  sendFileFd(): number {
    if (this.#drained || process.env.SPINDLE_NBD_SENDFILE === '0') return -1;
    return hostFileTarget(this.backend, false)?.fd ?? -1;
  }

  /** Runs `fn` now, or when the backend's drained section ends. Context: any. */
  whenUndrained(fn: () => void): void {
    if (this.#drained) this.#undrained.push(fn);
    else fn();
  }
  get drained(): boolean {
    return this.#drained;
  }

  #root(): BlockChild {
    const r = this.backend.root;
    if (!r) throw new BlockError('ENOMEDIUM', `Export '${this.name}' has no medium`);
    return r;
  }

  /** Status of the range through the whole chain (base:allocation). Context: any AioContext. */
  blockStatus(offset: number, bytes: number): Promise<BlockStatus> {
    return io.blockStatus(this.#root(), offset, bytes);
  }

  /**
   * Which layer of the backing chain allocates [offset, offset+bytes): 0 none, 1 the top,
   * 2 its backing file, ... (filters are looked through). Context: any AioContext.
   */
  async depth(offset: number, bytes: number): Promise<DepthAnswer> {
    let e = this.#root();
    let n = bytes;
    for (let depth = 1; ; depth++) {
      for (let f = e.node.driver.isFilter ? e.node.primary : undefined; f; f = f.node.driver.isFilter ? f.node.primary : undefined) e = f;
      const st = await io.blockStatus(e, offset, n);
      n = Math.min(n, st.bytes);
      if (st.allocated) return { bytes: n, depth };
      const below = e.node.backing;
      if (!below) return { bytes: n, depth: 0 };
      const blen = below.node.length;
      if (offset >= blen) return { bytes: n, depth: 0 };
      n = Math.min(n, blen - offset);
      e = below;
    }
  }

  /**
   * Write-zeroes that must not fall back to writing buffers (NBD_CMD_FLAG_FAST_ZERO). Fails
   * with ENOTSUP at once when the backend is drained or the driver cannot do it quickly.
   */
  async fastZeroes(offset: number, bytes: number, mayUnmap: boolean): Promise<void> {
    if (this.#drained || !this.backend.root) throw new BlockError('ENOTSUP', 'write-zeroes cannot be fast now');
    await io.writeZeroes(this.backend.root, offset, bytes, ReqFlags.NO_FALLBACK | (mayUnmap ? ReqFlags.MAY_UNMAP : 0));
  }

  /** Drops every client (mode 'hard'). Context: main loop. */
  dropClients(): void {
    for (const c of [...this.clients]) c.abort();
  }

  /** Called by a connection when it is closed and idle. */
  clientGone(c: ExportClient): void {
    this.clients.delete(c);
    this.#maybeRelease();
  }

  /** Resolves once no client holds the export and the backend is released. Context: main loop. */
  release(): Promise<void> {
    this.removed = true;
    const p = new Promise<void>((r) => this.#releaseWaiters.push(r));
    this.#maybeRelease();
    return p;
  }

  #maybeRelease(): void {
    if (!this.removed || this.clients.size || this.#released) {
      if (this.#released) for (const w of this.#releaseWaiters.splice(0)) w();
      return;
    }
    this.#released = true;
    this.#undrained.length = 0;
    this.backend.detachDevice(this.#handle);
    this.backend.unref();
    for (const w of this.#releaseWaiters.splice(0)) w();
  }
}
