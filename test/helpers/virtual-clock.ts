// Virtual time for the throttle (ThrottleClock): timers run only when a test advances the clock,
// so throttled requests wait deterministically, never on the wall clock.
import type { ThrottleClock } from '../../src/backend/throttle.js';

interface Timer {
  at: number;
  fn: () => void;
}

export class VirtualClock implements ThrottleClock {
  readonly timers: Timer[] = [];
  /** `t`: an arbitrary origin; nothing may depend on it. */
  constructor(public t = 5_000_000_000) {}
  now(): number {
    return this.t;
  }
  schedule(fn: () => void, delayNs: number): unknown {
    const h = { at: this.t + delayNs, fn };
    this.timers.push(h);
    return h;
  }
  cancel(h: unknown): void {
    const i = this.timers.indexOf(h as Timer);
    if (i >= 0) this.timers.splice(i, 1);
  }
  /** The earliest timer due by `end`, removed, with the clock moved to it; null if none. */
  nextDue(end: number): (() => void) | null {
    let next: Timer | null = null;
    for (const h of this.timers) if (h.at <= end && (!next || h.at < next.at)) next = h;
    if (!next) return null;
    this.timers.splice(this.timers.indexOf(next), 1);
    this.t = Math.max(this.t, next.at);
    return next.fn;
  }
  /** Runs the due timers in time order, synchronously, and ends at now + ns. */
  advance(ns: number): void {
    const end = this.t + ns;
    for (let fn = this.nextDue(end); fn; fn = this.nextDue(end)) fn();
    this.t = end;
  }
}
