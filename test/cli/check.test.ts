// `spindle img check` against `qemu-img check`: the same stdout (human and JSON, key order
// included), the same per-problem lines on stderr, the same exit codes, and repairs after which
// qemu-img finds nothing and the data reads the same.
import { spawnSync } from 'node:child_process';
import { copyFileSync, writeFileSync, openSync, readFileSync, readSync, closeSync, writeSync, ftruncateSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ensureBuilt, qemuImg, spindle, tempDir, type Run } from './helpers.js';

const { dir, cleanup } = tempDir();
beforeAll(ensureBuilt, 120_000);
afterAll(cleanup);

function q(...args: string[]): Run {
  return qemuImg(...args);
}
function io(path: string, ...cmds: string[]): void {
  const args = ['-f', 'qcow2'];
  for (const c of cmds) args.push('-c', c);
  const r = spawnQemuIo([...args, path]);
  if (r !== 0) throw new Error(`qemu-io ${cmds.join('; ')} failed`);
}
function spawnQemuIo(args: string[]): number | null {
  return spawnSync('qemu-io', args, { encoding: 'utf8' }).status;
}

/** Reads/writes big-endian u64s and refcounts (16-bit, the default) in an image. */
function u64(p: string, off: number): bigint {
  const fd = openSync(p, 'r');
  const b = Buffer.alloc(8);
  readSync(fd, b, 0, 8, off);
  closeSync(fd);
  return b.readBigUInt64BE(0);
}
function put(p: string, off: number, b: Buffer): void {
  const fd = openSync(p, 'r+');
  writeSync(fd, b, 0, b.length, off);
  closeSync(fd);
}
const CS = 65536;
function setRc(p: string, cluster: number, v: number): void {
  const block = Number(u64(p, Number(u64(p, 48))) & ~0x1ffn);
  const b = Buffer.alloc(2);
  b.writeUInt16BE(v);
  put(p, block + cluster * 2, b);
}
function l2pos(p: string, g: number): number {
  return Number(u64(p, Number(u64(p, 40))) & 0x00fffffffffffe00n) + g * 8;
}
function host(p: string, g: number): number {
  return Number(u64(p, l2pos(p, g)) & 0x00fffffffffffe00n);
}

let n = 0;
function image(damage?: (p: string) => void): string {
  const p = join(dir, `i${n++}.qcow2`);
  q('create', '-q', '-f', 'qcow2', p, '64M');
  io(p, 'write -P 1 0 128k', 'write -P 2 10M 64k');
  damage?.(p);
  return p;
}
const leaky = (p: string) => {
  setRc(p, 1, 2); // the refcount table: metadata, so no COPIED flag disagrees
  const fd = openSync(p, 'r+');
  ftruncateSync(fd, 9 * CS);
  closeSync(fd);
  setRc(p, 8, 1);
};
const corrupt = (p: string) => {
  setRc(p, host(p, 1) / CS, 0);
  const e = l2pos(p, 160);
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(u64(p, e) & ~(1n << 63n));
  put(p, e, b);
};
const pastEof = (p: string) => {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE((1n << 63n) | 0x10000000n);
  put(p, l2pos(p, 1), b);
};

/**
 * The two tools' runs on copies of one image: same stdout and status. After a repair the end
 * offset may differ: qemu-img rebuilds the refcount structure for a stored 0, Spindle raises it
 * in place.
 */
function same(p: string, ...args: string[]): { ours: Run; theirs: Run; mine: string; qemu: string } {
  const norm = (s: string, f: string) => {
    const t = s.replaceAll(f, 'IMG');
    return args.includes('-r') ? t.replace(/Image end offset: \d+/, 'Image end offset: N').replace(/"image-end-offset": \d+/, '"image-end-offset": N') : t;
  };
  const mine = `${p}.s`;
  const qemu = `${p}.q`;
  copyFileSync(p, mine);
  copyFileSync(p, qemu);
  const ours = spindle('img', 'check', ...args, mine);
  const theirs = q('check', ...args, qemu);
  expect(norm(ours.stdout, mine)).toBe(norm(theirs.stdout, qemu));
  expect(ours.status).toBe(theirs.status);
  return { ours, theirs, mine, qemu };
}

