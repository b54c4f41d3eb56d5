// img rebase, safe and unsafe: Spindle rebases one copy, qemu-img another; QEMU then
// compares the two, checks Spindle's, and reads the new backing fields.
import { copyFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ensureBuilt, ok, qcow2Chain, qemuImg, qemuIo, spindle, tempDir } from './helpers.js';

const t = tempDir();
const p = (n: string): string => join(t.dir, n);

beforeAll(async () => {
  await ensureBuilt();
  qcow2Chain(p, { base: ['write -P 0x66 2500001 777'], mid: ['write -P 0x77 1234567 4321'], top: ['write -P 0x55 4194816 1024', 'write -z 192k 64k'] });
  ok(qemuImg('create', '-f', 'qcow2', p('other.qcow2'), '3M'));
  qemuIo('qcow2', p('other.qcow2'), 'write -P 0x99 0 3M');
  ok(qemuImg('convert', '-O', 'raw', p('top.qcow2'), p('top.raw')));
});
afterAll(t.cleanup);

let n = 0;
function run(args: string[]): { a: string; b: string } {
  const a = p(`s${n}.qcow2`);
  const b = p(`q${n++}.qcow2`);
  copyFileSync(p('top.qcow2'), a);
  copyFileSync(p('top.qcow2'), b);
  const s = spindle('img', 'rebase', ...args, a);
  const q = qemuImg('rebase', ...args, b);
  expect(s.status).toBe(q.status);
  if (q.status) expect(s.stderr).toBe(q.stderr.split('\n')[0]!.replace(/^qemu-img:/, 'spindle img:') + '\n');
  else expect(s.stdout).toBe(q.stdout);
  return { a, b };
}

function backing(f: string): [unknown, unknown] {
  const info = JSON.parse(qemuImg('info', '--output=json', f).stdout) as Record<string, unknown>;
  return [info['backing-filename'], info['backing-filename-format']];
}

function sameResult(a: string, b: string): void {
  const c = qemuImg('check', a);
  expect(c.stdout).toContain('No errors were found on the image.');
  expect(qemuImg('compare', a, b).stdout).toBe('Images are identical.\n');
  expect(backing(a)).toEqual(backing(b));
}

describe('img rebase (safe)', () => {
  for (const [what, args] of [
    ['onto the base (skipping mid)', ['-b', 'base.qcow2', '-F', 'qcow2']],
    ['onto an unrelated, shorter image', ['-b', 'other.qcow2', '-F', 'qcow2']],
    ['onto the same backing file', ['-b', 'mid.qcow2', '-F', 'qcow2']],
    ['removing the backing file', ['-b', '']],
    ['onto a raw image', ['-b', 'top.raw', '-F', 'raw']],
  ] as const) {
    it(`${what}: keeps the content, as qemu-img does`, () => {
      const { a, b } = run([...args]);
      sameResult(a, b);
      expect(qemuImg('compare', a, p('top.raw')).stdout).toBe('Images are identical.\n');
    });
  }
});

describe('img rebase -u', () => {
  for (const args of [['-u', '-b', 'base.qcow2', '-F', 'qcow2'], ['-u', '-b', ''], ['-u'], ['-u', '-b', 'base.qcow2', '-F', 'raw']]) {
    it(`${args.join(' ') || '(none)'}: rewrites only the header, like qemu-img`, () => {
      const { a, b } = run(args);
      sameResult(a, b);
    });
  }

  it('keeps other header extensions byte for byte and refuses names that do not fit', () => {
    const { a } = run(['-u', '-b', 'base.qcow2', '-F', 'qcow2']);
    const before = JSON.parse(qemuImg('info', '--output=json', p('top.qcow2')).stdout) as Record<string, unknown>;
    const after = JSON.parse(qemuImg('info', '--output=json', a).stdout) as Record<string, unknown>;
    expect(after['format-specific']).toEqual(before['format-specific']);
    ok(qemuImg('create', '-f', 'qcow2', '-o', 'cluster_size=512', p('small.qcow2'), '1M'));
    const s = spindle('img', 'rebase', '-u', '-b', 'x'.repeat(600), '-F', 'qcow2', p('small.qcow2'));
    expect(s.status).toBe(1);
    expect(s.stderr).toMatch(/^spindle img: Could not change the backing file to 'x+': .*does not fit.*\n$/);
    expect(qemuImg('check', p('small.qcow2')).status).toBe(0);
  });
});

describe('img rebase errors', () => {
  for (const args of [['-b', 'base.qcow2'], [], ['-b', 'nope.qcow2', '-F', 'qcow2']]) {
    it(`${args.join(' ') || '(no -b)'}: qemu-img's message and exit code`, () => {
      const { a, b } = run(args);
      expect(qemuImg('compare', a, b).stdout).toBe('Images are identical.\n');
    });
  }
});
