/**
 * Image corruption, as drivers find it: a format driver that finds its metadata corrupt marks
 * the image (no further metadata writes) and reports it once here; the monitor turns it into
 * QMP's BLOCK_IMAGE_CORRUPTED.
 */
import type { BlockNode } from './node.js';

export interface CorruptionReport {
  node: BlockNode;
  msg: string;
  /** Fatal: the image takes no more writes. */
  fatal: boolean;
}

type Listener = (r: CorruptionReport) => void;
const listeners = new Set<Listener>();

export function onCorruption(fn: Listener): () => void {
  listeners.add(fn);
  return () => listeners.delete(fn);
}

export function reportCorruption(node: BlockNode, msg: string, fatal = true): void {
  for (const fn of listeners) fn({ node, msg, fatal });
}
