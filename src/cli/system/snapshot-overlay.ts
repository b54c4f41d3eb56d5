/** -snapshot's temporary overlays. */
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import type { NodeOptions } from '../../block/types.js';
import { CliError } from '../fail.js';
import { imgCreateQcow2 } from '../img/create-qcow2.js';

/**
 * -snapshot: the image becomes the backing file of a temporary qcow2 overlay that takes the
 * writes and goes at exit, as QEMU's snapshot=on.
 */
export async function snapshotOverlay(file: string, o: NodeOptions, p: { scratch: string[] }): Promise<NodeOptions> {
  if (typeof o.driver !== 'string' || file.startsWith('json:')) throw new CliError(`-snapshot: '${file}' must be a plain image file`);
  const dir = mkdtempSync(join(tmpdir(), 'spindle-snapshot-'));
  p.scratch.push(dir);
  const overlay = join(dir, 'overlay.qcow2');
  await imgCreateQcow2(overlay, undefined, { q: true, b: resolve(file), F: o.driver });
  return { driver: 'qcow2', file: { driver: 'file', filename: overlay } };
}
