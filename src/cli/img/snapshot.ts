/**
 * `img snapshot`: list, create, apply and delete qcow2 internal snapshots, with qemu-img
 * 7.2's options, output and messages. Like qemu-img it never opens the backing file (the
 * operations touch this image's own tables only), so an overlay whose backing file is gone
 * still works. `-f` is Spindle's addition (qemu-img snapshot always probes).
 */
import { createBackend } from '../../backend/backend.js';
import { snapshotJson } from '../../block/drivers/qcow2/snapshot-table.js';
import { applySnapshot, createSnapshot, deleteSnapshot, listSnapshots } from '../../block/drivers/qcow2/snapshot.js';
import { BlockError } from '../../block/error.js';
import { openNode, unref } from '../../block/graph.js';
import type { BlockNode } from '../../block/node.js';
import { Perm, type NodeOptions } from '../../block/types.js';
import { CliError, oneLine } from '../fail.js';
import { imageOptions } from './open.js';
import { sizeToStr } from './size.js';

export interface SnapshotCliOptions {
  f?: string;
  q?: boolean;
  forceShare?: boolean;
  l?: boolean;
  c?: string[];
  a?: string[];
  d?: string[];
}

const pad2 = (n: number): string => String(n).padStart(2, '0');
/** C's %-Ns / %Ns count bytes, not characters. */
const padEnd = (s: string, n: number): string => s + ' '.repeat(Math.max(0, n - Buffer.byteLength(s)));
const padStart = (s: string, n: number): string => ' '.repeat(Math.max(0, n - Buffer.byteLength(s))) + s;

/** The table qemu-img prints for `snapshot -l` and `info`, from QAPI SnapshotInfo objects. Dates in local time. */
export function snapshotTable(list: readonly Record<string, unknown>[]): string {
  let out = `Snapshot list:\n${padEnd('ID', 10)}${padEnd('TAG', 17)}${padStart('VM SIZE', 8)}${padStart('DATE', 20)}${padStart('VM CLOCK', 13)}${padStart('ICOUNT', 11)}\n`;
  for (const sn of list) {
    const d = new Date((sn['date-sec'] as number) * 1000);
    const date = `${d.getFullYear()}-${pad2(d.getMonth() + 1)}-${pad2(d.getDate())} ${pad2(d.getHours())}:${pad2(d.getMinutes())}:${pad2(d.getSeconds())}`;
    const secs = sn['vm-clock-sec'] as number;
    const ms = Math.floor((sn['vm-clock-nsec'] as number) / 1e6) % 1000;
    const clock = `${pad2(Math.floor(secs / 3600))}:${pad2(Math.floor(secs / 60) % 60)}:${pad2(secs % 60)}.${String(ms).padStart(3, '0')}`;
    const icount = sn['icount'] === undefined ? '' : String(sn['icount']);
    // Rows are narrower than the header: a 16-wide tag, then a separate 8-wide size (measured on qemu-img 7.2).
    out += `${padEnd(sn['id'] as string, 9)} ${padEnd(sn['name'] as string, 16)} ${padStart(sizeToStr(sn['vm-state-size'] as number), 8)}`;
    out += `${padStart(date, 20)}${padStart(clock, 13)}${padStart(icount, 11)}\n`;
  }
  return out;
}

/** The image's node with this image's tables only (no backing), under a backend holding `perm`. */
async function openForSnapshot(filename: string, o: SnapshotCliOptions, write: boolean): Promise<{ node: BlockNode; close: () => void }> {
  const options = imageOptions({ filename, fmt: o.f, readOnly: !write });
  const noBacking = (x: NodeOptions): void => {
    if (x.driver === 'qcow2') x['backing'] = null;
  };
  noBacking(options);
  let node: BlockNode;
  try {
    node = await openNode(options);
  } catch (e) {
    const msg = oneLine(e);
    throw new CliError(msg.startsWith('Could not open') ? msg : `Could not open '${filename}': ${msg}`);
  }
  const perm = Perm.CONSISTENT_READ | (write ? Perm.WRITE : 0);
  const shared = o.forceShare ? Perm.ALL : Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED;
  let backend;
  try {
    backend = createBackend({ perm, shared }, node);
  } catch (e) {
    unref(node);
    throw new CliError(`Could not open '${filename}': ${oneLine(e)}`);
  }
  unref(node);
  const dev = { id: 'img' };
  backend.attachDevice(dev, {});
  return {
    node,
    close() {
      backend.detachDevice(dev);
      backend.unref();
    },
  };
}

const notFound = (e: unknown): boolean => e instanceof BlockError && e.code === 'ENOENT';

export async function imgSnapshot(filename: string, o: SnapshotCliOptions): Promise<void> {
  const actions = [...(o.l ? [['l', '']] : []), ...(o.c ?? []).map((n) => ['c', n]), ...(o.a ?? []).map((n) => ['a', n]), ...(o.d ?? []).map((n) => ['d', n])];
  if (actions.length > 1) throw new CliError("Cannot mix '-l', '-a', '-c', '-d'");
  const [action, name] = actions[0] ?? ['', ''];
  const img = await openForSnapshot(filename, o, action !== 'l' && action !== '');
  try {
    const qcow2 = img.node.driver.format === 'qcow2';
    if (action === 'l') {
      // Formats without internal snapshots have none to list (qemu-img prints nothing).
      const list = qcow2 ? await listSnapshots(img.node) : [];
      if (list.length) process.stdout.write(snapshotTable(list.map(snapshotJson)));
    } else if (action === 'c') {
      if (!qcow2) throw new CliError(`Could not create snapshot '${name}': -95 (Operation not supported)`);
      try {
        await createSnapshot(img.node, name);
      } catch (e) {
        throw new CliError(`Could not create snapshot '${name}': ${oneLine(e)}`);
      }
    } else if (action === 'a') {
      if (!qcow2) throw new CliError(`Could not apply snapshot '${name}': Block driver does not support snapshots`);
      try {
        await applySnapshot(img.node, name);
      } catch (e) {
        throw new CliError(`Could not apply snapshot '${name}': Failed to load snapshot: ${notFound(e) ? 'No such file or directory' : oneLine(e)}`);
      }
    } else if (action === 'd') {
      // qemu-img -d looks for names only, never IDs.
      try {
        if (!qcow2) throw new BlockError('ENOENT', 'no snapshots');
        await deleteSnapshot(img.node, name, { match: 'name' });
      } catch (e) {
        throw new CliError(`Could not delete snapshot '${name}': ${notFound(e) ? 'snapshot not found' : oneLine(e)}`);
      }
    }
  } finally {
    img.close();
  }
}
