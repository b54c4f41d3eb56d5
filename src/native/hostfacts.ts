// Synchronous host facts (plain syscalls): sizes, sparse-file probing,
// truncation, O_DIRECT alignment and OFD byte-range locks.
import { constants } from 'node:os';
import { native } from './addon.js';
import { check, EngineError } from './errors.js';

const ENXIO = constants.errno.ENXIO;
const EACCES = constants.errno.EACCES;
const EAGAIN = constants.errno.EAGAIN;

function stat(fd: number): [number, number, boolean, number] {
  const r = native.fstat(fd);
  if (typeof r === 'number') throw EngineError.from(r, `Could not stat fd ${fd}`);
  return r;
}

/** fstat size, or BLKGETSIZE64 for block devices. */
export function fileSize(fd: number): number {
  return stat(fd)[0];
}

export function isBlockDevice(fd: number): boolean {
  return stat(fd)[2];
}

/** Bytes actually allocated (st_blocks * 512). */
export function allocatedBytes(fd: number): number {
  return stat(fd)[1];
}

export function ftruncate(fd: number, length: number): void {
  check(native.ftruncate(fd, length), `Could not truncate fd ${fd} to ${length} bytes`);
}

/** lseek(SEEK_DATA): start of the next data at or after offset, or -1 when there is none. */
export function seekData(fd: number, offset: number): number {
  const r = native.seek(fd, offset, false);
  if (r === -ENXIO) return -1;
  return check(r, `Could not seek data at ${offset} in fd ${fd}`);
}

/** lseek(SEEK_HOLE): start of the next hole at or after offset (EOF counts), or -1 past EOF. */
export function seekHole(fd: number, offset: number): number {
  const r = native.seek(fd, offset, true);
  if (r === -ENXIO) return -1;
  return check(r, `Could not seek hole at ${offset} in fd ${fd}`);
}

/** O_DIRECT alignment: BLKSSZGET/BLKPBSZGET for block devices, else probed by reads. */
export function blockSizeHint(fd: number): { logical: number; physical: number } {
  const r = native.blockSize(fd);
  if (typeof r === 'number') throw EngineError.from(r, `Could not probe block size of fd ${fd}`);
  return { logical: r[0], physical: r[1] };
}

const lockTypes = { unlock: 0, read: 1, write: 2 } as const;

/**
 * Open-file-description lock (F_OFD_SETLK) on [start, start+len); len 0 means
 * to EOF and beyond.  Throws EngineError 'EAGAIN' when another open file
 * description holds a conflicting lock.
 */
export function lockBytes(fd: number, start: number, len: number, type: 'read' | 'write' | 'unlock'): void {
  const t = lockTypes[type];
  if (t === undefined) throw new RangeError(`lockBytes: bad lock type ${String(type)}`);
  let r = native.lock(fd, start, len, t);
  if (r === -EACCES) r = -EAGAIN; // POSIX allows either for a conflict
  check(r, `Could not ${type === 'unlock' ? 'unlock' : `take ${type} lock on`} bytes ${start}+${len} of fd ${fd}`);
}

/** True if a lock conflicting with `type` on [start, start+len) is held by another open file description. */
export function testLock(fd: number, start: number, len: number, type: 'read' | 'write'): boolean {
  const t: number | undefined = lockTypes[type];
  if (t === undefined || t === 0) throw new RangeError(`testLock: bad lock type ${String(type)}`);
  return check(native.testLock(fd, start, len, t), `Could not test lock on fd ${fd}`) === 1;
}

/**
 * Bytes [offset, offset+length) of a WebAssembly memory as a Uint8Array that stays valid when
 * the memory grows (an ordinary view is detached then): guest RAM that a CPU in wasm owns.
 */
export function wasmMemoryView(memory: WebAssembly.Memory, offset: number, length: number): Uint8Array {
  return new Uint8Array(native.aliasMemory(memory, offset, length));
}
