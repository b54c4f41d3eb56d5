/**
 * Interrupt lines. A device exposes named groups of input lines (GPIO-in, as QEMU calls
 * them: an interrupt controller's pins) and drives output lines wired to someone's inputs.
 * qtest may intercept either side: the levels then go to the test instead.
 */
export type LineHandler = (line: number, level: boolean) => void;

/** A device's group of input lines. */
export class GpioIn {
  private levels: Uint8Array;
  private intercept: LineHandler | null = null;

  constructor(readonly name: string, readonly count: number, private readonly handler: LineHandler) {
    this.levels = new Uint8Array(count);
  }

  set(line: number, level: boolean): void {
    if (!Number.isInteger(line) || line < 0 || line >= this.count) throw new RangeError(`${this.name}: no input line ${line} (it has ${this.count})`);
    this.levels[line] = level ? 1 : 0;
    (this.intercept ?? this.handler)(line, level);
  }

  level(line: number): boolean {
    return this.levels[line] === 1;
  }

  /** Sends the levels to `cb` from now on; false if already intercepted. */
  interceptWith(cb: LineHandler): boolean {
    if (this.intercept) return false;
    this.intercept = cb;
    return true;
  }
}

/** One output line, wired to an input (or to nothing). Setting the same level again is a no-op. */
export class IrqLine {
  private current = false;
  private sink: ((level: boolean) => void) | null = null;

  constructor(readonly name: string) {}

  connect(to: GpioIn, line: number): void {
    this.sink = (level) => to.set(line, level);
  }

  /** Redirects the line (qtest's irq_intercept_out). */
  redirect(cb: (level: boolean) => void): void {
    this.sink = cb;
  }

  get level(): boolean {
    return this.current;
  }

  set(level: boolean): void {
    if (level === this.current) return;
    this.current = level;
    this.sink?.(level);
  }

  raise(): void {
    this.set(true);
  }

  lower(): void {
    this.set(false);
  }

  /** A pulse, as edge-triggered sources send. */
  pulse(): void {
    this.set(true);
    this.set(false);
  }
}
