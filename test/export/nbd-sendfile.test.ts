// NBD read replies sent from the page cache (src/export/nbd/sendfile.ts), over real sockets:
// simple replies checked byte for byte by a raw client, structured ones by nbdcopy; a client
// that reads late (the kernel's socket buffer fills, a reply's tail and the reads behind it
// wait); a client that leaves with reads waiting; and the switch that turns the path off.
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { openNode, settleCloses, unref } from '../../src/block/graph.js';
import type { BlockNode } from '../../src/block/node.js';
import { NbdServer } from '../../src/export/nbd/index.js';
import { sendfileCounts } from '../../src/export/nbd/sendfile.js';
import { pattern, scratchDir } from '../helpers/tmp.js';
import { RawClient, shOk } from './nbd-helpers.js';

const dir = scratchDir('spindle-nbd-sendfile-');
const MiB = 1 << 20;
const CMD_READ = 0;
let seq = 0;
const tmp = (name: string): string => join(dir, `${seq++}-${name}`);

let server: NbdServer | null = null;
const nodes: BlockNode[] = [];
const savedEnv = process.env['SPINDLE_NBD_SENDFILE'];

afterEach(async () => {
  if (savedEnv === undefined) delete process.env['SPINDLE_NBD_SENDFILE'];
  else process.env['SPINDLE_NBD_SENDFILE'] = savedEnv;
  if (server) await server.close();
  server = null;
  for (const n of nodes.splice(0)) if (!n.deleted) unref(n);
  await settleCloses();
});

/** A served raw export of a fresh (so page-cached) file of `mib` MiB; its socket and data. */
async function serve(mib: number): Promise<{ sock: string; data: Buffer }> {
  const img = tmp('disk.raw');
  const data = pattern(mib * MiB, 7);
  writeFileSync(img, data);
  const node = await openNode({ driver: 'raw', 'read-only': true, file: { driver: 'file', filename: img, 'read-only': true } });
  nodes.push(node);
  server = new NbdServer();
  const sock = tmp('nbd.sock');
  await server.listen({ path: sock });
  server.addExport({ name: 'd', node, writable: false });
  return { sock, data };
}

/** Reads one simple reply with `len` bytes of data; its cookie and data. */
async function readReply(c: RawClient, len: number): Promise<{ cookie: bigint; data: Buffer }> {
  const h = await c.simpleReply();
  expect(h.error).toBe(0);
  return { cookie: h.cookie, data: Buffer.from(await c.read(len)) };
}

async function until(what: string, pred: () => boolean, ms = 10_000): Promise<void> {
  const end = Date.now() + ms;
  while (!pred()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 5));
  }
}

describe('NBD reads by sendfile', () => {
  it('large reads go out from the page cache and read back as the file (simple replies)', async () => {
    const { sock, data } = await serve(8);
    const c = new RawClient(sock);
    await c.handshake('d');
    const before = { ...sendfileCounts };
    const reads: [number, number][] = [[0, MiB], [3 * MiB + 12345, 100_000], [8 * MiB - 65536, 65536], [4096, 4096]];
    for (const [i, [off, len]] of reads.entries()) {
      c.request(CMD_READ, BigInt(i), BigInt(off), len);
      const r = await readReply(c, len);
      expect(r.cookie).toBe(BigInt(i));
      expect(r.data.equals(data.subarray(off, off + len)), `read [${off}, +${len})`).toBe(true);
    }
    // The three of 64 KiB or more; the 4 KiB one takes the plain path.
    expect(sendfileCounts.replies - before.replies).toBe(3);
    c.close();
  });

  it('a client that reads late gets every reply whole: tails and the reads behind them wait', async () => {
    const { sock, data } = await serve(64);
    const c = new RawClient(sock);
    await c.handshake('d');
    const before = { ...sendfileCounts };
    // 40 MiB of replies, far more than the socket buffers hold; every third read is 60 KiB (under the sendfile size),
    // whose reply Node queues while the socket is full (a sendfile reply must not cut in).
    const n = 60;
    const req = (i: number): [number, number] => (i % 3 === 2 ? [i * 4096 + 512, 60 << 10] : [((i * 5) % 63) * MiB, MiB]);
    for (let i = 0; i < n; i++) c.request(CMD_READ, BigInt(i), BigInt(req(i)[0]), req(i)[1]);
    // Nothing is read until the server is stuck with replies waiting.
    await until('a reply tail to wait behind', () => sendfileCounts.waited > before.waited);
    const seen = new Set<number>();
    for (let i = 0; i < n; i++) {
      const h = await c.simpleReply();
      expect(h.error).toBe(0);
      const [off, len] = req(Number(h.cookie));
      const got = await c.read(len);
      expect(Buffer.from(got).equals(data.subarray(off, off + len)), `reply ${h.cookie}`).toBe(true);
      seen.add(Number(h.cookie));
    }
    expect(seen.size).toBe(n);
    expect(sendfileCounts.tails).toBeGreaterThan(before.tails);
    c.close();
  });

  it('a client that leaves with reads waiting leaves the server serving', async () => {
    const { sock, data } = await serve(64);
    const c = new RawClient(sock);
    await c.handshake('d');
    const before = { ...sendfileCounts };
    for (let i = 0; i < 48; i++) c.request(CMD_READ, BigInt(i), BigInt(i * MiB), MiB);
    await until('reads waiting', () => sendfileCounts.waited > before.waited);
    c.close();
    await c.closed;
    await until('the client gone', () => server!.clientCount === 0 && server!.exports()[0]!.clients === 0);
    const c2 = new RawClient(sock);
    await c2.handshake('d');
    c2.request(CMD_READ, 1n, BigInt(5 * MiB), MiB);
    expect((await readReply(c2, MiB)).data.equals(data.subarray(5 * MiB, 6 * MiB))).toBe(true);
    c2.close();
  });

  it('nbdcopy (structured replies) copies the export exactly', async () => {
    const { sock, data } = await serve(32);
    const out = tmp('copy.raw');
    const before = sendfileCounts.replies;
    await shOk('nbdcopy', [`nbd+unix:///d?socket=${sock}`, out]);
    expect(readFileSync(out).equals(data)).toBe(true);
    expect(sendfileCounts.replies).toBeGreaterThan(before);
  });

  it('SPINDLE_NBD_SENDFILE=0 reads into buffers instead', async () => {
    process.env['SPINDLE_NBD_SENDFILE'] = '0';
    const { sock, data } = await serve(4);
    const c = new RawClient(sock);
    await c.handshake('d');
    const before = sendfileCounts.replies;
    c.request(CMD_READ, 9n, BigInt(MiB), 2 * MiB);
    expect((await readReply(c, 2 * MiB)).data.equals(data.subarray(MiB, 3 * MiB))).toBe(true);
    expect(sendfileCounts.replies).toBe(before);
    c.close();
  });
});
