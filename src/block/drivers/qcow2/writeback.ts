/**
 * Write-back of qcow2 metadata. Allocating writes change refcounts and L2 tables in the
 * caches only; this module writes them out — refcounts first, then the L2 tables that point
 * at what they count — on a flush, before a close, before anything that needs the disk to
 * match memory (snapshots, freeing a cluster an L2 entry no longer names), and when too much
 * has piled up. A crash between the two steps leaks clusters; it never leaves an entry that
 * names a cluster with refcount 0. Data a guest did not flush may be lost, as with QEMU.
 */
import { BlockError } from '../../error.js';
import * as io from '../../io.js';
import type { BlockNode } from '../../node.js';
import { qstate, type Qcow2State } from './state.js';

/**
 * Refcounts, then L2 tables. Context: under the metadata lock. Once the image is found
 * corrupt nothing more is written: what was only in memory is lost, the file stays as found.
 */
export async function writeBackMeta(s: Qcow2State): Promise<void> {
  if (s.corrupt && metaDirty(s)) {
    const f = s.file.node.options['filename'];
    throw new BlockError('EIO', `qcow2 image '${typeof f === 'string' ? f : s.file.node.name}' is marked corrupt; metadata cached since was not written`);
  }
  await s.refcounts.writeBack();
  await s.l2.writeBack();
}

/** Whether anything waits to be written back. */
export function metaDirty(s: Qcow2State): boolean {
  return s.refcounts.dirtyCount > 0 || s.l2.dirtyCount > 0;
}

/**
 * After marking tables dirty (under the lock): writes back once half the L2 cache is dirty,
 * so clean tables stay to evict and a flush has a bounded amount to write.
 */
export async function writeBackIfFull(s: Qcow2State): Promise<void> {
  if (s.l2.dirtyCount * 2 > s.l2.capacity || s.refcounts.dirtyCount > 64) await writeBackMeta(s);
}

/** Driver flush: the metadata reaches the file (which the generic layer flushes next). */
export async function qcow2Flush(node: BlockNode): Promise<void> {
  const s = qstate(node);
  if (metaDirty(s)) await s.lock.run(() => writeBackMeta(s));
}

/** Before the node closes (its file still open): the metadata must not be lost. */
export function qcow2BeforeClose(node: BlockNode): Promise<void> | undefined {
  const s = qstate(node);
  if (s.readOnly || s.corrupt || !metaDirty(s)) return undefined;
  return s.lock.run(() => writeBackMeta(s)).then(() => io.flush(s.file));
}
