/**
 * The machine's virtual clock, in nanoseconds. Under qtest it moves only when told
 * (clock_step, clock_set), so timers fire deterministically.
 */
export interface Timer {
  /** Cancels the timer (no-op once it has fired). */
  cancel(): void;
}

interface Pending {
  at: number;
  seq: number;
  fn: () => void;
  live: boolean;
}

export class VirtualClock {
  private t = 0;
  private seq = 0;
  /** Sorted by (at, seq): timers due at the same time fire in the order they were set. */
  private queue: Pending[] = [];

  now(): number {
    return this.t;
  }

  /** Runs `fn` once the clock reaches now + `ns`. */
  after(ns: number, fn: () => void): Timer {
    const p: Pending = { at: this.t + Math.max(0, ns), seq: this.seq++, fn, live: true };
    let i = this.queue.length;
    while (i > 0 && (this.queue[i - 1]!.at > p.at)) i--;
    this.queue.splice(i, 0, p);
    return { cancel: () => void (p.live = false) };
  }

  /** The next deadline, or undefined. */
  nextDeadline(): number | undefined {
    this.queue = this.queue.filter((p) => p.live);
    return this.queue[0]?.at;
  }

  /** Advances by `ns`, or to the next deadline if omitted; runs what fell due. Returns the new time. */
  step(ns?: number): number {
    const target = ns === undefined ? (this.nextDeadline() ?? this.t) : this.t + ns;
    return this.set(target);
  }

  /** Moves the clock to `ns` (never backwards), running due timers in order. */
  set(ns: number): number {
    const target = Math.max(this.t, ns);
    for (;;) {
      const p = this.queue[0];
      if (!p || p.at > target) break;
      this.queue.shift();
      if (!p.live) continue;
      this.t = p.at;
      p.fn();
    }
    this.t = target;
    return this.t;
  }
}
