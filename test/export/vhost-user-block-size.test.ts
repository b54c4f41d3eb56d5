// logical-block-size (QEMU's export option): the guest sees blk_size and a discard alignment of
// that many bytes, and a request that does not start and end on a logical block fails with
// IOERR on every path (QEMU's virtio_blk_sect_range_ok), before it touches the image.
import { readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import {
  VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
} from '../../hw/virtio/virtio-blk-abi.js';
import * as P from '../../src/export/vhost-user/protocol.js';
import { VhostUserBlkExport } from '../../src/export/vhost-user/export.js';
import { dwz } from './vhost-user-blk-driver.js';
import { DATA_PATHS, exportRig, fill, onPath, useExportRig } from './vhost-user-export-rig.js';
import { configReq } from './vhost-user-frontend.js';

useExportRig();

describe('logical-block-size=4096', () => {
  for (const c of DATA_PATHS) {
    it(`${c.name}: blk_size and discard alignment in the config; misaligned requests fail, aligned ones work`, async () => {
      onPath(c);
      const r = await exportRig(c.format, { logicalBlockSize: 4096 });
      expect(r.exp.onFastPath).toBe(c.native);
      const cfg = P.dataView((await r.fe.call(P.VHOST_USER_GET_CONFIG, configReq(0, 60))).subarray(P.CONFIG_HEADER));
      expect(cfg.getUint32(20, true)).toBe(4096); // blk_size
      expect(cfg.getUint32(44, true)).toBe(8); // discard_sector_alignment, in sectors
      const q = r.drv[0]!;
      const before = c.format === 'raw' ? readFileSync(r.img) : null;
      // Misaligned start, misaligned length, a discard of one sector: refused, nothing written.
      expect((await q.submit(VIRTIO_BLK_T_OUT, 9, [{ len: 4096, data: fill(4096, 1) }])).status).toBe(VIRTIO_BLK_S_IOERR);
      expect((await q.submit(VIRTIO_BLK_T_OUT, 16, [{ len: 512, data: fill(512, 2) }])).status).toBe(VIRTIO_BLK_S_IOERR);
      expect((await q.submit(VIRTIO_BLK_T_IN, 4, [{ len: 4096 }])).status).toBe(VIRTIO_BLK_S_IOERR);
      expect((await q.submit(VIRTIO_BLK_T_DISCARD, 0, [{ len: 16, data: dwz(8, 1) }])).status).toBe(VIRTIO_BLK_S_IOERR);
      expect((await q.submit(VIRTIO_BLK_T_WRITE_ZEROES, 0, [{ len: 16, data: dwz(12, 8) }])).status).toBe(VIRTIO_BLK_S_IOERR);
      if (before) expect(readFileSync(r.img).equals(before)).toBe(true);
      // Aligned: fine.
      const d = fill(8192, 3);
      expect((await q.submit(VIRTIO_BLK_T_OUT, 16, [{ len: 8192, data: d }])).status).toBe(VIRTIO_BLK_S_OK);
      expect((await q.submit(VIRTIO_BLK_T_IN, 16, [{ len: 8192 }])).data[0]).toEqual(d);
      expect((await q.submit(VIRTIO_BLK_T_WRITE_ZEROES, 0, [{ len: 16, data: dwz(24, 8) }])).status).toBe(VIRTIO_BLK_S_OK);
      expect((await q.submit(VIRTIO_BLK_T_IN, 24, [{ len: 4096 }])).data[0]).toEqual(new Uint8Array(4096));
    });
  }

  it('other sizes are refused', () => {
    for (const bs of [0, 256, 1000, 3 * 1024, 2 ** 22]) {
      expect(() => new VhostUserBlkExport({ id: 'x', path: '/nonexistent/x.sock', writable: false, logicalBlockSize: bs })).toThrow(/logical-block-size' must be a power of 2 between 512 and 2097152/);
    }
  });
});
