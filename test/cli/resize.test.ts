// img resize: the same images resized by Spindle and by qemu-img read the same and pass check.
import { spawnSync } from 'node:child_process';
import { copyFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ensureBuilt, ok, qemuImg, spindle, tempDir } from './helpers.js';

const t = tempDir();
const p = (n: string): string => join(t.dir, n);

beforeAll(async () => {
  await ensureBuilt();
  ok(qemuImg('create', '-f', 'qcow2', p('z.qcow2'), '1M'));
  spawnSync('qemu-io', ['-c', 'write -P 7 0 256k', '-c', 'write -z 64k 64k', '-c', 'write -P 8 777777 5555', p('z.qcow2')]);
  ok(qemuImg('create', '-f', 'raw', p('r.raw'), '3M'));
  spawnSync('qemu-io', ['-f', 'raw', '-c', 'write -P 1 100k 5000', '-c', 'write -P 2 2M 1M', p('r.raw')]);
});
afterAll(t.cleanup);

function pair(src: string, tag: string): [string, string] {
  const ext = src.split('.').pop()!;
  const a = p(`${tag}-s.${ext}`);
  const b = p(`${tag}-q.${ext}`);
  copyFileSync(p(src), a);
  copyFileSync(p(src), b);
  return [a, b];
}

function same(a: string, b: string, fmt: string): void {
  expect(qemuImg('compare', '-f', fmt, '-F', fmt, a, b).stdout).toBe('Images are identical.\n');
  expect(qemuImg('info', '--output=json', '-f', fmt, a).stdout.replace(a, 'X').replace(/"actual-size": \d+/, ''))
    .toBe(qemuImg('info', '--output=json', '-f', fmt, b).stdout.replace(b, 'X').replace(/"actual-size": \d+/, ''));
  if (fmt === 'qcow2') expect(qemuImg('check', a).status).toBe(0);
}

describe('img resize', () => {
  for (const [tag, args] of [['plus', ['+1M']], ['abs', ['4M']], ['odd', ['1234567']]] as const) {
    it(`grows qcow2 (${args.join(' ')}) like qemu-img`, () => {
      const [a, b] = pair('z.qcow2', tag);
      const s = spindle('img', 'resize', a, ...args);
      const q = qemuImg('resize', b, ...args);
      expect(s.stdout).toBe(q.stdout);
      expect(s.status).toBe(q.status);
      if (q.status) expect(s.stderr).toBe(q.stderr.replace('qemu-img:', 'spindle img:'));
      same(a, b, 'qcow2');
    });
  }

  it('refuses to shrink without --shrink (negative SIZE needs no --)', () => {
    const [a, b] = pair('z.qcow2', 'neg');
    const s = spindle('img', 'resize', a, '-512k');
    const q = qemuImg('resize', b, '--', '-512k');
    expect(q.status).toBe(1);
    expect(s.status).toBe(1);
    expect(s.stderr).toBe('spindle img: Use the --shrink option to perform a shrink operation.\n');
    same(a, b, 'qcow2');
  });

  it('shrinks and grows raw images, with preallocation, like qemu-img', () => {
    const [a, b] = pair('r.raw', 'raw');
    for (const args of [['--shrink', '1M'], ['--preallocation=full', '2M'], ['--preallocation=falloc', '+1M'], ['+3000']]) {
      const s = spindle('img', 'resize', '-f', 'raw', ...args.slice(0, -1), a, args[args.length - 1]!);
      const q = qemuImg('resize', '-f', 'raw', ...args.slice(0, -1), b, args[args.length - 1]!);
      expect([s.stdout, s.status]).toEqual([q.stdout, q.status]);
      expect(statSync(a).size).toBe(statSync(b).size);
      same(a, b, 'raw');
    }
  });

  it('matches qemu-img errors', () => {
    const [a] = pair('r.raw', 'err');
    for (const [args, msg] of [
      [['-f', 'raw', a, '0'], 'New image size must be positive'],
      [['-f', 'raw', a, '--', '-5M'], 'New image size must be positive'],
      [['-f', 'raw', '--preallocation=bogus', a, '4M'], "Invalid preallocation mode 'bogus'"],
      [['-f', 'raw', '--preallocation=metadata', a, '4M'], 'Unsupported preallocation mode: metadata'],
      [['-f', 'raw', '--shrink', '--preallocation=full', a, '1M'], 'Preallocation can only be used for growing images'],
    ] as const) {
      const s = spindle('img', 'resize', ...args);
      const q = qemuImg('resize', ...args);
      expect(q.stderr).toContain(msg);
      expect(s.stderr).toBe(`spindle img: ${msg}\n`);
      expect(s.status).toBe(1);
    }
  });
});
