/**
 * `img resize`: grow or (with --shrink) shrink an image's virtual size, through the format
 * driver's truncate on a backend that holds the RESIZE permission. SIZE is absolute or,
 * with a leading + or -, relative to the current size; qemu-img takes it as the last
 * argument even when it looks like an option ("-1G").
 *
 * Also the shared way the data-changing commands (resize, commit, rebase, amend) open an
 * image for writing: `openWritable`.
 */
import type { BackendIO } from '../../backend/io.js';
import * as io from '../../block/io.js';
import { Perm, type NodeOptions } from '../../block/types.js';
import { CliError, oneLine } from '../fail.js';
import { imageOptions, openUnderBackend, type ImageSpec, type OpenImage } from './open.js';
import { parseSize } from './size.js';

export interface WritableOptions {
  /** Extra permissions beyond read and write (RESIZE). */
  perm?: number;
  /** Also share WRITE and RESIZE (so a backing file in the chain can be written). */
  shareWrites?: boolean;
  /** Changes to the blockdev-add options before the open (e.g. backing: null). */
  edit?: (o: NodeOptions) => void;
}

/** Opens the image read-write under an anonymous backend, as openImage does, with more say. */
export async function openWritable(spec: Omit<ImageSpec, 'readOnly'>, w: WritableOptions = {}): Promise<OpenImage> {
  const options = imageOptions({ ...spec, readOnly: false });
  w.edit?.(options);
  const perm = Perm.CONSISTENT_READ | Perm.WRITE | (w.perm ?? 0);
  const shared = spec.forceShare ? Perm.ALL : Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED | (w.shareWrites ? Perm.WRITE | Perm.RESIZE : 0);
  return openUnderBackend(spec.filename, options, { perm, shared });
}

export interface ResizeOptions {
  f?: string;
  shrink?: boolean;
  preallocation?: string;
  q?: boolean;
  forceShare?: boolean;
}

const SIZE_HELP = "Parameter 'size' expects a non-negative number below 2^64 Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta- and exabytes, respectively.";
const MODES = ['off', 'metadata', 'falloc', 'full'];

function parseNewSize(text: string, current: number): number {
  const sign = text[0] === '+' || text[0] === '-' ? text[0] : '';
  let n: number;
  try {
    n = parseSize(sign ? text.slice(1) : text);
  } catch {
    throw new CliError(SIZE_HELP);
  }
  const size = sign === '+' ? current + n : sign === '-' ? current - n : n;
  if (size <= 0) throw new CliError('New image size must be positive');
  return size;
}

/** Writes zero buffers over [from, to): preallocation=full really allocates. */
async function fillZeroes(dev: BackendIO, from: number, to: number): Promise<void> {
  const chunk = Buffer.alloc(Math.min(1 << 20, to - from));
  for (let pos = from; pos < to; pos += chunk.length) await dev.write(pos, chunk.subarray(0, Math.min(chunk.length, to - pos)));
}

export async function imgResize(filename: string, sizeText: string, opts: ResizeOptions): Promise<void> {
  const prealloc = opts.preallocation ?? 'off';
  if (!MODES.includes(prealloc)) throw new CliError(`Invalid preallocation mode '${prealloc}'`);
  const img = await openWritable({ filename, fmt: opts.f, forceShare: opts.forceShare }, { perm: Perm.RESIZE });
  try {
    const root = img.backend.root!;
    const fmt = root.node.driver.format;
    const current = io.getLength(root);
    const size = parseNewSize(sizeText, current);
    if (size < current) {
      if (!opts.shrink) throw new CliError('Use the --shrink option to perform a shrink operation.');
      if (prealloc !== 'off') throw new CliError('Preallocation can only be used for growing images');
    }
    if (prealloc !== 'off' && (fmt !== 'raw' || prealloc === 'metadata')) {
      throw new CliError(fmt === 'raw' ? `Unsupported preallocation mode: ${prealloc}` : `Preallocation mode '${prealloc}' is not supported for ${fmt} resize by Spindle yet`);
    }
    if (fmt === 'qcow2' && size % 512) throw new CliError('The new size must be a multiple of 512');
    if (size < current && fmt === 'qcow2') throw new CliError('Shrinking qcow2 images is not supported by Spindle yet');
    try {
      await io.truncate(root, size);
      if (prealloc === 'falloc' && size > current) await io.writeZeroes(root, current, size - current, 0);
      if (prealloc === 'full' && size > current) await fillZeroes(img.io, current, size);
      await img.io.flush();
    } catch (e) {
      throw new CliError(`Error resizing image: ${oneLine(e)}`);
    }
  } finally {
    img.close();
  }
  if (!opts.q) process.stdout.write('Image resized.\n');
}
