/** How Xen toolstacks name disks: vdev numbers and the backend's params key. */
import { createBackend, type BlockBackend } from '../../backend/backend.js';
import { openNode, unref } from '../../block/graph.js';
import { CliError } from '../fail.js';

/** Xen's names for disks: xvda.. (major 202, 16 minors each), or a number. */
export function parseVdev(opt: string, v: string | undefined): number {
  if (v === undefined) throw new CliError(`${opt}: Property 'vdev' is required`);
  if (/^\d+$/.test(v)) return Number(v);
  const m = /^xvd([a-z])$/.exec(v);
  if (!m) throw new CliError(`${opt}: invalid vdev '${v}' (xvda..xvdz or a number)`);
  return (202 << 8) | ((m[1]!.charCodeAt(0) - 97) << 4);
}

/** A params key as a Xen toolstack writes it: [FORMAT:]PATH, with aio: meaning raw. */
export async function openParams(params: string): Promise<BlockBackend> {
  const m = /^(aio|raw|qcow2):(.*)$/.exec(params);
  const format = !m || m[1] === 'aio' ? 'raw' : m[1]!;
  const node = await openNode({ driver: format, file: { driver: 'file', filename: m ? m[2]! : params } });
  const be = createBackend({}, node);
  unref(node);
  return be;
}
