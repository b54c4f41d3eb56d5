/**
 * DeviceOps: how the block layer calls back into the device model that holds a backend.
 * Shared by both halves of the backend API. Every member is optional; each says which
 * devices need it.
 */
export interface DeviceOps {
  /**
   * The medium went away (load=false) or arrived (load=true): media change, eject,
   * drive_del. Context: main loop. Removable-media devices (CD-ROM, floppy) must implement
   * it; fixed disks use it to start failing or resuming I/O.
   */
  changeMedia?(load: boolean): void;
  /**
   * Someone asked to eject the medium (the monitor's `eject`). `force` is set when the
   * block layer will remove it regardless. Context: main loop. Removable-media devices.
   */
  ejectRequest?(force: boolean): void;
  /** Whether the device's tray is open. Context: main loop. Removable-media devices. */
  isTrayOpen?(): boolean;
  /** Whether the guest locked the medium (PREVENT ALLOW MEDIUM REMOVAL). Context: main loop. */
  isMediumLocked?(): boolean;
  /** The backend's length changed. Context: main loop. Devices that report capacity. */
  resize?(): void;
  /**
   * A drained section began: stop submitting new requests (any submitted meanwhile are
   * queued by the backend). Context: main loop. Devices with their own request queues.
   */
  drainedBegin?(): void;
  /** The drained section ended: submission may resume. Context: main loop. */
  drainedEnd?(): void;
}

/** The opaque identity of a device model, for error messages and detach. */
export interface DeviceHandle {
  readonly id: string;
}

export type ErrorAction = 'report' | 'ignore' | 'enospc' | 'stop';
export type IoStatus = 'ok' | 'failed' | 'nospace';
