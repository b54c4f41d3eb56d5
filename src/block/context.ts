/**
 * Where code runs: the main loop (graph API) or an AioContext's I/O path (I/O API).
 *
 * JavaScript has one thread here, so "in I/O context" is a depth counter that the I/O
 * layer raises while it runs driver code and completion callbacks. Graph functions assert
 * it is zero: a graph change from a completion callback is a bug, refused at once.
 */
import { BlockError } from './error.js';

let ioDepth = 0;

/** Context: I/O layer only. Brackets a section that runs in I/O context. */
export function enterIo(): void {
  ioDepth++;
}
export function leaveIo(): void {
  ioDepth--;
}
export function inIoContext(): boolean {
  return ioDepth > 0;
}

/** First line of every graph function (QEMU's GLOBAL_STATE_CODE()). */
export function assertMainLoop(what: string): void {
  if (ioDepth > 0) {
    throw new BlockError('EPERM', `${what} is a graph operation and must run on the main loop, not in I/O context`);
  }
}

/** An AioContext: the event loop a node's requests complete in. Only the main one exists yet. */
export class AioContext {
  constructor(readonly id: string) {}
}
export const mainContext = new AioContext('main-loop');
