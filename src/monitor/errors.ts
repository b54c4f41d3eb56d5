/** QMP's error classes (qmp-spec.txt), and the error a command throws to answer with one. */
export type QmpErrorClass = 'GenericError' | 'CommandNotFound' | 'DeviceNotFound' | 'DeviceNotActive';

export class QmpError extends Error {
  constructor(readonly errorClass: QmpErrorClass, message: string) {
    super(message);
  }
}
