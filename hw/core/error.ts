/**
 * Errors of the emulated machine: a code a program can test and a message a person can act
 * on (which device, which property, what was wrong).
 */
export type HwErrorCode = 'EINVAL' | 'EEXIST' | 'ENOENT' | 'EBUSY' | 'ERANGE' | 'E2BIG';

export class HwError extends Error {
  constructor(readonly code: HwErrorCode, message: string) {
    super(message);
    this.name = 'HwError';
  }
}
