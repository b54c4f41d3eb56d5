// img map, checked against qemu-img map on the same images: a 3-deep qcow2 chain with data
// at odd offsets, zero clusters (with and without their allocation), discards, a raw image.
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ensureBuilt, ok, qcow2Chain, qemuImg, qemuIo, spindle, tempDir } from './helpers.js';

const t = tempDir();
const p = (n: string): string => join(t.dir, n);

beforeAll(async () => {
  await ensureBuilt();
  qcow2Chain(p, { base: ['write -P 0x66 2500001 777'], mid: ['write -P 0x77 1234567 4321'], top: ['write -P 0x55 4194816 1024', 'write -P 0x12 192k 128k', 'write -z 192k 64k', 'write -z -u 256k 64k'] });
  ok(qemuImg('create', '-f', 'qcow2', p('empty.qcow2'), '0'));
  ok(qemuImg('create', '-f', 'raw', p('r.raw'), '3M'));
  qemuIo('raw', p('r.raw'), 'write -P 1 100k 5000', 'write -P 2 2M 1M');
});
afterAll(t.cleanup);

function both(...args: string[]): { s: string; q: string } {
  const s = ok(spindle('img', 'map', ...args)).stdout;
  const q = ok(qemuImg('map', ...args)).stdout;
  return { s, q };
}

describe('img map', () => {
  for (const img of ['top.qcow2', 'mid.qcow2', 'base.qcow2', 'empty.qcow2']) {
    it(`--output=json of ${img} parses to qemu-img's list`, () => {
      const { s, q } = both('--output=json', p(img));
      expect(JSON.parse(s)).toEqual(JSON.parse(q));
      expect(s).toBe(q); // the same line layout too
    });
    it(`human output of ${img} is qemu-img's`, () => {
      const { s, q } = both(p(img));
      expect(s).toBe(q);
    });
  }

  it('counts depth through the chain and marks zero clusters that keep their allocation', () => {
    const list = JSON.parse(ok(spindle('img', 'map', '--output=json', p('top.qcow2'))).stdout) as { depth: number; zero: boolean; offset?: number }[];
    expect(new Set(list.map((e) => e.depth))).toEqual(new Set([0, 1, 2]));
    expect(list.some((e) => e.zero && e.depth === 0 && e.offset !== undefined)).toBe(true);
  });

  it('maps raw images (holes are zero, offsets are the guest offsets)', () => {
    for (const out of ['json', 'human']) {
      const { s, q } = both('-f', 'raw', `--output=${out}`, p('r.raw'));
      expect(s).toBe(q);
    }
  });

  it('honours --start-offset and --max-length, also past the end', () => {
    for (const [start, len] of [['70000', '1000000'], ['3000000', '1234567'], ['6M', '1M'], ['0', '0']]) {
      const { s, q } = both('--output=json', '--start-offset', start!, '--max-length', len!, p('top.qcow2'));
      expect(JSON.parse(s)).toEqual(JSON.parse(q));
    }
  });

  it('refuses a bad --output or offset with exit 1 and one line', () => {
    for (const args of [['--output=xml'], ['--start-offset=-1']]) {
      const r = spindle('img', 'map', ...args, p('top.qcow2'));
      expect(r.status).toBe(1);
      expect(r.stderr.trim().split('\n')).toHaveLength(1);
      expect(r.stderr).toMatch(/^spindle img: /);
    }
  });
});
