// The rig of the vhost-user-blk data plane tests (src/export/vhost-user/dataplane.ts) against a
// real file: a VhostUserBlkExport on a raw file node, the TypeScript front-end of
// vhost-user-frontend.ts doing QEMU's start-up, and a minimal virtio-blk driver
// (vhost-user-blk-driver.ts) putting requests on split rings in memfd guest RAM, kicking eventfds
// and waiting on call eventfds. Requests are held in flight deterministically by the backend's I/O
// throttle on a virtual clock (blkdebug has no suspend/breakpoint in Spindle). These suites are
// the TypeScript path's: a raw file would go to the native worker (fast-path.ts), which
// vhost-user-fastpath.test.ts covers, and whose ring runs on another thread, so the exact kick and
// call sequences here would race.
process.env.SPINDLE_VHOST_FASTPATH = '0';

import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach } from 'vitest';
import { newConfig, setThrottleClock, Bucket, type ThrottleClock } from '../../src/backend/throttle.js';
import { configureGroup, ioLimitsDisable, ioLimitsEnable } from '../../src/backend/throttle-group.js';
import { openNode, settleCloses, unref } from '../../src/block/graph.js';
import type { BlockNode } from '../../src/block/node.js';
import type { VhostUserBlkBackend } from '../../src/export/vhost-user/backend.js';
import { VIRTIO_RING_F_EVENT_IDX } from '../../src/export/vhost-user/blk-features.js';
import { VhostUserBlkExport } from '../../src/export/vhost-user/export.js';
import { liveMappings } from '../../src/native/unix-fd.js';
import { pattern, scratchDir } from '../helpers/tmp.js';
import { BlkDriver } from './vhost-user-blk-driver.js';
import {
  connect, fdCount, type FrontEnd, frontEnds, guestRam, type GuestRamFd, MiB, qemuStartup, releaseHeld,
  type Inflight,
} from './vhost-user-frontend.js';
import { VirtualClock } from '../helpers/virtual-clock.js';

export { VirtualClock };

let dir = '';
let seq = 0;
const tmp = (name: string): string => join(dir, `${seq++}-${name}`);

export const SIZE = 8 * MiB + 3 * 512; // not a power of two: the last sectors are their own case
export const CAP = SIZE / 512;
export const bit = (n: number): bigint => 1n << BigInt(n);
const exportsOpen: VhostUserBlkExport[] = [];
const nodes: BlockNode[] = [];
let prevClock: ThrottleClock | null = null;

/** Call once at the top of a test file: a scratch directory, and what each test opened released after it. */
export function useDataPlaneRig(): void {
  dir = scratchDir('spindle-vhost-dp-');
  afterEach(async () => {
    for (const f of frontEnds.splice(0)) f.close();
    for (const e of exportsOpen.splice(0)) {
      await ioLimitsDisable(e.backend); // throttled requests go, so close() can wait for them
      await e.close();
    }
    if (prevClock) setThrottleClock(prevClock);
    prevClock = null;
    releaseHeld();
    for (const n of nodes.splice(0)) if (!n.deleted) unref(n);
    await settleCloses();
  });
}

export interface Rig {
  exp: VhostUserBlkExport;
  path: string;
  img: string;
  /** The file's expected content (updated by tests as they write). */
  disk: Buffer;
  ram: GuestRamFd;
  fe: FrontEnd;
  be: VhostUserBlkBackend;
  drv: BlkDriver[];
  kicks: number[];
  calls: number[];
  /** The front-end's inflight buffer (null: tracking off). */
  inflight: Inflight | null;
  /** fds and mappings before the front-end connected (guest RAM and the listener included). */
  fds0: number;
  maps0: number;
}

export interface RigOptions {
  numQueues?: number;
  writable?: boolean;
  /** Open the node read-only too (default: as the export). */
  nodeReadOnly?: boolean;
  acked?: (offered: bigint) => bigint;
  id?: string;
}

export async function rig(o: RigOptions = {}): Promise<Rig> {
  const nq = o.numQueues ?? 1;
  const writable = o.writable ?? true;
  const ro = o.nodeReadOnly ?? !writable;
  const img = tmp('disk.raw');
  const disk = pattern(SIZE, 5);
  writeFileSync(img, disk);
  const node = await openNode({ driver: 'raw', 'read-only': ro, discard: 'unmap', file: { driver: 'file', filename: img, 'read-only': ro, discard: 'unmap' } });
  nodes.push(node);
  const path = tmp('vu.sock');
  const exp = new VhostUserBlkExport({ id: o.id ?? 'disk0', path, node, writable, numQueues: nq });
  exportsOpen.push(exp);
  const ram = guestRam();
  const fds0 = fdCount();
  const maps0 = liveMappings();
  return { ...(await session(exp, path, ram, nq, o.acked)), exp, path, img, disk: Buffer.from(disk), ram, fds0, maps0 };
}

/** A front-end session: QEMU's start-up, then a driver per queue (rings cleaned first). */
export async function session(exp: VhostUserBlkExport, path: string, ram: GuestRamFd, nq: number, acked?: (f: bigint) => bigint) {
  const drv = Array.from({ length: nq }, (_, i) => new BlkDriver(ram, i));
  const { fe, be } = await connect(exp, path);
  const { kicks, calls, inflight } = await qemuStartup(fe, ram.fd, nq, { length: SIZE, acked: acked ?? ((f) => f) });
  drv.forEach((d, i) => d.attach(kicks[i]!, calls[i]!, be.hasFeature(VIRTIO_RING_F_EVENT_IDX)));
  return { fe, be, drv, kicks, calls, inflight };
}

export const fileNow = (r: Rig): Buffer => readFileSync(r.img);
export { dwz, fill } from './vhost-user-blk-driver.js';

/** Throttle the export's backend to one operation a second on a virtual clock. */
export function holdRequests(r: Rig): VirtualClock {
  const vclock = new VirtualClock();
  prevClock ??= setThrottleClock(vclock);
  ioLimitsEnable(r.exp.backend, `vu-${seq++}`);
  const cfg = newConfig();
  cfg.buckets[Bucket.OPS_TOTAL]!.avg = 1; // the bucket holds 0.1 op: one request goes, the next waits 1 s
  configureGroup(r.exp.backend.throttle!, cfg);
  return vclock;
}
export const SEC = 1e9;
