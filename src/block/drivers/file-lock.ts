/**
 * Image locking, as QEMU does it, so two processes never write one image unknowingly.
 *
 * Byte 100+i is read-locked while this node holds permission bit i; byte 200+i is
 * read-locked while it refuses to share bit i. To take bit i we test that nobody locks
 * 200+i; to refuse sharing it we test that nobody locks 100+i. Locks are OFD locks, so two
 * opens of one file conflict even within one process, exactly like two processes.
 */
import { BlockError } from '../error.js';
import { lockBytes, testLock } from '../../native/engine.js';
import { permNames } from '../types.js';

const PERM_BASE = 100;
const SHARED_BASE = 200;
const BITS = 4; // consistent read, write, write unchanged, resize: the bits QEMU locks

/** Applies locks for holding `perm` and not sharing ~`shared`. */
export function applyLocks(fd: number, perm: number, shared: number): void {
  for (let i = 0; i < BITS; i++) {
    const bit = 1 << i;
    lockBytes(fd, PERM_BASE + i, 1, perm & bit ? 'read' : 'unlock');
    lockBytes(fd, SHARED_BASE + i, 1, shared & bit ? 'unlock' : 'read');
  }
}

/** Throws if another open of the file holds a lock that conflicts with (perm, shared). */
export function checkLocks(fd: number, path: string, perm: number, shared: number): void {
  for (let i = 0; i < BITS; i++) {
    const bit = 1 << i;
    if (perm & bit && testLock(fd, SHARED_BASE + i, 1, 'write')) {
      throw new BlockError('EAGAIN', `Failed to get "${permNames(bit)}" lock on '${path}': is another process using the image?`, { path });
    }
    if (!(shared & bit) && testLock(fd, PERM_BASE + i, 1, 'write')) {
      throw new BlockError('EAGAIN', `Failed to get shared "${permNames(bit)}" lock on '${path}': is another process using the image?`, { path });
    }
  }
}
