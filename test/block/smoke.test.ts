import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { createBackend } from '../../src/backend/backend.js';
import { openNode, settleCloses, unref } from '../../src/block/graph.js';
import { Perm } from '../../src/block/types.js';
import { pattern, scratchDir } from '../helpers/tmp.js';

describe('smoke', () => {
  const dir = scratchDir();
  it('raw over file: write then read back', async () => {
    const path = join(dir, 'a.img');
    writeFileSync(path, Buffer.alloc(1 << 20));
    const node = await openNode({ driver: 'raw', file: { driver: 'file', filename: path } });
    const b = createBackend({ name: 'd0' }, node);
    unref(node);
    const io = b.attachDevice({ id: 'dev0' });
    const data = pattern(8192, 1);
    await io.write(4096, data);
    const back = Buffer.alloc(8192);
    await io.read(4096, back);
    expect(back.equals(data)).toBe(true);
    b.detachDevice({ id: 'x' } as never === undefined ? { id: 'x' } : (b.device!));
    b.unref();
    expect(b.dead).toBe(true);
    await settleCloses();
    expect(Perm.WRITE).toBe(2);
  });
});
