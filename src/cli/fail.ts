/**
 * How the CLI fails: one line on stderr, exit status 1.
 *
 * Everything the user can cause (bad arguments, missing files, refused locks) arrives as
 * an Error whose message is already a sentence; this module only makes it one line.
 */

/** An error whose message is meant for the user as is. */
export class CliError extends Error {
  override name = 'CliError';
}

/** The message of any thrown value, flattened to one line. */
export function oneLine(e: unknown): string {
  const msg = e instanceof Error ? e.message : String(e);
  return msg.replace(/\s*\n\s*/g, ' ').trim() || 'unknown error';
}

/** Prints `prefix: message` and sets the exit status; debug builds keep the stack. */
export function reportError(prefix: string, e: unknown): void {
  process.stderr.write(`${prefix}: ${oneLine(e)}\n`);
  if (process.env.SPINDLE_DEBUG && e instanceof Error && !(e instanceof CliError)) process.stderr.write(`${e.stack}\n`);
  process.exitCode = 1;
}
