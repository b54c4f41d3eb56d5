/**
 * Warnings for the user (a corrupt image opened read-only, a probed format): one line on
 * stderr by default; tests and embedders can take them instead.
 */
type Sink = (msg: string) => void;
let sink: Sink = (msg) => process.stderr.write(`spindle: warning: ${msg}\n`);

export function warn(msg: string): void {
  sink(msg);
}

/** Replaces the sink; returns the previous one. */
export function setWarningSink(fn: Sink): Sink {
  const old = sink;
  sink = fn;
  return old;
}
