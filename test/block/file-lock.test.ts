// Image locking (file-lock.ts) against Debian's qemu-io as a real peer, and within one process.
import { spawn, spawnSync, type ChildProcessWithoutNullStreams } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { createBackend, type BlockBackend } from '../../src/backend/backend.js';
import { BlockError } from '../../src/block/error.js';
import { openNode, settleCloses, unref } from '../../src/block/graph.js';
import { Perm, type NodeOptions } from '../../src/block/types.js';
import { pattern, scratchDir } from '../helpers/tmp.js';

const dir = scratchDir('spindle-lock-');
let n = 0;
function img(): string {
  const p = join(dir, `l${n++}.img`);
  writeFileSync(p, Buffer.alloc(1 << 20));
  return p;
}

function run(cmd: string, args: string[]): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync(cmd, args, { encoding: 'utf8', timeout: 20_000 });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}
const qemuIo = (...args: string[]) => run('qemu-io', args);
/** qemu-img convert reads its source without sharing writes (BDRV_O_NO_SHARE); -U shares them. */
const convert = (path: string, ...opts: string[]) => run('qemu-img', ['convert', ...opts, '-f', 'raw', '-O', 'raw', path, `${path}.copy`]);

const raw = (path: string, file: Partial<NodeOptions> = {}): NodeOptions =>
  ({ driver: 'raw', file: { driver: 'file', filename: path, ...file } });

const backends: BlockBackend[] = [];
/** Opens raw-over-file and puts an anonymous backend on it (default perms: read + write). */
async function attach(o: NodeOptions, perm?: { perm: number; shared: number }): Promise<BlockBackend> {
  const node = await openNode(o);
  try {
    const b = createBackend(perm ?? {}, node);
    backends.push(b);
    return b;
  } finally {
    unref(node);
  }
}
async function release(b: BlockBackend): Promise<void> {
  backends.splice(backends.indexOf(b), 1);
  b.unref();
  await settleCloses();
}
afterEach(async () => {
  for (const b of backends.splice(0)) b.unref();
  await settleCloses();
});

async function refused(p: Promise<unknown>, ...parts: string[]): Promise<BlockError> {
  const e = await p.then(() => null, (x: unknown) => x);
  expect(e, 'the open should have been refused').toBeInstanceOf(BlockError);
  for (const s of parts) expect((e as Error).message).toContain(s);
  return e as BlockError;
}

describe('image locking against qemu-io', () => {
  it('a Spindle writer keeps qemu-io from writing and qemu-img from reading (unless -U)', async () => {
    const path = img();
    const b = await attach(raw(path));
    const dev = { id: 'lock-dev' };
    const bio = b.attachDevice(dev);
    const ours = pattern(4096, 7);
    await bio.write(0, ours);
    await bio.flush();

    const w = qemuIo('-f', 'raw', '-c', 'write -P 0x55 0 4k', path);
    expect(w.status).not.toBe(0);
    expect(w.stderr).toContain('Failed to get "write" lock');
    expect(readFileSync(path).subarray(0, 4096).equals(ours)).toBe(true);

    // qemu-io (7.2) shares every permission, so a plain read-only qemu-io may read...
    const r = qemuIo('-r', '-f', 'raw', '-c', 'read -P 0 4k 4k', path);
    expect(r.stderr).toBe('');
    expect(r.stdout).toContain('read 4096/4096 bytes at offset 4096');
    // ...but qemu-img convert reads without sharing writes: it is refused unless -U.
    const c = convert(path);
    expect(c.status).not.toBe(0);
    expect(c.stderr).toContain('Failed to get shared "write" lock');
    const u = convert(path, '-U');
    expect(u.stderr).toBe('');
    expect(u.status).toBe(0);
    expect(readFileSync(`${path}.copy`).subarray(0, 4096).equals(ours)).toBe(true);
    const uio = qemuIo('-r', '-U', '-f', 'raw', '-c', 'read -P 0 4k 4k', path);
    expect(uio.status).toBe(0);

    b.detachDevice(dev);
    await release(b);
    const after = qemuIo('-f', 'raw', '-c', 'write -P 0x55 0 4k', path);
    expect(after.stderr).toBe('');
    expect(after.status).toBe(0);
    expect(readFileSync(path).subarray(0, 4096).equals(Buffer.alloc(4096, 0x55))).toBe(true);
    expect(convert(path).status).toBe(0);
  });

  it('a Spindle reader that shares writes does not block qemu-io', async () => {
    const path = img();
    const b = await attach(raw(path), { perm: Perm.CONSISTENT_READ, shared: Perm.ALL });
    const w = qemuIo('-f', 'raw', '-c', 'write -P 0x66 0 4k', path);
    expect(w.stderr).toBe('');
    expect(w.status).toBe(0);
    await release(b);
  });

  it('Spindle cannot take write while qemu-io holds the image, and can once it quits', async () => {
    const path = img();
    const q: ChildProcessWithoutNullStreams = spawn('qemu-io', ['-f', 'raw', path]);
    let out = '';
    let err = '';
    q.stderr.on('data', (d: Buffer) => (err += d.toString()));
    const exited = new Promise<number | null>((res) => q.on('exit', (code) => res(code)));
    try {
      await new Promise<void>((resolve, reject) => {
        q.stdout.on('data', (d: Buffer) => {
          out += d.toString();
          if (out.includes('read 512/512 bytes at offset 0')) resolve();
        });
        q.on('exit', () => reject(new Error(`qemu-io exited early: ${err}`)));
        q.stdin.write('read 0 512\n');
      });

      const e = await refused(attach(raw(path)), 'Failed to get', 'lock', path);
      expect(e.code).toBe('EAGAIN');
      // Refused while qemu-io keeps its image: a read-only user sharing writes is fine.
      const ro = await attach(raw(path), { perm: Perm.CONSISTENT_READ, shared: Perm.ALL });
      await release(ro);
      // A reader that does not share writes conflicts with qemu-io's write permission.
      await refused(attach(raw(path), { perm: Perm.CONSISTENT_READ, shared: Perm.CONSISTENT_READ }), 'Failed to get shared "write" lock');

      q.stdin.write('quit\n');
      expect(await exited).toBe(0);
    } finally {
      if (q.exitCode === null) q.kill();
    }
    const b = await attach(raw(path));
    expect(b.root!.perm & Perm.WRITE).toBe(Perm.WRITE);
    await release(b);
  });
});

