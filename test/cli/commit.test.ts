// img commit: Spindle commits one copy of a 3-deep chain, qemu-img another; QEMU compares
// every layer pairwise, checks Spindle's, and compares what the emptied image maps to.
import { copyFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ensureBuilt, ok, qcow2Chain, qemuImg, spindle, tempDir } from './helpers.js';

const t = tempDir();
const p = (n: string): string => join(t.dir, n);

beforeAll(async () => {
  await ensureBuilt();
  qcow2Chain(p, { base: ['write -P 0x66 3500001 777'], mid: ['write -P 0x77 1234567 4321'], top: ['write -P 0x55 4194816 1024', 'write -z 1000k 64k', 'write -P 0x56 12345 6789'], midSize: '3M' });
});
afterAll(t.cleanup);

let n = 0;
/** Copies the chain under a new prefix, rewiring the backing names (as qemu-img rebase -u). */
function chain(): string {
  const pre = `c${n++}`;
  for (const l of ['base', 'mid', 'top']) copyFileSync(p(`${l}.qcow2`), p(`${pre}${l}.qcow2`));
  ok(qemuImg('rebase', '-u', '-b', `${pre}mid.qcow2`, '-F', 'qcow2', p(`${pre}top.qcow2`)));
  ok(qemuImg('rebase', '-u', '-b', `${pre}base.qcow2`, '-F', 'qcow2', p(`${pre}mid.qcow2`)));
  return pre;
}

function compareRuns(args: (pre: string) => string[]): void {
  const s = chain();
  const q = chain();
  const before = p(`${s}before.raw`);
  ok(qemuImg('convert', '-O', 'raw', p(`${s}top.qcow2`), before));
  const rs = spindle('img', 'commit', ...args(s), p(`${s}top.qcow2`));
  const rq = qemuImg('commit', ...args(q), p(`${q}top.qcow2`));
  expect([rs.stdout, rs.status]).toEqual([rq.stdout, rq.status]);
  if (rq.status) expect(rs.stderr).toBe(rq.stderr.replace(/^qemu-img:/, 'spindle img:').replaceAll(q, s));
  for (const l of ['top', 'mid', 'base']) {
    expect(qemuImg('check', p(`${s}${l}.qcow2`)).stdout).toContain('No errors were found on the image.');
    expect(qemuImg('compare', p(`${s}${l}.qcow2`), p(`${q}${l}.qcow2`)).stdout).toBe('Images are identical.\n');
    const info = (pre: string): unknown => (JSON.parse(qemuImg('info', '--output=json', p(`${pre}${l}.qcow2`)).stdout) as Record<string, unknown>)['virtual-size'];
    expect(info(s)).toBe(info(q));
  }
  if (!rq.status) expect(qemuImg('compare', p(`${s}top.qcow2`), before).stdout).toBe('Images are identical.\n');
  // What the committed image still allocates itself.
  const own = (pre: string): unknown => (JSON.parse(qemuImg('map', '--output=json', p(`${pre}top.qcow2`)).stdout) as { depth: number; start: number; length: number }[])
    .filter((e) => e.depth === 0).map((e) => [e.start, e.length]);
  expect(own(s)).toEqual(own(q));
}

describe('img commit', () => {
  it('into the immediate backing file (grown to fit), emptying the image', () => compareRuns(() => []));
  it('with -d: the image keeps its data', () => compareRuns(() => ['-d']));
  it('with -b base: down two layers, the image is kept', () => compareRuns((pre) => ['-b', `${pre}base.qcow2`]));
  it('with -b naming the immediate backing file', () => compareRuns((pre) => ['-b', `${pre}mid.qcow2`]));
  it('with a -b not in the chain: qemu-img\'s error', () => compareRuns(() => ['-b', 'nope.qcow2']));

  it('refuses an image without a backing file', () => {
    const s = spindle('img', 'commit', p('base.qcow2'));
    expect(s.status).toBe(1);
    expect(s.stderr).toBe('spindle img: Image does not have a backing file\n');
  });
});
