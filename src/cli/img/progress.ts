/**
 * qemu-img's progress line: "    (12.34/100%)" rewritten in place with carriage returns,
 * printed when it moved by at least 1% (so a pipe gets ~100 updates, not one per chunk).
 * Like qemu-img it goes to stdout.
 */
export class Progress {
  #last = -1;
  constructor(private readonly enabled: boolean, private readonly out: NodeJS.WritableStream = process.stdout) {
    this.#print(0);
  }

  /** done/total of the work; total 0 counts as finished. */
  update(done: number, total: number): void {
    const pct = total > 0 ? Math.min(100, (done * 100) / total) : 100;
    if (pct - this.#last >= 1 || (pct === 100 && this.#last < 100)) this.#print(pct);
  }

  finish(): void {
    this.#print(100);
    if (this.enabled) this.out.write('\n');
  }

  #print(pct: number): void {
    this.#last = pct;
    if (this.enabled) this.out.write(`    (${pct.toFixed(2)}/100%)\r`);
  }
}
