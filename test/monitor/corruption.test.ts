// A qcow2 image whose L1 table points at a misaligned L2 table: the first read through a
// backend fails with EIO, the image takes no more metadata writes, and QMP clients get
// BLOCK_IMAGE_CORRUPTED once, naming the device and the node.
import { openSync, readSync, writeSync, closeSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { createBackend } from '../../src/backend/backend.js';
import { openNode, settleCloses, unref } from '../../src/block/graph.js';
import { forwardCorruption } from '../../src/monitor/block-events.js';
import { QmpMonitor } from '../../src/monitor/qmp.js';
import { serveMonitor } from '../helpers/qmp.js';
import { createImage, qemuIo } from '../helpers/qemu.js';
import { scratchDir } from '../helpers/tmp.js';

const dir = scratchDir('spindle-corrupt-');

describe('BLOCK_IMAGE_CORRUPTED', () => {
  it('is sent once, naming device and node, when a read finds corrupt metadata', async () => {
    const img = createImage(join(dir, 'c.qcow2'), '1M');
    qemuIo(img, ['write -P 0x5a 0 64k']);
    // Misalign L1 entry 0 (the L2 table of the first GiB) by 512 bytes.
    const fd = openSync(img, 'r+');
    const hdr = Buffer.alloc(48);
    readSync(fd, hdr, 0, 48, 0);
    const l1 = Number(hdr.readBigUInt64BE(40));
    const e = Buffer.alloc(8);
    readSync(fd, e, 0, 8, l1);
    e.writeBigUInt64BE(e.readBigUInt64BE(0) + 512n);
    writeSync(fd, e, 0, 8, l1);
    closeSync(fd);

    const mon = new QmpMonitor({ major: 0, minor: 1, micro: 0, package: 'test' });
    const stop = forwardCorruption(mon);
    const qmp = await serveMonitor(mon, join(dir, 'm.sock'));
    const node = await openNode({ driver: 'qcow2', 'node-name': 'corrupt-top', file: { driver: 'file', filename: img } });
    const be = createBackend({ name: 'corrupt-disk' }, node);
    unref(node);
    const dev = { id: 'corrupt-dev' };
    const io = be.attachDevice(dev);
    const read = (): Promise<unknown> => new Promise((r) => io.readv(0, 4096, [Buffer.alloc(4096)], 0, (err) => r(err)));
    try {
      expect(String(await read())).toMatch(/is corrupt: L2 table offset \d+ is not cluster aligned/);
      expect(String(await read())).toMatch(/is corrupt/); // still refused, not reported again
      await qmp.run('query-version'); // the event, if any, went out before this reply
      expect(qmp.events.map((ev) => [ev['event'], ev['data']])).toEqual([
        ['BLOCK_IMAGE_CORRUPTED', { device: 'corrupt-disk', 'node-name': 'corrupt-top', msg: expect.stringMatching(/c\.qcow2' is corrupt: L2 table offset/), fatal: true }],
      ]);
    } finally {
      qmp.close();
      stop();
      be.detachDevice(dev);
      be.unref();
      await settleCloses();
    }
  });
});
