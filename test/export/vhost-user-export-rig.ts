// A vhost-user-blk export over a real image file, with a TypeScript front-end (QEMU's start-up
// sequence) and split-ring drivers over memfd guest RAM: what vhost-user-fastpath.test.ts and
// vhost-user-hybrid.test.ts drive. useExportRig() installs the per-test cleanup.
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach } from 'vitest';
import { ioLimitsDisable } from '../../src/backend/throttle-group.js';
import { openNode, settleCloses, unref } from '../../src/block/graph.js';
import type { BlockNode } from '../../src/block/node.js';
import { VIRTIO_RING_F_EVENT_IDX } from '../../src/export/vhost-user/blk-features.js';
import { VhostUserBlkExport } from '../../src/export/vhost-user/export.js';
import { liveMappings } from '../../src/native/unix-fd.js';
import { qemuImg } from '../cli/helpers.js';
import { pattern, scratchDir } from '../helpers/tmp.js';
import { BlkDriver } from './vhost-user-blk-driver.js';
export { fill } from './vhost-user-blk-driver.js';
import { connect, fdCount, frontEnds, guestRam, MiB, qemuStartup, releaseHeld } from './vhost-user-frontend.js';

const dir = scratchDir('spindle-vhost-export-');
let seq = 0;
export const SIZE = 8 * MiB + 3 * 512;
export const uniq = (): number => seq++;

const exportsOpen: VhostUserBlkExport[] = [];
const nodes: BlockNode[] = [];

const fastPathEnv = process.env.SPINDLE_VHOST_FASTPATH;

/** The ways a session is served: each test that must hold everywhere runs on all three. */
export const DATA_PATHS = [
  { name: 'TypeScript data plane', format: 'raw', fastPath: '0', native: false },
  { name: 'native worker, raw', format: 'raw', fastPath: undefined, native: true },
  { name: 'native worker and forwarding, qcow2', format: 'qcow2', fastPath: undefined, native: true },
] as const;

/** Sessions from now on take path `p` ($SPINDLE_VHOST_FASTPATH; useExportRig restores it after the test). */
export function onPath(p: { fastPath: string | undefined }): void {
  if (p.fastPath === undefined) delete process.env.SPINDLE_VHOST_FASTPATH;
  else process.env.SPINDLE_VHOST_FASTPATH = p.fastPath;
}

export function useExportRig(): void {
  afterEach(async () => {
    onPath({ fastPath: fastPathEnv });
    for (const f of frontEnds.splice(0)) f.close();
    for (const e of exportsOpen.splice(0)) {
      await ioLimitsDisable(e.backend);
      await e.close();
    }
    releaseHeld();
    for (const n of nodes.splice(0)) if (!n.deleted) unref(n);
    await settleCloses();
  });
}

export interface ExportRigOptions {
  numQueues?: number;
  /** qcow2 only: qemu-img options for the image (e.g. a backing file). */
  qcow2?: (rawImage: string, qcow2Image: string) => void;
  /** Extra options of the format node. */
  node?: Record<string, unknown>;
  /** Give the rings err eventfds (`errs`). */
  err?: boolean;
  /** The export's logical block size (default 512). */
  logicalBlockSize?: number;
}

/** An export of a fresh image (raw: a pattern; qcow2: converted from it unless o.qcow2 says otherwise). */
export async function exportRig(format: 'raw' | 'qcow2' = 'raw', o: ExportRigOptions = {}) {
  const numQueues = o.numQueues ?? 1;
  const img = join(dir, `${seq++}.${format}`);
  writeFileSync(img, pattern(SIZE, 3));
  const file = format === 'qcow2' ? `${img}.q` : img;
  if (format === 'qcow2') {
    if (o.qcow2) o.qcow2(img, file);
    else qemuImg('convert', '-q', '-f', 'raw', '-O', 'qcow2', img, file);
  }
  const node = await openNode({ driver: format, discard: 'unmap', ...o.node, file: { driver: 'file', filename: file, discard: 'unmap' } });
  nodes.push(node);
  const path = join(dir, `${seq++}.sock`);
  const exp = new VhostUserBlkExport({ id: 'fast0', path, node, writable: true, numQueues, logicalBlockSize: o.logicalBlockSize });
  exportsOpen.push(exp);
  const ram = guestRam();
  const fds0 = fdCount();
  const maps0 = liveMappings();
  const drv = Array.from({ length: numQueues }, (_, i) => new BlkDriver(ram, i));
  const { fe, be } = await connect(exp, path);
  const { kicks, calls, errs, inflight } = await qemuStartup(fe, ram.fd, numQueues, { length: SIZE, err: o.err, blockSize: o.logicalBlockSize });
  drv.forEach((d, i) => d.attach(kicks[i]!, calls[i]!, be.hasFeature(VIRTIO_RING_F_EVENT_IDX)));
  return { img, file, node, exp, ram, fe, be, drv, kicks, calls, errs, inflight, fds0, maps0 };
}
