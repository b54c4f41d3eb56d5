/**
 * `img commit`: write everything an image (and the layers between it and the base)
 * allocates into its backing file, or into `-b base` further down the chain, then (unless
 * -d) empty the image so it reads through to the base again.
 *
 * With -b the image is left as it is, as qemu-img does. The base is reopened read-write inside the image's own chain and written through an
 * edge of its own; it grows first if the image is longer. Zero ranges become
 * write-zeroes, data is copied in chunks of up to 2 MiB. Emptying reopens the image
 * without its backing file and discards every cluster, so they become unallocated (with a
 * backing file attached a discard would leave zero clusters that hide it).
 */
import { resolve } from 'node:path';
import { attachRoot, detachRoot } from '../../block/graph.js';
import * as io from '../../block/io.js';
import type { BlockChild, BlockNode, BlockParent } from '../../block/node.js';
import { reopen } from '../../block/reopen.js';
import { Perm } from '../../block/types.js';
import { qstate } from '../../block/drivers/qcow2/state.js';
import { CliError, oneLine } from '../fail.js';
import { chainStatus } from './map.js';
import { checkCacheMode, type OpenImage } from './open.js';
import { Progress } from './progress.js';
import { combinePath } from './qcow2-info.js';
import { openWritable } from './resize.js';

export interface CommitOptions {
  f?: string;
  b?: string;
  d?: boolean;
  p?: boolean;
  q?: boolean;
  t?: string;
}

const COMMITTER: BlockParent = { parentKind: 'job', describeUser: () => 'img commit' };
const BUF = 2 << 20;

/** The layer below `top` that `-b name` names, matched as qemu-img does: by name or path. */
function findBase(top: BlockNode, topName: string, want: string): BlockNode | undefined {
  let name = topName;
  for (let n = top; n.backing; n = n.backing.node) {
    const b = n.backing.node;
    const recorded = n.driver.format === 'qcow2' ? qstate(n).header.backingFile : null;
    const shown = recorded ? combinePath(name, recorded) : b.name;
    const path = b.file?.node.options['filename'];
    if (want === recorded || want === shown || resolve(want) === resolve(shown) || (typeof path === 'string' && resolve(want) === path)) return b;
    name = shown;
  }
  return undefined;
}

async function copyDown(img: OpenImage, base: BlockNode, edge: BlockChild, progress: Progress): Promise<void> {
  const root = img.backend.root!;
  const size = io.getLength(root);
  const buf = Buffer.alloc(BUF);
  for (let off = 0; off < size; ) {
    const a = await chainStatus(root, off, Math.min(size - off, BUF), base);
    const n = a.bytes;
    // Past the end of a shorter layer above the base, the image reads zeroes: so must the base.
    const pastEnd = !a.allocated && a.zero && a.layer.backing !== undefined;
    if (a.allocated || pastEnd) {
      if (a.zero) await io.writeZeroes(edge, off, n, 0);
      else {
        await img.io.read(off, buf.subarray(0, n));
        await io.write(edge, off, buf.subarray(0, n));
      }
    }
    off += n;
    progress.update(off, size);
  }
}

export async function imgCommit(filename: string, opts: CommitOptions): Promise<void> {
  if (opts.t !== undefined) checkCacheMode(opts.t);
  const progress = new Progress(!!opts.p && !opts.q);
  const img = await openWritable({ filename, fmt: opts.f, cache: opts.t }, { shareWrites: true });
  let size: number;
  try {
    const top = img.backend.root!.node;
    if (!top.backing) throw new CliError('Image does not have a backing file');
    const base = opts.b === undefined ? top.backing.node : findBase(top, filename, opts.b);
    if (!base) throw new CliError(`Did not find '${opts.b}' in the backing chain of '${filename}'`);
    try {
      await reopen(base, { 'read-only': false });
    } catch (e) {
      throw new CliError(`Could not reopen the backing file read-write: ${oneLine(e)}`);
    }
    const edge = attachRoot(COMMITTER, base, 'root', {
      perm: Perm.CONSISTENT_READ | Perm.WRITE | Perm.RESIZE,
      shared: Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED | Perm.WRITE | Perm.RESIZE,
    });
    try {
      size = io.getLength(img.backend.root!);
      if (io.getLength(edge) < size) await io.truncate(edge, size);
      await copyDown(img, base, edge, progress);
      await io.flush(edge);
    } catch (e) {
      throw e instanceof CliError ? e : new CliError(`Block job failed: ${oneLine(e)}`);
    } finally {
      detachRoot(edge);
    }
  } finally {
    img.close();
  }
  // Like qemu-img, an explicit -b (even naming the immediate backing file) keeps the image.
  if (!opts.d && opts.b === undefined) await emptyImage(filename, opts, size);
  progress.finish();
  if (!opts.q) process.stdout.write('Image committed.\n');
}

/** Discards every cluster of the image, opened without its backing file. */
async function emptyImage(filename: string, opts: CommitOptions, size: number): Promise<void> {
  const img = await openWritable({ filename, fmt: opts.f, cache: opts.t, discardUnmap: true }, { edit: (o) => void (o['backing'] = null) });
  try {
    await img.io.discard(0, size);
    await img.io.flush();
  } catch (e) {
    throw new CliError(`Could not empty ${filename}: ${oneLine(e)}`);
  } finally {
    img.close();
  }
}
