/**
 * `img create`: a new image file. Raw creation is not hot, so it is a plain open/truncate
 * through the engine (the size as a hole); qcow2 is written by create-qcow2.ts.
 */
import { getDriver } from '../../block/drivers/index.js';
import { ftruncate, getEngine, testLock } from '../../native/engine.js';
import { CliError, oneLine } from '../fail.js';
import { imgCreateQcow2, qcow2Help, type Qcow2CliOptions } from './create-qcow2.js';
import { parseSize } from './size.js';

export interface CreateOptions extends Qcow2CliOptions {
  f?: string;
}

/** Parses `-o a=b,c=d` lists (repeatable, merged), as the raw format knows them. */
function parseCreateOptions(lists: readonly string[]): { size?: number; help: boolean } {
  const out: { size?: number; help: boolean } = { help: false };
  for (const list of lists) {
    for (const item of list.split(',')) {
      if (item === '') continue;
      if (item === 'help' || item === '?') {
        out.help = true;
        continue;
      }
      const eq = item.indexOf('=');
      const key = eq < 0 ? item : item.slice(0, eq);
      const value = eq < 0 ? '' : item.slice(eq + 1);
      if (key === 'size') out.size = parseSize(value);
      else if (key === 'preallocation') {
        if (value !== 'off') throw new CliError(`Preallocation mode '${value}' is not supported yet (only 'off')`);
      } else throw new CliError(`Invalid parameter '${key}'`);
    }
  }
  return out;
}

/** Checks that `fmt` can be written here (convert's targets); qcow2 is announced, others are named. */
export function checkCreatableFormat(fmt: string): void {
  if (fmt === 'qcow2') return;
  getDriver(fmt); // unknown names: "Unknown driver 'x' (known: ...)"
  if (fmt !== 'raw') throw new CliError(`Format driver '${fmt}' does not support image creation`);
}

/** Image lock bytes (QEMU's layout, see file-lock.ts): 100+bit held, 200+bit not shared. */
const LOCK_RANGES = [[100, 4], [200, 4]] as const;

/**
 * Creates (or empties) a raw image file of `size` bytes. An existing file is opened
 * without O_TRUNC and emptied only if no one holds image locks on it, so creating over
 * an image in use (e.g. `convert a.img a.img`) is refused instead of wiping it.
 */
export function createRawFile(path: string, size: number): void {
  const engine = getEngine();
  let fd: number;
  try {
    fd = engine.open(path, { write: true, create: true });
  } catch (e) {
    throw new CliError(`${path}: ${oneLine(e)}`);
  }
  try {
    if (LOCK_RANGES.some(([start, len]) => testLock(fd, start, len, 'write'))) {
      throw new CliError(`${path}: Failed to get "write" lock: is another process using the image?`);
    }
    ftruncate(fd, 0);
    ftruncate(fd, size);
  } catch (e) {
    throw e instanceof CliError ? e : new CliError(`${path}: ${oneLine(e)}`);
  } finally {
    engine.close(fd);
  }
}

export async function imgCreate(filename: string | undefined, sizeArg: string | undefined, opts: CreateOptions): Promise<void> {
  const fmt = opts.f ?? 'raw';
  if (fmt === 'qcow2') {
    if (filename === undefined) {
      if ((opts.o ?? []).some((l) => /(^|,)(help|\?)(,|$)/.test(l))) return void process.stdout.write(qcow2Help(false));
      throw new CliError('Expecting image file name');
    }
    return imgCreateQcow2(filename, sizeArg, opts);
  }
  checkCreatableFormat(fmt);
  if (opts.b !== undefined || opts.F !== undefined) throw new CliError(`Format '${fmt}' does not support backing files`);
  const o = parseCreateOptions(opts.o ?? []);
  if (o.help) {
    process.stdout.write('Supported options:\n  preallocation=<str>    - Preallocation mode (allowed values: off)\n  size=<size>            - Virtual disk size\n');
    return;
  }
  if (filename === undefined) throw new CliError('Expecting image file name');
  let size = o.size;
  if (sizeArg !== undefined) size = parseSize(sizeArg);
  if (size === undefined) throw new CliError('Image creation needs a size parameter');
  if (!opts.q) process.stdout.write(`Formatting '${filename}', fmt=${fmt} size=${size}\n`);
  createRawFile(filename, size);
}
