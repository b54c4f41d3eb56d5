/**
 * qcow2 header rewrites (rebase, amend): read cluster 0, change the parsed header, and
 * write the new header, its extensions and the backing file name back in ONE write of the
 * cluster's prefix, so a crash leaves either the old header or the new one.
 *
 * The prefix written covers the old header's bytes too (padded with zeroes), so no stale
 * extension or name bytes are left behind. Extensions other than the backing format are
 * kept byte for byte; a header that no longer fits in the first cluster is refused.
 */
import { BlockError } from '../../error.js';
import * as io from '../../io.js';
import type { BlockChild } from '../../node.js';
import { EXT_BACKING_FORMAT, MAX_CLUSTER_BITS, parseHeader, serializeHeader, type Qcow2Header } from './format.js';

/** Reads and parses the header cluster through `file`. */
export async function readHeader(file: BlockChild): Promise<{ header: Qcow2Header; used: number }> {
  const len = io.getLength(file);
  let buf = Buffer.alloc(Math.min(len, 4096));
  await io.read(file, 0, buf);
  let h = parseHeader(buf);
  const cs = 2 ** h.clusterBits;
  if (cs > buf.length && len > buf.length) {
    buf = Buffer.alloc(Math.min(cs, len, 2 ** MAX_CLUSTER_BITS));
    await io.read(file, 0, buf);
    h = parseHeader(buf);
  }
  return { header: h, used: usedBytes(h) };
}

/** Bytes of cluster 0 that the header, its extensions and the backing file name occupy. */
function usedBytes(h: Qcow2Header): number {
  let end = h.headerLength;
  for (const e of h.extensions) end += 8 + Math.ceil(e.data.length / 8) * 8;
  end += 8;
  if (h.backingFileOffset) end = Math.max(end, h.backingFileOffset + h.backingFileSize);
  return end;
}

/**
 * Rewrites the header of the qcow2 image under `file` (an edge with WRITE): `change`
 * edits the parsed header in place. Returns the header as written.
 */
export async function rewriteHeader(file: BlockChild, change: (h: Qcow2Header) => void): Promise<Qcow2Header> {
  const { header: h, used } = await readHeader(file);
  change(h);
  if (!h.backingFile) h.backingFormat = null;
  // serializeHeader places the backing format extension itself.
  h.extensions = h.extensions.filter((e) => e.type !== EXT_BACKING_FORMAT);
  let bytes: Buffer;
  try {
    bytes = serializeHeader(h);
  } catch (e) {
    if (e instanceof BlockError && e.code === 'EFBIG') {
      throw new BlockError('EFBIG', `the new header (with backing file name '${h.backingFile ?? ''}') does not fit in the image's first cluster (${2 ** h.clusterBits} bytes)`);
    }
    throw e;
  }
  const out = bytes.length >= used ? bytes : Buffer.concat([bytes, Buffer.alloc(used - bytes.length)]);
  await io.flush(file); // everything the new header points at is stable first
  await io.write(file, 0, out);
  await io.flush(file);
  return h;
}
