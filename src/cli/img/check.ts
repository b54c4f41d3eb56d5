/**
 * `img check`: qemu-img check's options, output and exit codes (0 clean, 1 the check failed,
 * 2 corruptions, 3 leaks only, 63 a format without checks), so scripts keep working.
 *
 * The image is opened as its bare `file` node, never through the format driver: the driver's
 * open refuses exactly the images that most need checking.
 */
import { BlockError } from '../../block/error.js';
import { attachRoot, detachRoot, openNode, unref } from '../../block/graph.js';
import type { BlockChild, BlockNode } from '../../block/node.js';
import { Perm } from '../../block/types.js';
import { CheckFailed, checkQcow2, type CheckResult, type RepairMode } from '../../block/drivers/qcow2/check.js';
import { CliError, oneLine } from '../fail.js';
import { checkFormat, parseJsonFilename, probe } from './open.js';
import { qdictOrder } from './qdict.js';

export interface CheckCliOptions {
  f?: string;
  r?: string;
  output?: string;
  forceShare?: boolean;
  q?: boolean;
}

/** qemu-img's human summary (dump_human_image_check). */
function human(c: CheckResult): string {
  const corruptions = c.corruptions ?? 0;
  const leaks = c.leaks ?? 0;
  let out = '';
  if (!corruptions && !leaks && !c['check-errors']) out += 'No errors were found on the image.\n';
  if (corruptions) out += `\n${corruptions} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n`;
  if (leaks) out += `\n${leaks} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n`;
  if (c['check-errors']) out += `\n${c['check-errors']} internal errors have occurred during the check.\n`;
  const total = c['total-clusters'] ?? 0;
  const alloc = c['allocated-clusters'] ?? 0;
  if (total && alloc) {
    const pct = (n: number, d: number): string => ((n * 100) / d).toFixed(2);
    out += `${alloc}/${total} = ${pct(alloc, total)}% allocated, ${pct(c['fragmented-clusters'] ?? 0, alloc)}% fragmented, ${pct(c['compressed-clusters'] ?? 0, alloc)}% compressed clusters\n`;
  }
  if (c['image-end-offset']) out += `Image end offset: ${c['image-end-offset']}\n`;
  return out;
}

const JOB = { parentKind: 'job' as const, describeUser: () => 'img check' };

export async function imgCheck(filename: string, o: CheckCliOptions): Promise<void> {
  const output = o.output ?? 'human';
  if (output !== 'human' && output !== 'json') throw new CliError('--output must be used with human or json as argument.');
  let repair: RepairMode = 'none';
  if (o.r !== undefined) {
    if (o.r !== 'leaks' && o.r !== 'all') throw new CliError(`Invalid option for -r: ${o.r}`);
    repair = o.r;
  }
  if (parseJsonFilename(filename)) throw new CliError('img check takes a file name, not json: options');
  const fmt = o.f ?? probe(filename);
  checkFormat(fmt);
  const quiet = o.q === true;
  const say = (s: string): void => void (quiet ? undefined : process.stdout.write(s));

  let node: BlockNode;
  try {
    node = await openNode({ driver: 'file', filename, 'read-only': repair === 'none' });
  } catch (e) {
    throw new CliError(`Could not open '${filename}': ${oneLine(e)}`);
  }
  let edge: BlockChild;
  try {
    const perm = Perm.CONSISTENT_READ | (repair === 'none' ? 0 : Perm.WRITE | Perm.RESIZE);
    const shared = o.forceShare ? Perm.ALL : Perm.CONSISTENT_READ | Perm.WRITE_UNCHANGED;
    edge = attachRoot(JOB, node, 'root', { perm, shared });
  } catch (e) {
    throw new CliError(`Could not open '${filename}': ${oneLine(e)}`);
  } finally {
    unref(node); // the edge holds it now (or nothing does)
  }
  try {
    if (fmt !== 'qcow2') {
      process.stderr.write('spindle img: This image format does not support checks\n');
      process.exitCode = 63;
      return;
    }
    let res: CheckResult;
    try {
      res = await checkQcow2(edge, { repair, filename, log: (l) => process.stderr.write(`${l}\n`) });
    } catch (e) {
      if (e instanceof CheckFailed) throw new CliError(`Check failed: ${oneLine(e)}`);
      if (e instanceof BlockError && e.code !== 'EIO') throw new CliError(`Could not open '${filename}': ${oneLine(e)}`);
      throw e;
    }
    const leaksFixed = res['leaks-fixed'] ?? 0;
    const corruptionsFixed = res['corruptions-fixed'] ?? 0;
    if (output === 'human' && (leaksFixed || corruptionsFixed)) {
      say(`The following inconsistencies were found and repaired:\n\n    ${leaksFixed} leaked clusters\n    ${corruptionsFixed} corruptions\n\nDouble checking the fixed image now...\n`);
    }
    if (output === 'json') say(`${JSON.stringify(qdictOrder(res), null, 4)}\n`);
    else say(human(res));
    if (res['check-errors']) throw new CliError('Check failed');
    process.exitCode = res.corruptions ? 2 : res.leaks ? 3 : 0;
  } finally {
    detachRoot(edge);
  }
}
