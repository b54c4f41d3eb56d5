/**
 * Simulated event channels between the guest (frontend domain) and Spindle's backends.
 * The guest allocates an unbound port for the backend domain; a backend binds a handler to
 * it. Guest → backend: notify(port) calls the handler. Backend → guest: the port's bit in
 * the pending bitmap is set and its input line goes up; the guest acknowledges (clears the
 * bit, the line goes down). The lines are a GpioIn group registered on the machine as
 * 'xen-evtchn', one line per port, so `irq_intercept_in xen-evtchn` observes them.
 */
import { HwError } from '../core/error.js';
import type { GpioIn } from '../core/irq.js';

export const EVTCHN_PORTS = 64;

interface Port {
  remoteDomid: number;
  handler: (() => void) | null;
}

export class EventChannels {
  private readonly ports = new Map<number, Port>();
  /** Pending bits, one per port (bit p of word p >> 5). */
  readonly pending = new Uint32Array(EVTCHN_PORTS / 32);
  /** Notifications the guest sent, per port (for tests and statistics). */
  readonly sent = new Uint32Array(EVTCHN_PORTS);

  constructor(private readonly lines: GpioIn | null) {}

  /** EVTCHNOP_alloc_unbound: a free port (port 0 is never used). */
  allocUnbound(remoteDomid: number): number {
    for (let p = 1; p < EVTCHN_PORTS; p++) {
      if (!this.ports.has(p)) {
        this.ports.set(p, { remoteDomid, handler: null });
        return p;
      }
    }
    throw new HwError('EBUSY', `event channels: all ${EVTCHN_PORTS - 1} ports are in use`);
  }

  isOpen(port: number): boolean {
    return this.ports.has(port);
  }

  /** Backend side: domain `domid` binds to the guest's unbound port; throws if the port is not open for it or already bound. */
  bind(port: number, domid: number, handler: () => void): void {
    const p = this.ports.get(port);
    if (!p) throw new HwError('ENOENT', `event channel ${port} is not open`);
    if (p.remoteDomid !== domid) throw new HwError('EINVAL', `event channel ${port} is for domain ${p.remoteDomid}, not ${domid}`);
    if (p.handler) throw new HwError('EBUSY', `event channel ${port} is already bound`);
    p.handler = handler;
  }

  /** Backend side: drops the binding (the port stays open, as the guest allocated it). */
  unbind(port: number, handler: () => void): void {
    const p = this.ports.get(port);
    if (p && p.handler === handler) p.handler = null;
  }

  /** Guest side: EVTCHNOP_close. */
  close(port: number): void {
    if (!this.ports.delete(port)) throw new HwError('ENOENT', `event channel ${port} is not open`);
    this.ack(port);
  }

  /** Guest → backend. Returns false for a closed port. A handler's error stays here. */
  notifyBackend(port: number): boolean {
    const p = this.ports.get(port);
    if (!p) return false;
    this.sent[port]!++;
    try {
      p.handler?.();
    } catch {
      // A backend must not throw into the guest's port access; nothing to report to.
    }
    return true;
  }

  /** Backend → guest: sets the pending bit and raises the port's line. */
  notifyGuest(port: number): void {
    if (!this.ports.has(port)) return;
    this.pending[port >> 5]! |= 1 << (port & 31);
    this.lines?.set(port, true);
  }

  isPending(port: number): boolean {
    return port > 0 && port < EVTCHN_PORTS && (this.pending[port >> 5]! & (1 << (port & 31))) !== 0;
  }

  /** Guest: clears the pending bit and lowers the line; returns whether it was pending. */
  ack(port: number): boolean {
    if (!Number.isInteger(port) || port <= 0 || port >= EVTCHN_PORTS) return false;
    const was = this.isPending(port);
    this.pending[port >> 5]! &= ~(1 << (port & 31));
    if (this.lines?.level(port)) this.lines.set(port, false);
    return was;
  }

  /** Forgets every port (bridge unplug). */
  reset(): void {
    for (const port of [...this.ports.keys()]) this.close(port);
  }
}
