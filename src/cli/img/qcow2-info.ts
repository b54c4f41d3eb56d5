/**
 * `img info` for qcow2 from the header alone, until the qcow2 driver can open images here:
 * the file is opened as a `file` node (so image locks behave as for any reader), its
 * first cluster parsed, and qemu-img's ImageInfo fields built from it. Replace
 * `qcow2HeaderInfo` with the driver's info hook once that exists.
 */
import { isAbsolute } from 'node:path';
import { INCOMPAT, MAX_CLUSTER_BITS, parseHeader, type Qcow2Header } from '../../block/drivers/qcow2/format.js';
import { qcow2FormatSpecific } from '../../block/drivers/qcow2/info.js';
import { readSnapshotTable, snapshotJson, type SnapshotInfo } from '../../block/drivers/qcow2/snapshot-table.js';
import { attachRoot, detachRoot, openNode, unref } from '../../block/graph.js';
import * as io from '../../block/io.js';
import type { BlockParent } from '../../block/node.js';
import { Perm } from '../../block/types.js';
import { CliError, oneLine } from '../fail.js';

/** QEMU's path_has_protocol: a ':' before any '/'. */
function hasProtocol(p: string): boolean {
  const m = /[:/]/.exec(p);
  return m !== null && m[0] === ':';
}

/**
 * A backing file name as QEMU resolves it: absolute names and protocol names as they are,
 * relative ones against the directory of the image's own name (kept relative if that is).
 */
export function combinePath(image: string, backing: string): string {
  if (isAbsolute(backing) || hasProtocol(backing)) return backing;
  const slash = image.lastIndexOf('/');
  return slash < 0 ? backing : image.slice(0, slash + 1) + backing;
}

const READER: BlockParent = { parentKind: 'job', describeUser: () => 'img info' };

export interface ImageHead {
  header: Qcow2Header;
  /** Host bytes allocated to the file. */
  actualSize: number;
  /** The internal snapshots, when asked for. */
  snapshots?: SnapshotInfo[];
}

/** Opens `path` read-only as a file node, reads and parses the qcow2 header cluster (and the snapshot table). */
export async function readImageHead(path: string, forceShare: boolean, withSnapshots = false): Promise<ImageHead> {
  const node = await openNode({ driver: 'file', filename: path, 'read-only': true });
  try {
    const edge = attachRoot(READER, node, 'root', {
      perm: Perm.CONSISTENT_READ,
      shared: forceShare ? Perm.ALL : Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED,
    });
    try {
      // The header cluster is at most the largest cluster size; smaller files are read whole.
      const buf = Buffer.alloc(Math.min(2 ** MAX_CLUSTER_BITS, io.getLength(edge)));
      await io.read(edge, 0, buf);
      const header = parseHeader(buf);
      const snapshots = withSnapshots ? (await readSnapshotTable(edge, header)).list : undefined;
      return { header, actualSize: node.driver.allocatedSize?.(node) ?? 0, snapshots };
    } finally {
      detachRoot(edge);
    }
  } finally {
    unref(node);
  }
}

/** qemu-img's ImageInfo for a qcow2 image at `filename` (a path, not a json: name). */
export async function qcow2HeaderInfo(filename: string, forceShare: boolean): Promise<Record<string, unknown>> {
  let head: ImageHead;
  try {
    head = await readImageHead(filename, forceShare, true);
  } catch (e) {
    const msg = oneLine(e);
    if (/bad magic|too short for a header/.test(msg)) throw new CliError(`Could not open '${filename}': Image is not in qcow2 format`);
    throw new CliError(msg.startsWith('Could not open') ? msg : `Could not open '${filename}': ${msg}`);
  }
  const h = head.header;
  const info: Record<string, unknown> = {
    'virtual-size': h.size,
    filename,
    'cluster-size': 2 ** h.clusterBits,
    format: 'qcow2',
    'actual-size': head.actualSize,
    'format-specific': qcow2FormatSpecific(h),
    'dirty-flag': (h.incompatible & INCOMPAT.DIRTY) !== 0n,
  };
  if (h.cryptMethod) info['encrypted'] = true;
  if (head.snapshots?.length) info['snapshots'] = head.snapshots.map(snapshotJson);
  if (h.backingFile) {
    info['backing-filename'] = h.backingFile;
    info['full-backing-filename'] = combinePath(filename, h.backingFile);
    if (h.backingFormat) info['backing-filename-format'] = h.backingFormat;
  }
  return info;
}
