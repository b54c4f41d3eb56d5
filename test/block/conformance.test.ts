import { closeSync, ftruncateSync, openSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { attachRoot, detachRoot, openNode, settleCloses, unref } from '../../src/block/graph.js';
import * as io from '../../src/block/io.js';
import type { BlockNode, BlockParent } from '../../src/block/node.js';
import { Perm, type NodeOptions } from '../../src/block/types.js';
import { pattern, scratchDir } from '../helpers/tmp.js';
import { runDriverConformance, type ConformanceSubject } from './conformance.js';

const dir = scratchDir('spindle-conf-');
const SIZE = 4 << 20;
let imgN = 0;

/** A fresh image of `size` bytes: zeroes, with some data so nothing starts all-sparse. */
function image(size = SIZE): string {
  const path = join(dir, `img${imgN++}.raw`);
  const fd = openSync(path, 'w');
  ftruncateSync(fd, size);
  closeSync(fd);
  const fdw = openSync(path, 'r+');
  writeFileSync(fdw, pattern(8192, imgN), { flag: 'r+' });
  closeSync(fdw);
  return path;
}

function subject(opts: (path: string) => NodeOptions, persistent = true): () => Promise<ConformanceSubject> {
  return async () => {
    const path = image();
    const node = await openNode(opts(path));
    return { node, persistent, cleanup: () => rmSync(path, { force: true }) };
  };
}

runDriverConformance('file (aio=io_uring)', subject((p) => ({ driver: 'file', 'node-name': 'cf-file', filename: p, aio: 'io_uring' })));
runDriverConformance('file (aio=threads)', subject((p) => ({ driver: 'file', 'node-name': 'cf-file', filename: p, aio: 'threads' })));
runDriverConformance('file (cache.direct)', subject((p) => ({ driver: 'file', 'node-name': 'cf-file', filename: p, cache: { direct: true } })));
runDriverConformance('raw over file', subject((p) => ({
  driver: 'raw', 'node-name': 'cf-raw', file: { driver: 'file', 'node-name': 'cf-file', filename: p },
})));
runDriverConformance('raw window over file', subject((p) => ({
  driver: 'raw', 'node-name': 'cf-raw', offset: 4096 + 512, size: 2 << 20,
  file: { driver: 'file', 'node-name': 'cf-file', filename: p },
})));
runDriverConformance('raw window over file (cache.direct)', subject((p) => ({
  driver: 'raw', 'node-name': 'cf-raw', offset: 512, size: 3 << 20,
  file: { driver: 'file', 'node-name': 'cf-file', filename: p, cache: { direct: true } },
})));
runDriverConformance('null-co', async () => ({
  node: await openNode({ driver: 'null-co', 'node-name': 'cf-null', size: 8 << 20 }),
  persistent: false,
}));
runDriverConformance('blkdebug over file', subject((p) => ({
  driver: 'blkdebug', 'node-name': 'cf-dbg', image: { driver: 'file', 'node-name': 'cf-file', filename: p },
})));
runDriverConformance('blkdebug with rules that never fire', subject((p) => ({
  driver: 'blkdebug', 'node-name': 'cf-dbg',
  'inject-error': [{ event: 'read_aio', state: 7, errno: 28, once: true, offset: 1 << 20 }],
  'set-state': [{ event: 'flush_to_disk', state: 3, new_state: 4 }],
  image: { driver: 'file', 'node-name': 'cf-file', filename: p },
})));
runDriverConformance('blkdebug align=4096 over file', subject((p) => ({
  driver: 'blkdebug', 'node-name': 'cf-dbg', align: 4096, image: { driver: 'file', 'node-name': 'cf-file', filename: p },
})));

describe('raw offset/size window', () => {
  const user: BlockParent = { parentKind: 'job', describeUser: () => 'window test' };
  let node: BlockNode | null = null;
  afterEach(async () => {
    if (node) unref(node);
    node = null;
    await settleCloses();
  });

  it('maps window offset 0 to the file offset and stays inside the window', async () => {
    const path = image();
    const before = readFileSync(path);
    const off = 3 * 4096 + 100;
    const size = 256 * 1024 + 7;
    node = await openNode({ driver: 'raw', offset: off, size, file: { driver: 'file', filename: path } });
    expect(node.length).toBe(size);
    const e = attachRoot(user, node, 'root', { perm: Perm.CONSISTENT_READ | Perm.WRITE, shared: Perm.ALL });
    const head = pattern(1000, 1);
    const tail = pattern(777, 2);
    await io.write(e, 0, head);
    await io.write(e, size - tail.length, tail);
    await io.writeZeroes(e, 5000, 3000, 0);
    await io.flush(e);
    const after = readFileSync(path);
    const want = Buffer.from(before);
    head.copy(want, off);
    tail.copy(want, off + size - tail.length);
    want.fill(0, off + 5000, off + 8000);
    expect(after.length).toBe(before.length);
    expect(after.equals(want)).toBe(true);
    // Reads map the same way: what the file has at off+N is what the window has at N.
    const back = Buffer.alloc(4096);
    await io.read(e, 0, back);
    expect(back.equals(after.subarray(off, off + 4096))).toBe(true);
    await expect(io.read(e, size - 1, Buffer.alloc(2))).rejects.toMatchObject({ code: 'EINVAL' });
    const st = await io.blockStatus(e, size - 10, 10);
    expect(st.bytes).toBe(10);
    detachRoot(e);
  });

  const rw = { perm: Perm.CONSISTENT_READ | Perm.WRITE, shared: Perm.ALL };
  it('read-modify-write pads only up to the end of a node that cannot grow', async () => {
    // blkdebug align=4096 over a 10000-byte file, and over a 10000-byte raw window.
    const path = image(10000);
    node = await openNode({ driver: 'blkdebug', align: 4096, image: { driver: 'file', filename: path } });
    let e = attachRoot(user, node, 'root', rw);
    await io.write(e, 9900, Buffer.alloc(100, 0xab));
    expect(node.length).toBe(10000);
    expect(statSync(path).size).toBe(10000);
    expect(readFileSync(path).subarray(9900).equals(Buffer.alloc(100, 0xab))).toBe(true);
    detachRoot(e);
    unref(node);

    const big = image(65536);
    const want = readFileSync(big);
    node = await openNode({ driver: 'blkdebug', align: 4096, image: { driver: 'raw', offset: 1000, size: 10000, file: { driver: 'file', filename: big } } });
    e = attachRoot(user, node, 'root', rw);
    expect(node.length).toBe(10000);
    await io.write(e, 9900, Buffer.alloc(100, 0xab));
    await io.write(e, 5000, Buffer.alloc(4000, 0xcd));
    want.fill(0xab, 1000 + 9900, 1000 + 10000).fill(0xcd, 1000 + 5000, 1000 + 9000);
    expect(readFileSync(big).equals(want)).toBe(true);
    const back = Buffer.alloc(150);
    await io.read(e, 9850, back);
    expect(back.equals(want.subarray(1000 + 9850, 1000 + 10000))).toBe(true);
    detachRoot(e);
  });

  it('refuses a window that does not fit the file, and resizing it', async () => {
    const path = image(65536);
    await expect(openNode({ driver: 'raw', offset: 65536 - 100, size: 200, file: { driver: 'file', filename: path } }))
      .rejects.toMatchObject({ code: 'EINVAL', message: expect.stringContaining('smaller or equal') });
    node = await openNode({ driver: 'raw', offset: 512, size: 1024, file: { driver: 'file', filename: path } });
    const e = attachRoot(user, node, 'root', { perm: Perm.CONSISTENT_READ | Perm.WRITE | Perm.RESIZE, shared: Perm.ALL });
    await expect(io.truncate(e, 4096)).rejects.toMatchObject({ code: 'ENOTSUP' });
    expect(statSync(path).size).toBe(65536);
    detachRoot(e);
  });
});