describe('image locking inside one process', () => {
  it('two opens of one file conflict like two processes (OFD locks)', async () => {
    const path = img();
    const first = await attach(raw(path));
    await refused(attach(raw(path)), 'Failed to get "write" lock', path);
    await refused(attach(raw(path), { perm: Perm.CONSISTENT_READ, shared: Perm.CONSISTENT_READ }), 'Failed to get shared "write" lock');
    // The refused attempts left nothing behind: once the first lets go, a writer gets in.
    await release(first);
    const second = await attach(raw(path));
    expect(qemuIo('-f', 'raw', '-c', 'write 0 4k', path).stderr).toContain('Failed to get "write" lock');
    await release(second);
  });

  it('locking=off neither takes nor checks locks', async () => {
    const path = img();
    const first = await attach(raw(path));
    const unlocked = await attach(raw(path, { locking: 'off' }));
    expect(unlocked.root!.perm & Perm.WRITE).toBe(Perm.WRITE);
    await release(first);
    // Only the unlocked writer is left: qemu-io sees no lock at all.
    const w = qemuIo('-f', 'raw', '-c', 'write 0 4k', path);
    expect(w.stderr).toBe('');
    expect(w.status).toBe(0);
    await release(unlocked);
  });

  it('a permission change that is refused keeps the old locks', async () => {
    const path = img();
    const reader = await attach(raw(path), { perm: Perm.CONSISTENT_READ, shared: Perm.ALL });
    const other = await attach(raw(path), { perm: Perm.CONSISTENT_READ, shared: Perm.CONSISTENT_READ });
    // `reader` now wants write, but `other` does not share it.
    expect(() => reader.setPerm({ perm: Perm.CONSISTENT_READ | Perm.WRITE, shared: Perm.ALL })).toThrow(/Failed to get "write" lock/);
    expect(reader.root!.perm).toBe(Perm.CONSISTENT_READ);
    await release(other);
    // qemu-img convert does not share writes: it opens only if the refused change left no write lock.
    const c = convert(path);
    expect(c.stderr).toBe('');
    expect(c.status).toBe(0);
    reader.setPerm({ perm: Perm.CONSISTENT_READ | Perm.WRITE, shared: Perm.CONSISTENT_READ });
    expect(convert(path).stderr).toContain('Failed to get shared "write" lock');
    expect(qemuIo('-f', 'raw', '-c', 'write 0 4k', path).stderr).toContain('Failed to get "write" lock');
    await release(reader);
    expect(convert(path).status).toBe(0);
  });
});
