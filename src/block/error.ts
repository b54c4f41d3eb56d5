/**
 * BlockError: the one error type of the block layer.
 *
 * `code` is errno-like and stable (it survives the QMP wire and the native boundary);
 * the message says what failed and why, so a person can act on it.
 */

export type ErrnoCode =
  | 'EIO' | 'ENOSPC' | 'ENOMEDIUM' | 'EINVAL' | 'EPERM' | 'EACCES' | 'EBUSY' | 'ENOENT'
  | 'ENOTSUP' | 'EEXIST' | 'EAGAIN' | 'ECANCELED' | 'EROFS' | 'EFBIG' | 'ENOTDIR' | 'EISDIR'
  | 'ENXIO' | 'EBADF' | 'ENOMEM' | 'EDQUOT' | 'ETIMEDOUT';

const ERRNO: Record<ErrnoCode, number> = {
  EPERM: 1, ENOENT: 2, EIO: 5, ENXIO: 6, EBADF: 9, EAGAIN: 11, ENOMEM: 12, EACCES: 13,
  EBUSY: 16, EEXIST: 17, ENOTDIR: 20, EISDIR: 21, EINVAL: 22, EFBIG: 27, ENOSPC: 28, EROFS: 30,
  ENOTSUP: 95, ETIMEDOUT: 110, ECANCELED: 125, ENOMEDIUM: 123, EDQUOT: 122,
};
const BY_NUMBER = new Map<number, ErrnoCode>(
  Object.entries(ERRNO).map(([k, v]) => [v, k as ErrnoCode]),
);

const STRERROR: Partial<Record<ErrnoCode, string>> = {
  EPERM: 'Operation not permitted', ENOENT: 'No such file or directory', EIO: 'Input/output error',
  EAGAIN: 'Resource temporarily unavailable', EACCES: 'Permission denied', EBUSY: 'Device or resource busy',
  EINVAL: 'Invalid argument', ENOSPC: 'No space left on device', EROFS: 'Read-only file system',
  ENOTSUP: 'Operation not supported', ENOMEDIUM: 'No medium found', EFBIG: 'File too large',
  ECANCELED: 'Operation canceled', EEXIST: 'File exists', ENOMEM: 'Cannot allocate memory',
  EDQUOT: 'Disk quota exceeded', ETIMEDOUT: 'Connection timed out', ENXIO: 'No such device or address',
};

export interface ErrorContext {
  node?: string;
  path?: string;
  offset?: number;
  bytes?: number;
  op?: string;
}

export class BlockError extends Error {
  readonly code: ErrnoCode;
  readonly context: ErrorContext;
  constructor(code: ErrnoCode, message: string, context: ErrorContext = {}, cause?: unknown) {
    super(message, cause === undefined ? undefined : { cause });
    this.name = 'BlockError';
    this.code = code;
    this.context = context;
  }
  /** Negative errno, as the I/O path and the native engine speak it. */
  get errno(): number {
    return -ERRNO[this.code];
  }
}

export function errnoOf(code: ErrnoCode): number {
  return ERRNO[code];
}

export function codeOfErrno(errno: number): ErrnoCode {
  return BY_NUMBER.get(Math.abs(errno)) ?? (Math.abs(errno) === 45 ? 'ENOTSUP' : 'EIO');
}

export function strerror(code: ErrnoCode): string {
  return STRERROR[code] ?? code;
}

/** Builds a BlockError from a negative errno returned by the I/O path. */
export function ioError(errno: number, op: string, context: ErrorContext = {}): BlockError {
  const code = codeOfErrno(errno);
  const where = context.node ? ` on '${context.node}'` : '';
  const at = context.offset !== undefined ? ` at offset ${context.offset}` : '';
  return new BlockError(code, `${op}${where}${at} failed: ${strerror(code)}`, { ...context, op });
}

export function isBlockError(e: unknown): e is BlockError {
  return e instanceof BlockError;
}
