/**
 * Block-layer happenings as QMP events: a corrupt image (BLOCK_IMAGE_CORRUPTED, with the
 * block device above the node when there is one).
 */
import { onCorruption } from '../block/corruption.js';
import type { BlockNode } from '../block/node.js';
import type { QmpMonitor } from './qmp.js';

/** The name of the first block backend above `node` ('' if none). */
function deviceAbove(node: BlockNode): string {
  const seen = new Set<BlockNode>();
  const todo = [node];
  while (todo.length) {
    const n = todo.shift()!;
    if (seen.has(n)) continue;
    seen.add(n);
    for (const e of n.parents) {
      if (e.parent.parentKind === 'backend') return (e.parent as unknown as { name: string }).name;
      if (e.parent.parentKind === 'node') todo.push(e.parent as BlockNode);
    }
  }
  return '';
}

/** Sends BLOCK_IMAGE_CORRUPTED to the monitor's clients; returns what stops it. */
export function forwardCorruption(monitor: QmpMonitor): () => void {
  return onCorruption((r) => monitor.emit('BLOCK_IMAGE_CORRUPTED', { device: deviceAbove(r.node), 'node-name': r.node.name, msg: r.msg, fatal: r.fatal }));
}
