// Guest memory above 4 GiB (any guest with more than ~2.75 GiB of RAM on q35 has some): the
// session's layout spans it though no typed array can, so rings (the test front-end puts them
// at 6 GiB) and request buffers there go through DataViews and per-buffer views on the
// TypeScript path, and through raw pointers in the native worker.
import { readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { VIRTIO_BLK_S_OK, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT } from '../../hw/virtio/virtio-blk-abi.js';
import { ok, qemuImg } from '../cli/helpers.js';
import { DATA_PATHS, exportRig, fill, onPath, useExportRig } from './vhost-user-export-rig.js';
import { HIGH } from './vhost-user-frontend.js';

useExportRig();

const FREE = HIGH.gpa + 0x100000; // past the rings, inside the region at 6 GiB

describe('guest memory above 4 GiB', () => {
  for (const c of DATA_PATHS) {
    it(`${c.name}: requests whose header, data and status live at 6 GiB`, async () => {
      onPath(c);
      const r = await exportRig(c.format);
      expect(r.exp.onFastPath).toBe(c.native);
      expect(HIGH.gpa).toBeGreaterThan(2 ** 32);
      const q = r.drv[0]!;
      const data = fill(12288, 77);
      // Two data segments, both high; the driver's headers and status bytes are high too (statusGpa).
      const w = await q.submit(VIRTIO_BLK_T_OUT, 200, [{ gpa: FREE, len: 4096, data: data.subarray(0, 4096) }, { gpa: FREE + 0x2000, len: 8192, data: data.subarray(4096) }],
        { statusGpa: FREE + 0x8000 });
      expect(w.status).toBe(VIRTIO_BLK_S_OK);
      const rd = await q.submit(VIRTIO_BLK_T_IN, 200, [{ gpa: FREE + 0x10000, len: 12288 }], { statusGpa: FREE + 0x8001 });
      expect(rd.status).toBe(VIRTIO_BLK_S_OK);
      expect(rd.data[0]).toEqual(data);
      expect(q.bytes(FREE + 0x10000, 12288)).toEqual(data); // in guest memory, where the guest asked
      const id = await q.submit(VIRTIO_BLK_T_GET_ID, 0, [{ gpa: FREE + 0x20000, len: 20 }], { statusGpa: FREE + 0x8002 });
      expect(Buffer.from(id.data[0]!).toString('latin1').replace(/\0+$/, '')).toBe('fast0');
      // And in the image.
      if (c.format === 'raw') {
        expect(readFileSync(r.img).subarray(200 * 512, 200 * 512 + 12288)).toEqual(Buffer.from(data));
      } else {
        const out = `${r.file}.raw`;
        ok(qemuImg('convert', '-U', '-f', 'qcow2', '-O', 'raw', r.file, out));
        expect(readFileSync(out).subarray(200 * 512, 200 * 512 + 12288)).toEqual(Buffer.from(data));
      }
    });
  }
});