describe('spindle img check', () => {
  it('reports a clean image like qemu-img (human, json, exit 0)', () => {
    const p = image();
    const r = same(p);
    expect(r.ours.stdout).toMatch(/^No errors were found on the image\.\n3\/1024 = 0\.29% allocated, 0\.00% fragmented, 0\.00% compressed clusters\nImage end offset: 524288\n$/);
    same(p, '--output=json');
    same(p, '-f', 'qcow2', '--output', 'json');
    expect(spindle('img', 'check', '-q', p)).toMatchObject({ status: 0, stdout: '' });
  });

  it.each([
    ['leaks', leaky, 3],
    ['corruptions', corrupt, 2],
    ['a reference past the end of the file', pastEof, 2],
  ] as const)('reports %s like qemu-img', (_name, damage, status) => {
    const p = image(damage);
    const r = same(p);
    expect(r.ours.status).toBe(status);
    expect(r.ours.stderr.split('\n').sort()).toEqual(r.theirs.stderr.split('\n').sort());
    same(p, '--output=json');
  });

  it('prints the per-cluster lines qemu-img prints', () => {
    const r = same(image(leaky));
    expect(r.ours.stderr).toContain('Leaked cluster 1 refcount=2 reference=1');
    expect(r.ours.stdout).toContain('2 leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n');
    const c = same(image(corrupt));
    expect(c.ours.stderr).toContain('ERROR cluster 6 refcount=0 reference=1');
    expect(c.ours.stdout).toContain('\n3 errors were found on the image.\n');
  });

  it.each([
    ['leaks', 'leaks', leaky],
    ['leaks', 'all', leaky],
    ['corruptions', 'all', corrupt],
    ['corruptions', 'leaks', corrupt],
    ['a reference past the end of the file', 'all', pastEof],
  ] as const)('repairs %s with -r %s like qemu-img', (_name, mode, damage) => {
    const p = image(damage);
    const raw = `${p}.raw`;
    q('convert', '-O', 'raw', p, raw);
    for (const output of ['human', 'json']) {
      const r = same(p, '-r', mode, `--output=${output}`);
      if (r.ours.status === 1) {
        expect(r.ours.stderr).toContain('spindle img: Check failed: Input/output error');
        continue;
      }
      const after = q('check', r.mine);
      expect(after.status).toBe(r.theirs.status);
      if (after.status === 0) expect(after.stdout).toContain('No errors were found on the image.');
      q('convert', '-O', 'raw', r.mine, `${raw}2`);
      expect(readFileSync(`${raw}2`).equals(readFileSync(raw))).toBe(true);
    }
  });

  it('writes nothing when repairing a clean image', () => {
    const p = image();
    const before = readFileSync(p);
    expect(spindle('img', 'check', '-r', 'all', p).status).toBe(0);
    expect(readFileSync(p).equals(before)).toBe(true);
  });

  it('refuses raw images as qemu-img does (exit 63)', () => {
    const p = join(dir, 'disk.raw');
    writeFileSync(p, Buffer.alloc(65536));
    for (const args of [['-f', 'raw'], []]) {
      const r = spindle('img', 'check', ...args, p);
      expect(r.status).toBe(63);
      expect(r.stderr).toBe('spindle img: This image format does not support checks\n');
      expect(q('check', ...args, p).status).toBe(63);
    }
  });

  it('fails cleanly on bad arguments and missing files', () => {
    const p = image();
    expect(spindle('img', 'check', '-r', 'some', p)).toMatchObject({ status: 1 });
    expect(spindle('img', 'check', '--output=xml', p)).toMatchObject({ status: 1 });
    const missing = spindle('img', 'check', '-f', 'qcow2', join(dir, 'nope.qcow2'));
    expect(missing.status).toBe(1);
    expect(missing.stderr).toMatch(/^spindle img: Could not open/);
    expect(spindle('img', 'check', '-U', p).status).toBe(0);
  });
});
