// img compare against qemu-img compare: messages and exit codes on the same pairs of images.
import { copyFileSync, truncateSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ensureBuilt, ok, qcow2Chain, qemuImg, qemuIo, spindle, tempDir } from './helpers.js';

const t = tempDir();
const p = (n: string): string => join(t.dir, n);

beforeAll(async () => {
  await ensureBuilt();
  qcow2Chain(p);
  ok(qemuImg('convert', '-O', 'qcow2', p('top.qcow2'), p('flat.qcow2')));
  ok(qemuImg('convert', '-O', 'raw', p('top.qcow2'), p('flat.raw')));
  copyFileSync(p('flat.raw'), p('byte.raw'));
  qemuIo('raw', p('byte.raw'), 'write -P 9 777777 1');
  copyFileSync(p('flat.raw'), p('long.raw'));
  truncateSync(p('long.raw'), 6 << 20);
  copyFileSync(p('long.raw'), p('longdirty.raw'));
  qemuIo('raw', p('longdirty.raw'), 'write -P 9 5767169 1');
});
afterAll(t.cleanup);

const cases: [string, string[]][] = [
  ['identical chain and flat copy', ['top.qcow2', 'flat.qcow2']],
  ['identical qcow2 and raw', ['-f', 'qcow2', '-F', 'raw', 'top.qcow2', 'flat.raw']],
  ['strict: allocation differs', ['-s', 'top.qcow2', 'flat.qcow2']],
  ['strict: same image', ['-s', 'top.qcow2', 'top.qcow2']],
  ['content differs', ['mid.qcow2', 'top.qcow2']],
  ['strict: sizes differ', ['-s', 'mid.qcow2', 'top.qcow2']],
  ['one byte differs (sector offset)', ['-f', 'raw', '-F', 'raw', 'flat.raw', 'byte.raw']],
  ['quiet', ['-q', '-f', 'raw', '-F', 'raw', 'flat.raw', 'byte.raw']],
  ['longer image reads zero past the end', ['-f', 'raw', '-F', 'raw', 'flat.raw', 'long.raw']],
  ['longer image has data past the end', ['-f', 'raw', '-F', 'raw', 'longdirty.raw', 'flat.raw']],
];

describe('img compare', () => {
  for (const [what, args] of cases) {
    it(`${what}: same output and exit code as qemu-img`, () => {
      const full = args.map((a) => (a.includes('.') ? p(a) : a));
      const s = spindle('img', 'compare', ...full);
      const q = qemuImg('compare', ...full);
      expect(s.stdout).toBe(q.stdout);
      expect(s.status).toBe(q.status);
    });
  }

  it('exits 2 with one line when an image cannot be opened', () => {
    const s = spindle('img', 'compare', p('top.qcow2'), p('nope'));
    const q = qemuImg('compare', p('top.qcow2'), p('nope'));
    expect(q.status).toBe(2);
    expect(s.status).toBe(2);
    expect(s.stderr).toMatch(/^spindle img: Could not open '.*nope'/);
    expect(s.stderr.trim().split('\n')).toHaveLength(1);
  });
});
