/**
 * `img rebase`: give a qcow2 image a new backing file (or none, with -b "").
 *
 * Unsafe mode (-u) only rewrites the header's backing file name and format. Safe mode
 * keeps what the image reads: for every range the image itself does not allocate, the data
 * of the old backing chain is compared with the new backing file's, 512 bytes at a time,
 * and where they differ the old data is written into the image; then the header is
 * rewritten. The header is written in one write of cluster 0 (drivers/qcow2/rebase.ts),
 * after the copied data is flushed.
 */
import { rewriteHeader } from '../../block/drivers/qcow2/rebase.js';
import { attachRoot, detachRoot, openNode, unref } from '../../block/graph.js';
import * as io from '../../block/io.js';
import type { BlockChild, BlockNode, BlockParent } from '../../block/node.js';
import { Perm } from '../../block/types.js';
import { CliError, oneLine } from '../fail.js';
import { chainStatus } from './map.js';
import { checkCacheMode, parseJsonFilename, probe, type OpenImage } from './open.js';
import { Progress } from './progress.js';
import { combinePath } from './qcow2-info.js';
import { openWritable } from './resize.js';

export interface RebaseOptions {
  f?: string;
  F?: string;
  b?: string;
  u?: boolean;
  p?: boolean;
  q?: boolean;
  t?: string;
  T?: string;
  forceShare?: boolean;
}

const REBASER: BlockParent = { parentKind: 'job', describeUser: () => 'img rebase' };
const BUF = 2 << 20;
const SECTOR = 512;

/** Opens the new backing file read-only (with its own backing chain) and takes an edge to it. */
async function openNewBacking(image: string, name: string, fmt: string): Promise<BlockChild> {
  const path = combinePath(image, name);
  let node: BlockNode;
  try {
    node = await openNode({ driver: fmt, 'read-only': true, file: { driver: 'file', filename: path, 'read-only': true } });
  } catch (e) {
    let msg = oneLine(e);
    if (!msg.startsWith('Could not open')) msg = `Could not open '${path}': ${msg}`;
    throw new CliError(`Could not open new backing file '${name}': ${msg}`);
  }
  try {
    return attachRoot(REBASER, node, 'root', { perm: Perm.CONSISTENT_READ, shared: Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED });
  } finally {
    unref(node);
  }
}

/** Writes the old chain's data wherever the image reads through and the new backing differs. */
async function copyDifferences(img: OpenImage, next: BlockChild | null, progress: Progress): Promise<void> {
  const root = img.backend.root!;
  const size = io.getLength(root);
  const newLen = next ? io.getLength(next) : 0;
  const oldBuf = Buffer.alloc(BUF);
  const newBuf = Buffer.alloc(BUF);
  for (let off = 0; off < size; ) {
    const own = await io.blockStatus(root, off, Math.min(size - off, BUF));
    let n = own.bytes;
    if (!own.allocated) {
      const old = await chainStatus(root, off, n);
      n = old.bytes;
      const fresh = next && off < newLen ? await chainStatus(next, off, Math.min(n, newLen - off)) : null;
      if (fresh) n = fresh.bytes;
      if (!(old.zero && (fresh === null || fresh.zero))) await copyChunk(img, next, off, n, newLen, oldBuf, newBuf);
    }
    off += n;
    progress.update(off, size);
  }
}

async function copyChunk(img: OpenImage, next: BlockChild | null, off: number, n: number, newLen: number, oldBuf: Buffer, newBuf: Buffer): Promise<void> {
  await img.io.read(off, oldBuf.subarray(0, n));
  newBuf.fill(0, 0, n);
  if (next && off < newLen) await io.read(next, off, newBuf.subarray(0, Math.min(n, newLen - off)));
  let runStart = -1;
  for (let s = 0; s <= n; s += SECTOR) {
    const e = Math.min(n, s + SECTOR);
    const differs = s < n && oldBuf.compare(newBuf, s, e, s, e) !== 0;
    if (differs && runStart < 0) runStart = s;
    if (!differs && runStart >= 0) {
      await img.io.write(off + runStart, oldBuf.subarray(runStart, s));
      runStart = -1;
    }
  }
}

export async function imgRebase(filename: string, opts: RebaseOptions): Promise<void> {
  if (opts.b === undefined && !opts.u) throw new CliError('Must specify backing file (-b) or use unsafe mode (-u)');
  const name = opts.b ?? '';
  const remove = name === '';
  if (!remove && !opts.F) throw new CliError(`Could not change the backing file to '${name}': backing format must be specified`);
  if (opts.t !== undefined) checkCacheMode(opts.t);
  if (opts.T !== undefined) checkCacheMode(opts.T);
  const fmt = opts.f ?? (parseJsonFilename(filename) ? undefined : probe(filename));
  if (fmt !== undefined && fmt !== 'qcow2') throw new CliError(`Could not change the backing file to '${name}': Operation not supported`);
  const img = await openWritable(
    { filename, fmt: 'qcow2', cache: opts.t, forceShare: opts.forceShare },
    { edit: opts.u ? (o) => void (o['backing'] = null) : undefined },
  );
  let next: BlockChild | null = null;
  try {
    const progress = new Progress(!!opts.p && !opts.q);
    if (!opts.u) {
      if (!remove) next = await openNewBacking(filename, name, opts.F!);
      await copyDifferences(img, next, progress);
      await img.io.flush();
    }
    try {
      await rewriteHeader(img.node.file!, (h) => {
        h.backingFile = remove ? null : name;
        h.backingFormat = remove ? null : opts.F!;
      });
    } catch (e) {
      throw new CliError(`Could not change the backing file to '${name}': ${oneLine(e)}`);
    }
    progress.finish();
  } finally {
    if (next) detachRoot(next);
    img.close();
  }
}
