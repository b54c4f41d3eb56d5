/**
 * The native threads vhost-user rings run on, one per AioContext: the main loop's (shared by
 * every export whose node is in the main context) and one per iothread (QEMU's
 * `--object iothread`). An export's rings follow its node: `x-blockdev-set-iothread`, or the
 * export's own `iothread=`, moves the node (drained), and at the end of that drained section
 * the session's rings move to the new context's thread at their positions.
 *
 * Workers start on first use and stop when their last ring goes.
 * Context: main loop.
 */
import type { AioContext } from '../../block/context.js';
import { VhostBlkWorker } from '../../native/vhost-blk-worker.js';

const workers = new Map<AioContext, { worker: VhostBlkWorker; users: number }>();

/** The thread of `ctx`, started if need be; pair with releaseWorker. */
export function acquireWorker(ctx: AioContext): VhostBlkWorker {
  let w = workers.get(ctx);
  if (!w) {
    w = { worker: new VhostBlkWorker(), users: 0 };
    workers.set(ctx, w);
  }
  w.users++;
  return w.worker;
}

export function releaseWorker(ctx: AioContext): void {
  const w = workers.get(ctx);
  if (!w || --w.users > 0) return;
  workers.delete(ctx);
  w.worker.destroy();
}

/** The kernel thread id serving `ctx`'s rings, or null when none runs. */
export function workerThreadId(ctx: AioContext): number | null {
  const id = workers.get(ctx)?.worker.threadId;
  return id ? id : null;
}
