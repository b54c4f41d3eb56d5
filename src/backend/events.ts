/**
 * Block events for the monitor (and tests): one listener list, typed payloads.
 */
import type { ErrorAction } from './device-ops.js';

export type BlockEvent =
  | { event: 'BLOCK_IO_ERROR'; device: string; nodeName: string; operation: 'read' | 'write'; action: ErrorAction; nospace: boolean; reason: string }
  | { event: 'BACKEND_STOPPED'; device: string }
  | { event: 'MEDIA_CHANGED'; device: string; inserted: boolean };

type Listener = (e: BlockEvent) => void;
const listeners = new Set<Listener>();

export function onBlockEvent(fn: Listener): () => void {
  listeners.add(fn);
  return () => listeners.delete(fn);
}

export function emitBlockEvent(e: BlockEvent): void {
  for (const fn of listeners) fn(e);
}
