/**
 * A lifetime for shared mappings the data plane may still be using when the control plane lets
 * go of them (guest memory with requests in flight, an inflight buffer a ring still writes):
 * close() asks, and `finish` runs once, when the last hold is released (at once if none).
 */
export class DeferredClose {
  private holds = 0;
  private closing = false;
  private finished = false;

  constructor(private readonly finish: () => void) {}

  /** close() was asked for (the object is no longer to be handed out). */
  get closed(): boolean {
    return this.closing;
  }

  /** Keeps it open until the returned release is called (idempotent). */
  hold(): () => void {
    this.holds++;
    let released = false;
    return () => {
      if (released) return;
      released = true;
      if (--this.holds === 0 && this.closing) this.run();
    };
  }

  /** Idempotent. */
  close(): void {
    if (this.closing) return;
    this.closing = true;
    if (this.holds === 0) this.run();
  }

  private run(): void {
    if (this.finished) return;
    this.finished = true;
    this.finish();
  }
}
