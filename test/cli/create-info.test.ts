// img create and img info, checked against qemu-img on the same files.
import { closeSync, openSync, statSync, truncateSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ensureBuilt, ok, qemuImg, spindle, tempDir } from './helpers.js';

const t = tempDir();
beforeAll(ensureBuilt);
afterAll(t.cleanup);

/** Writes `n` bytes of non-zero data at `offset`. */
function scribble(path: string, offset: number, n: number): void {
  const fd = openSync(path, 'r+');
  writeSync(fd, Buffer.alloc(n, 0x6b), 0, n, offset);
  closeSync(fd);
}

describe('img create', () => {
  it('prints the Formatting line and makes a file of that size, like qemu-img', () => {
    for (const size of ['64M', '1.5G', '512k', '4096', '0x2000', '3K', '1T']) {
      const a = join(t.dir, 'sp.img');
      const b = join(t.dir, 'qemu.img');
      const r = ok(spindle('img', 'create', '-f', 'raw', a, size));
      const q = ok(qemuImg('create', '-f', 'raw', b, size));
      expect(r.stdout).toBe(q.stdout.replace(b, a));
      expect(statSync(a).size).toBe(statSync(b).size);
    }
  });

  it('takes the size from -o size=', () => {
    const a = join(t.dir, 'o.img');
    ok(spindle('img', 'create', '-o', 'size=2M', a));
    expect(statSync(a).size).toBe(2 << 20);
  });
});

describe('img info', () => {
  const img = join(t.dir, 'info.img');
  beforeAll(() => {
    ok(spindle('img', 'create', img, '64M'));
    scribble(img, 1 << 20, 3 << 20);
  });

  it('--output=json has exactly qemu-img\'s keys and values', () => {
    const mine = JSON.parse(ok(spindle('img', 'info', '--output=json', img)).stdout);
    const theirs = JSON.parse(ok(qemuImg('info', '--output=json', img)).stdout);
    expect(Object.keys(mine)).toEqual(Object.keys(theirs));
    for (const k of ['virtual-size', 'filename', 'format', 'dirty-flag']) expect(mine[k]).toEqual(theirs[k]);
    expect(mine['actual-size']).toBeGreaterThanOrEqual(3 << 20);
    expect(Math.abs(mine['actual-size'] - theirs['actual-size'])).toBeLessThanOrEqual(64 << 10);
  });

  it('human output matches qemu-img line for line', () => {
    const mine = ok(spindle('img', 'info', '-f', 'raw', img)).stdout;
    expect(mine).toMatch(/^image: .*\nfile format: raw\nvirtual size: 64 MiB \(67108864 bytes\)\ndisk size: 3 MiB\n$/);
    expect(mine).toBe(ok(qemuImg('info', '-f', 'raw', img)).stdout);
  });

  it('formats sizes as qemu-img does', () => {
    const f = join(t.dir, 'sizes.img');
    for (const n of [0, 512, 1000 * 1024, 1023 * 1024, 1536 * 1024, 999 * 1024 * 1024, 1000 * 1024 * 1024, 5 * 2 ** 40 + 2 ** 39]) {
      writeFileSync(f, '');
      truncateSync(f, n);
      const line = (s: string) => s.split('\n').find((l) => l.startsWith('virtual size:'));
      expect(line(ok(spindle('img', 'info', '-f', 'raw', f)).stdout)).toBe(line(ok(qemuImg('info', '-f', 'raw', f)).stdout));
    }
  });

  it('reads json: filenames', () => {
    const name = 'json:{"driver":"null-co","size":1073741824}';
    const mine = JSON.parse(ok(spindle('img', 'info', '--output=json', name)).stdout);
    const theirs = JSON.parse(ok(qemuImg('info', '--output=json', name)).stdout);
    expect(mine).toEqual(theirs);
  });

  it('is refused while another process writes the image, and allowed with -U', async () => {
    const { spawn } = await import('node:child_process');
    // qemu-io holds the image open for writing until it quits; its answer to 'length'
    // says the image is open.
    const holder = spawn('qemu-io', ['-f', 'raw', img], { stdio: ['pipe', 'pipe', 'pipe'] });
    let out = '';
    const opened = new Promise<void>((resolve) => holder.stdout.on('data', (d: Buffer) => (out += d) && /MiB/.test(out) && resolve()));
    holder.stdin.write('length\n');
    await opened;
    try {
      const r = spindle('img', 'info', img);
      expect(r.status).toBe(1);
      expect(r.stderr).toMatch(/^spindle img: .*lock.*\n$/);
      ok(spindle('img', 'info', '-U', img));
    } finally {
      holder.stdin.end('quit\n');
      await new Promise((r) => holder.once('exit', r));
    }
  });
});
