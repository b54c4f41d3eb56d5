/**
 * The machine's run state as QMP sees it: `stop`, `cont`, `query-status`, the STOP and
 * RESUME events, and the block layer's error events forwarded with QEMU's payloads. A
 * werror/rerror=stop failure stops the VM (status 'io-error', STOP after BLOCK_IO_ERROR);
 * `cont` resets every backend's I/O status and retries the requests the policy stopped, as
 * QEMU's qmp_cont does before vm_start.
 *
 * The CPU, when there is one, is paused and resumed through `cpu`; under qtest there is none
 * and only the state and its events change.
 */
import { liveBackends } from '../../backend/backend.js';
import { onBlockEvent, type BlockEvent } from '../../backend/events.js';
import { defineCommand, type QmpMonitor } from '../qmp.js';

/** QEMU's RunState values that Spindle reaches. */
export type RunStatus = 'running' | 'paused' | 'io-error';

export interface CpuControl {
  pause(): void;
  resume(): void;
}

/** QEMU's reason strings: strerror() of the errno, which BlockError messages end with. */
function reasonOf(e: Extract<BlockEvent, { event: 'BLOCK_IO_ERROR' }>): string {
  if (/^No medium\b/.test(e.reason)) return 'No medium found';
  const m = /failed: ([^:]+)$/.exec(e.reason);
  return m ? m[1]! : e.reason;
}

export class RunState {
  status: RunStatus = 'running';
  cpu: CpuControl | null = null;

  constructor(private readonly monitor: QmpMonitor) {}

  get running(): boolean {
    return this.status === 'running';
  }

  /** vm_stop: only a running VM stops (and says so); a stopped one keeps its state. */
  stop(status: Exclude<RunStatus, 'running'>): void {
    if (!this.running) return;
    this.status = status;
    this.cpu?.pause();
    this.monitor.emit('STOP');
  }

  /** qmp_cont: I/O status reset and stopped requests retried, then the VM runs. */
  cont(): void {
    for (const be of liveBackends()) be.resume();
    if (this.running) {
      // QEMU's vm_prepare_start: a running VM answers cont with a STOP/RESUME pair.
      this.monitor.emit('STOP');
      this.monitor.emit('RESUME');
      return;
    }
    this.status = 'running';
    this.cpu?.resume();
    this.monitor.emit('RESUME');
  }

  /** Forwards the block layer's events; returns the unsubscriber. */
  watchBlockEvents(): () => void {
    return onBlockEvent((e) => {
      if (e.event === 'BLOCK_IO_ERROR') {
        this.monitor.emit('BLOCK_IO_ERROR', {
          device: e.device, ...(e.nodeName ? { 'node-name': e.nodeName } : {}), operation: e.operation,
          action: e.action === 'enospc' ? 'stop' : e.action, nospace: e.nospace, reason: reasonOf(e),
        });
      } else if (e.event === 'BACKEND_STOPPED') {
        this.stop('io-error');
      }
    });
  }
}

export function registerRunStateCommands(monitor: QmpMonitor, state: RunState): void {
  monitor.register(defineCommand({
    name: 'stop',
    doc: 'Stops all guest CPUs',
    args: {},
    run: () => {
      state.stop('paused');
      return {};
    },
  }));
  monitor.register(defineCommand({
    name: 'cont',
    doc: 'Resumes guest CPUs (and block devices the error policy stopped)',
    args: {},
    run: () => {
      state.cont();
      return {};
    },
  }));
  monitor.register(defineCommand({
    name: 'query-status',
    doc: "The machine's run state",
    args: {},
    run: () => ({ status: state.status, singlestep: false, running: state.running }),
  }));
}
