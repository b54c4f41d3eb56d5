// EngineError: the one error type of the native layer, with a stable errno
// name as `code` so it survives crossing QMP or process boundaries.
import { constants } from 'node:os';
import { native } from './addon.js';

// Linux errno numbers from Node's own table; where two names share a number,
// the first listed here wins.
const preferred = ['EAGAIN', 'ENOTSUP', 'EDEADLK'];
const names = new Map<number, string>();
for (const name of preferred) {
  const n = (constants.errno as Record<string, number>)[name];
  if (n !== undefined) names.set(n, name);
}
for (const [name, n] of Object.entries(constants.errno as Record<string, number>)) {
  if (!names.has(n)) names.set(n, name);
}

/** Name of a positive or negative errno, e.g. errnoName(-2) === 'ENOENT'. */
export function errnoName(errno: number): string {
  return names.get(Math.abs(errno)) ?? `E${Math.abs(errno)}`;
}

export class EngineError extends Error {
  readonly code: string;
  /** Negative errno, as the I/O path reports it. */
  readonly errno: number;
  constructor(errno: number, message: string) {
    super(message);
    this.name = 'EngineError';
    this.errno = -Math.abs(errno);
    this.code = errnoName(errno);
  }
  /** `${what}: ${strerror}` with the errno's code. */
  static from(errno: number, what: string): EngineError {
    return new EngineError(errno, `${what}: ${native.strerror(Math.abs(errno))}`);
  }
}

/** Throws an EngineError for negative results; returns the value otherwise. */
export function check(rc: number, what: string): number {
  if (rc < 0) throw EngineError.from(rc, what);
  return rc;
}
