/**
 * A vhost-user-blk block export: a node served to a vhost-user front-end (QEMU's
 * `-device vhost-user-blk-pci`) on a UNIX socket, as qemu-storage-daemon's
 * `--export type=vhost-user-blk` does. The export holds its node through a BlockBackend of its
 * own (the export is that backend's device); each front-end session gets a data plane.
 *
 *   VhostUserBlkExport ──BackendIO──> BlockBackend ──root──> node ...
 *        └─ VhostUserBlkServer ──session──> VhostUserBlkBackend (control) + VhostUserBlkDataPlane
 *
 * Sessions come one at a time; when the front-end goes (QEMU killed or restarted) the session's
 * requests finish, its memory is unmapped, and the next connection starts afresh.
 *
 * Context: main loop.
 */
import { createBackend, type BlockBackend } from '../../backend/backend.js';
import type { BackendIO } from '../../backend/io.js';
import { mainContext } from '../../block/context.js';
import { BlockError } from '../../block/error.js';
import type { BlockNode } from '../../block/node.js';
import { Perm } from '../../block/types.js';
import { VhostUserBlkDataPlane } from './dataplane.js';
import { fastPathTarget } from './fast-path.js';
import type { VhostUserBlkBackend } from './backend.js';
import { VhostUserBlkServer } from './server.js';

export interface VhostUserBlkExportOptions {
  id: string;
  /** UNIX socket path to listen on. */
  path: string;
  /** The node to export, or a backend whose current node is exported. */
  node?: BlockNode;
  backend?: BlockBackend;
  writable: boolean;
  /** Virtqueues offered (QEMU's num-queues; default 1). */
  numQueues?: number;
  /** The block size the guest sees (QEMU's logical-block-size): a power of 2 from 512 to 2 MiB; default 512. */
  logicalBlockSize?: number;
  /** Write-through: the front-end sees no volatile write cache (QEMU's writethrough). */
  writethrough?: boolean;
}

export class VhostUserBlkExport {
  readonly id: string;
  readonly path: string;
  readonly writable: boolean;
  readonly numQueues: number;
  readonly logicalBlockSize: number;
  readonly backend: BlockBackend;
  readonly io: BackendIO;
  readonly server: VhostUserBlkServer;
  #plane: { be: VhostUserBlkBackend; plane: VhostUserBlkDataPlane } | null = null;
  #drained = false;
  #closed = false;
  readonly #handle: { readonly id: string };
  /** Sessions served so far (front-end connections accepted). */
  sessions = 0;

  constructor(o: VhostUserBlkExportOptions) {
    this.id = o.id;
    this.path = o.path;
    this.writable = o.writable;
    this.numQueues = o.numQueues ?? 1;
    if (!Number.isInteger(this.numQueues) || this.numQueues < 1 || this.numQueues > 256) {
      throw new BlockError('EINVAL', `Parameter 'num-queues' must be 1..256, not ${this.numQueues}`);
    }
    this.logicalBlockSize = o.logicalBlockSize ?? 512;
    const bs = this.logicalBlockSize;
    if (!Number.isInteger(bs) || bs < 512 || bs > 2 ** 21 || (bs & (bs - 1)) !== 0) {
      throw new BlockError('EINVAL', `Parameter 'logical-block-size' must be a power of 2 between 512 and 2097152, not ${bs}`);
    }
    if (o.node && o.backend) throw new BlockError('EINVAL', `Export '${o.id}' takes a node or a backend, not both`);
    const node = o.node ?? o.backend?.node ?? null;
    if (!node) throw new BlockError('ENOMEDIUM', `Export '${o.id}' needs a node with a medium`);
    if (o.writable && node.readOnly) throw new BlockError('EPERM', `Cannot export read-only node '${node.name}' as writable`);
    this.backend = createBackend({ perm: Perm.CONSISTENT_READ | (o.writable ? Perm.WRITE : 0), shared: Perm.ALL, rerror: 'report', werror: 'report' }, node);
    this.#handle = { id: `vhost-user-blk-export:${o.id}` };
    try {
      this.io = this.backend.attachDevice(this.#handle, {
        drainedBegin: () => {
          this.#drained = true;
          this.#plane?.plane.drainedBegin();
        },
        drainedEnd: () => {
          this.#drained = false;
          this.#plane?.plane.drainedEnd();
        },
        // block_resize: the rings check the new capacity, and QEMU is told (it tells the guest).
        resize: () => {
          this.#plane?.plane.resized();
          this.#plane?.be.setCapacity(this.io.getLength());
        },
      });
      if (o.writethrough) this.io.setWriteCache(false);
      this.server = new VhostUserBlkServer(o.path, {
        length: this.io.getLength(),
        numQueues: this.numQueues,
        blockSize: this.logicalBlockSize,
        readOnly: !o.writable,
        writeCache: this.io.isWriteCacheEnabled(),
        hooks: {
          ...VhostUserBlkDataPlane.hooks((be) => (this.#plane?.be === be ? this.#plane.plane : null)),
          closed: (be) => {
            if (this.#plane?.be !== be) return;
            this.#plane.plane.close();
            this.#plane = null;
          },
        },
        onSession: (be) => this.#session(be),
      });
    } catch (e) {
      this.backend.detachDevice(this.#handle);
      this.backend.unref();
      throw e;
    }
  }

  #session(be: VhostUserBlkBackend): void {
    this.sessions++;
    be.setCapacity(this.io.getLength()); // the export may have been resized since the server started
    const plane = new VhostUserBlkDataPlane(be, this.io, {
      serial: this.id.slice(0, 20), drained: () => this.#drained, fastPath: () => fastPathTarget(this.backend),
      context: () => this.backend.node?.aioContext ?? mainContext,
    });
    this.#plane = { be, plane };
  }

  /** Whether the live session's rings are served by the native worker. */
  get onFastPath(): boolean {
    return this.#plane?.plane.onFastPath ?? false;
  }

  /** Guest clusters the native worker serves from its mapping table (a format on the fast path). */
  get nativeMappedClusters(): number {
    return this.#plane?.plane.nativeMappedClusters ?? 0;
  }

  /** The kernel thread serving the live session's rings natively, or null. */
  get nativeThreadId(): number | null {
    return this.#plane?.plane.nativeThreadId ?? null;
  }

  /** The live front-end session, if any. */
  get session(): VhostUserBlkBackend | null {
    return this.server.session;
  }

  get nodeName(): string {
    return this.backend.node?.name ?? '';
  }

  /**
   * Stop listening, end the session, wait for its requests, release the backend.
   * 'safe' refuses while a front-end is connected (QEMU's "still in use").
   */
  async close(mode: 'safe' | 'hard' = 'hard'): Promise<void> {
    if (this.#closed) return;
    if (mode === 'safe' && this.server.session) throw new BlockError('EBUSY', `export '${this.id}' still in use`);
    this.#closed = true;
    const p = this.#plane?.plane;
    this.server.close();
    if (p) await drainPlane(p);
    this.backend.detachDevice(this.#handle);
    this.backend.unref();
  }
}

/** Waits (on completions, not time) until a closed session's requests are done. */
async function drainPlane(p: VhostUserBlkDataPlane): Promise<void> {
  while (p.inFlight > 0) await new Promise<void>((r) => setImmediate(r));
}
