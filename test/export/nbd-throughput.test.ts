// What the NBD server does for throughput. The export remembers data runs (knownData/sawData):
// reads inside one skip their own block-status query, and clients reading several regions at
// once (nbdcopy's connections) each keep theirs; a wrong answer would only cost holes sent as
// data, so what matters is that runs merge, several coexist, and the oldest goes first. And
// client sockets get a large send buffer (setSendBuffer), so a big read reply is one write.
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { openNode, settleCloses, unref } from '../../src/block/graph.js';
import { NbdExport } from '../../src/export/nbd/export.js';
import { setSendBuffer, eventfd, closeFd, UnixConnection } from '../../src/native/unix-fd.js';
import { scratchDir } from '../helpers/tmp.js';

const dir = scratchDir('spindle-nbd-tput-');
afterAll(settleCloses);

describe('NbdExport data runs', () => {
  it('merges overlapping and adjacent runs, keeps several apart, and drops the oldest past eight', async () => {
    const img = join(dir, 'a.raw');
    writeFileSync(img, Buffer.alloc(1 << 20));
    const node = await openNode({ driver: 'raw', file: { driver: 'file', filename: img } });
    const exp = new NbdExport({ name: 'a', node, writable: false });
    try {
      expect(exp.knownData(0, 1)).toBe(false);
      exp.sawData(0, 100);
      exp.sawData(100, 100); // adjacent: one run [0, 200)
      expect(exp.knownData(50, 150)).toBe(true);
      exp.sawData(1000, 100); // apart: both kept
      expect(exp.knownData(0, 200) && exp.knownData(1000, 100)).toBe(true);
      expect(exp.knownData(150, 900)).toBe(false); // spans the gap
      exp.sawData(150, 900); // bridges them: one run [0, 1100)
      expect(exp.knownData(0, 1100)).toBe(true);
      for (let i = 1; i <= 8; i++) exp.sawData(i * 10_000, 10);
      expect(exp.knownData(0, 1100)).toBe(false); // the oldest of nine went
      expect(exp.knownData(10_000, 10) && exp.knownData(80_000, 10)).toBe(true);
    } finally {
      await exp.release();
      unref(node);
    }
  });
});

describe('setSendBuffer', () => {
  it('takes a socket and refuses what is not one', () => {
    const [a, b] = UnixConnection.pair();
    try {
      expect(setSendBuffer(a.fd, 1 << 20)).toBe(true);
      const e = eventfd();
      expect(setSendBuffer(e, 1 << 20)).toBe(false); // ENOTSOCK
      closeFd(e);
    } finally {
      a.close();
      b.close();
    }
  });
});
