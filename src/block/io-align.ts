/**
 * Unaligned requests on nodes that need alignment (O_DIRECT files, 4K-sector devices).
 *
 * Reads go through an aligned bounce buffer. Writes are read-modify-write cycles, tracked
 * as serialising: a cycle waits for overlapping writes in flight, and writes arriving while
 * it runs wait for it, so no write is lost between the read and the write back.
 */
import { drainWaiting, pollDrains } from './drain.js';
import { BlockError } from './error.js';
import { dispatchRead, dispatchWrite } from './io.js';
import type { BlockNode, TrackedRange } from './node.js';
import { ReqFlags, type IoCallback, type IoVec } from './types.js';

function cbPromise(fn: (cb: IoCallback) => void): Promise<void> {
  return new Promise((resolve, reject) => fn((err) => (err ? reject(err) : resolve())));
}

function overlaps(t: TrackedRange, offset: number, end: number): boolean {
  return t.offset < end && offset < t.end;
}

function waitFor(t: TrackedRange): Promise<void> {
  return new Promise((resolve) => (t.waiters ??= []).push(resolve));
}

/** Waits until no read-modify-write overlapping [offset, end) is in flight. */
export async function waitSerialising(node: BlockNode, offset: number, end: number, self?: TrackedRange): Promise<void> {
  for (;;) {
    const t = node.serialising.find((s) => s !== self && overlaps(s, offset, end) && (!self || node.serialising.indexOf(s) < node.serialising.indexOf(self)));
    if (!t) return;
    await waitFor(t);
  }
}

/** Waits until no write overlapping [offset, end) is in flight. */
export async function waitWrites(node: BlockNode, offset: number, end: number): Promise<void> {
  for (;;) {
    let t = node.writeHead;
    while (t && !overlaps(t, offset, end)) t = t.next;
    if (!t) return;
    await waitFor(t);
  }
}

function bounds(node: BlockNode, offset: number, bytes: number): [number, number] {
  const a = node.limits.requestAlignment;
  const a1 = Math.ceil((offset + bytes) / a) * a;
  // A node that cannot grow ends its last block at its length: padding past it would
  // fail (a window below) or grow the image (a file below).
  const end = node.driver.growable ? a1 : Math.min(a1, Math.max(node.driver.getLength(node), offset + bytes));
  return [Math.floor(offset / a) * a, end];
}

function copyOut(src: Uint8Array, srcOff: number, iov: IoVec, bytes: number): void {
  let left = bytes;
  for (const seg of iov) {
    const n = Math.min(seg.length, left);
    seg.set(src.subarray(srcOff, srcOff + n));
    srcOff += n;
    left -= n;
    if (!left) break;
  }
}

function copyIn(dst: Uint8Array, dstOff: number, iov: IoVec, bytes: number): void {
  let left = bytes;
  for (const seg of iov) {
    const n = Math.min(seg.length, left);
    dst.set(seg.subarray(0, n), dstOff);
    dstOff += n;
    left -= n;
    if (!left) break;
  }
}

export function alignedReadv(node: BlockNode, offset: number, bytes: number, iov: IoVec, flags: number, cb: IoCallback): void {
  const [a0, a1] = bounds(node, offset, bytes);
  const bounce = Buffer.alloc(a1 - a0);
  dispatchRead(node, a0, a1 - a0, [bounce], flags, (err) => {
    if (!err) copyOut(bounce, offset - a0, iov, bytes);
    cb(err);
  });
}

export function alignedWritev(node: BlockNode, offset: number, bytes: number, iov: IoVec, flags: number, cb: IoCallback): void {
  rmw(node, offset, bytes, iov, flags).then(() => cb(null), (e: unknown) =>
    cb(e instanceof BlockError ? e : new BlockError('EIO', `read-modify-write on '${node.name}' failed: ${String(e)}`, { node: node.name })),
  );
}

async function rmw(node: BlockNode, offset: number, bytes: number, iov: IoVec, flags: number): Promise<void> {
  const [a0, a1] = bounds(node, offset, bytes);
  const me: TrackedRange = { offset: a0, end: a1, waiters: null, prev: null, next: null };
  node.serialising.push(me);
  node.inFlight++;
  try {
    await waitSerialising(node, a0, a1, me);
    await waitWrites(node, a0, a1);
    const buf = Buffer.alloc(a1 - a0);
    const align = node.limits.requestAlignment;
    // Only the partial head and tail blocks need their old contents.
    const headEnd = Math.min(a0 + align, a1);
    await cbPromise((cb) => dispatchRead(node, a0, headEnd - a0, [buf.subarray(0, headEnd - a0)], 0, cb));
    const tail = Math.floor((a1 - 1) / align) * align;
    if (tail >= headEnd) await cbPromise((cb) => dispatchRead(node, tail, a1 - tail, [buf.subarray(tail - a0)], 0, cb));
    copyIn(buf, offset - a0, iov, bytes);
    await cbPromise((cb) => dispatchWrite(node, a0, a1 - a0, [buf], flags | ReqFlags.SERIALISED, cb));
  } finally {
    node.serialising.splice(node.serialising.indexOf(me), 1);
    node.inFlight--;
    if (me.waiters) {
      const w = me.waiters;
      me.waiters = null;
      for (const fn of w) fn();
    }
    if (drainWaiting) pollDrains();
  }
}
