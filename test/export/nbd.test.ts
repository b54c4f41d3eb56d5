// The NBD export against real peers over real sockets: nbdinfo, nbdcopy, qemu-img, qemu-io
// (libnbd and QEMU's client) and qemu-nbd as the reference server for status maps.
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { liveBackends } from '../../src/backend/backend.js';
import { openNode, settleCloses, unref } from '../../src/block/graph.js';
import type { BlockNode } from '../../src/block/node.js';
import type { NodeOptions } from '../../src/block/types.js';
import { NbdServer } from '../../src/export/nbd/index.js';
import { UnixListener } from '../../src/native/unix-fd.js';
import { pattern, scratchDir } from '../helpers/tmp.js';
import { RawClient, option, sh, shOk, sleep } from './nbd-helpers.js';

const dir = scratchDir('spindle-nbd-');
const MiB = 1 << 20;
let seq = 0;
const tmp = (name: string): string => join(dir, `${seq++}-${name}`);

const nodes: BlockNode[] = [];
let server: NbdServer | null = null;
let sock = '';

async function open(filename: string, driver: 'qcow2' | 'raw', extra: Partial<NodeOptions> = {}, readOnly = false): Promise<BlockNode> {
  const node = await openNode({
    driver, 'read-only': readOnly, discard: 'unmap',
    file: { driver: 'file', filename, 'read-only': readOnly, discard: 'unmap' }, ...extra,
  });
  nodes.push(node);
  return node;
}

async function startServer(): Promise<NbdServer> {
  server = new NbdServer();
  sock = tmp('nbd.sock');
  await server.listen({ path: sock });
  return server;
}

afterEach(async () => {
  if (server) await server.close();
  server = null;
  for (const n of nodes.splice(0)) if (!n.deleted) unref(n);
  await settleCloses();
  expect(liveBackends().filter((b) => b.name === '' && b.device?.id.startsWith('nbd-export:'))).toEqual([]);
});

const uri = (name: string): string => `nbd+unix:///${name}?socket=${sock}`;
const sockOf = (_s: NbdServer): string => sock;

function qemuImg(args: string[]): Promise<string> {
  return shOk('qemu-img', args);
}
async function qemuIo(file: string, fmt: string, cmds: string[]): Promise<string> {
  return shOk('qemu-io', ['-f', fmt, ...cmds.flatMap((c) => ['-c', c]), file]);
}

describe('NBD export: handshake and listing', () => {
  it('lists exports with size, description and flags as nbdinfo sees them', async () => {
    const img = tmp('a.raw');
    writeFileSync(img, pattern(3 * MiB, 1));
    const s = await startServer();
    const node = await open(img, 'raw');
    s.addExport({ name: 'rw', description: 'the writable one', node, writable: true });
    s.addExport({ name: 'ro', node, writable: false });
    const list = JSON.parse(await shOk('nbdinfo', ['--list', '--json', uri('')]));
    const byName = new Map<string, Record<string, unknown>>(list.exports.map((e: Record<string, unknown>) => [e['export-name'], e]));
    expect([...byName.keys()].sort()).toEqual(['ro', 'rw']);
    const rw = byName.get('rw')!;
    expect(rw['description']).toBe('the writable one');
    expect(rw['export-size']).toBe(3 * MiB);
    expect(rw['is_read_only']).toBe(false);
    for (const k of ['can_flush', 'can_fua', 'can_trim', 'can_zero', 'can_fast_zero', 'can_multi_conn', 'can_cache', 'can_df']) expect(rw[k], k).toBe(true);
    const ro = byName.get('ro')!;
    expect(ro['is_read_only']).toBe(true);
    expect(ro['can_trim']).toBe(false);
    expect(ro['can_zero']).toBe(false);
    expect(ro['block_size_minimum']).toBe(1);
    expect(ro['block_size_preferred']).toBe(4096);
    expect(ro['block_size_maximum']).toBe(32 * MiB);
    expect(s.exports().map((e) => e.name).sort()).toEqual(['ro', 'rw']);
  });
});

/** Runs qemu-nbd on `file` (read-only) on a fresh UNIX socket; resolves once it listens. */
async function qemuNbd(file: string, fmt: string, extra: string[] = []): Promise<{ sock: string; proc: ChildProcess }> {
  const s = tmp('qemu-nbd.sock');
  const proc = spawn('qemu-nbd', ['-r', '-f', fmt, '-k', s, '--persistent', '-x', 'q', ...extra, file], { stdio: 'ignore' });
  for (let i = 0; i < 200 && !existsSync(s); i++) await sleep(10);
  await sleep(20);
  return { sock: s, proc };
}
const peers: ChildProcess[] = [];
afterAll(() => {
  for (const p of peers) p.kill();
});

async function nbdMap(u: string, context?: string): Promise<{ offset: number; length: number; type: number }[]> {
  const out = await shOk('nbdinfo', [context ? `--map=${context}` : '--map', '--json', u]);
  return JSON.parse(out).map((e: { offset: number; length: number; type: number }) => ({ offset: e.offset, length: e.length, type: e.type }));
}

describe('NBD export: block status', () => {
  it('base:allocation of a qcow2 with data, zero and unallocated regions matches qemu-nbd and qemu-img map', async () => {
    const img = tmp('map.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', img, '8M']);
    await qemuIo(img, 'qcow2', ['write -P 0x11 0 1M', 'write -z 2M 1M', 'write -P 0x22 4M 512k', 'write -z 5M 64k', 'write -P 0 6M 64k']);
    const s = await startServer();
    s.addExport({ name: 'img', node: await open(img, 'qcow2', {}, true), writable: false });
    const ours = await nbdMap(uri('img'));
    const q = await qemuNbd(img, 'qcow2');
    peers.push(q.proc);
    const theirs = await nbdMap(`nbd+unix:///q?socket=${q.sock}`);
    q.proc.kill();
    expect(ours).toEqual(theirs);
    // And as qemu-img map says: data -> 0, zero (allocated or not) -> hole|zero.
    const map = JSON.parse(await qemuImg(['map', '--output=json', img])) as { start: number; length: number; data: boolean; zero: boolean }[];
    const want: { offset: number; length: number; type: number }[] = [];
    for (const m of map) {
      const type = (m.data ? 0 : 1) | (m.zero ? 2 : 0);
      const last = want[want.length - 1];
      if (last && last.type === type) last.length += m.length;
      else want.push({ offset: m.start, length: m.length, type });
    }
    expect(ours).toEqual(want);
    expect(ours.some((e) => e.type === 0) && ours.some((e) => e.type === 3)).toBe(true);
  });

  it('qemu:allocation-depth of a two-layer chain matches qemu-nbd -A', async () => {
    const base = tmp('base.qcow2');
    const top = tmp('top.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', base, '4M']);
    await qemuIo(base, 'qcow2', ['write -P 0x33 0 2M']);
    await qemuImg(['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top, '4M']);
    await qemuIo(top, 'qcow2', ['write -P 0x44 1M 512k', 'write -z 3M 64k']);
    const s = await startServer();
    s.addExport({ name: 'chain', node: await open(top, 'qcow2', {}, true), writable: false, allocationDepth: true });
    const ours = await nbdMap(uri('chain'), 'qemu:allocation-depth');
    expect(ours).toEqual([
      { offset: 0, length: 1 * MiB, type: 2 },
      { offset: 1 * MiB, length: 512 * 1024, type: 1 },
      { offset: 1.5 * MiB, length: 512 * 1024, type: 2 },
      { offset: 2 * MiB, length: 1 * MiB, type: 0 },
      { offset: 3 * MiB, length: 64 * 1024, type: 1 },
      { offset: 3 * MiB + 64 * 1024, length: MiB - 64 * 1024, type: 0 },
    ]);
    const q = await qemuNbd(top, 'qcow2', ['-A']);
    peers.push(q.proc);
    const theirs = await nbdMap(`nbd+unix:///q?socket=${q.sock}`, 'qemu:allocation-depth');
    const theirBase = await nbdMap(`nbd+unix:///q?socket=${q.sock}`);
    q.proc.kill();
    expect(ours).toEqual(theirs);
    expect(await nbdMap(uri('chain'))).toEqual(theirBase);
    // Without allocationDepth the context is not offered.
    s.addExport({ name: 'plain', node: nodes[0]!, writable: false });
    const ctx = JSON.parse(await shOk('nbdinfo', ['--list', '--json', uri('')])).exports as { 'export-name': string; contexts: string[] }[];
    expect(ctx.find((e) => e['export-name'] === 'chain')!.contexts).toEqual(['base:allocation', 'qemu:allocation-depth']);
    expect(ctx.find((e) => e['export-name'] === 'plain')!.contexts).toEqual(['base:allocation']);
  });
});

describe('NBD export: data through real clients', () => {
  it('nbdcopy out of a qcow2 export and into a writable raw export, byte for byte', async () => {
    // Random data at 1 MiB and 10 MiB, zero regions in between (convert leaves them unallocated),
    // then a pattern, a zero cluster run and more data written by qemu-io.
    const srcRaw = tmp('src-data.raw');
    const raw = Buffer.alloc(16 * MiB);
    pattern(3 * MiB, 7).copy(raw, 1 * MiB);
    pattern(2 * MiB + 4096, 8).copy(raw, 10 * MiB);
    writeFileSync(srcRaw, raw);
    const img = tmp('src.qcow2');
    await qemuImg(['convert', '-f', 'raw', '-O', 'qcow2', srcRaw, img]);
    await qemuIo(img, 'qcow2', ['write -P 0x5a 0 64k', 'write -z 2M 1M', 'write -P 0xa5 14M 1M']);
    const expected = tmp('expected.raw');
    await qemuImg(['convert', '-f', 'qcow2', '-O', 'raw', img, expected]);
    const s = await startServer();
    s.addExport({ name: 'src', node: await open(img, 'qcow2', {}, true), writable: false });
    const out = tmp('out.raw');
    await shOk('nbdcopy', [uri('src'), out]);
    expect(readFileSync(out).equals(readFileSync(expected))).toBe(true);

    // Into a writable raw export (an existing 16 MiB file of 0xff bytes, so zeroes must land).
    const target = tmp('target.raw');
    writeFileSync(target, Buffer.alloc(16 * MiB, 0xff));
    s.addExport({ name: 'dst', node: await open(target, 'raw'), writable: true });
    await shOk('nbdcopy', [expected, uri('dst')]);
    await s.close();
    server = null;
    expect(readFileSync(target).equals(readFileSync(expected))).toBe(true);
  });

  it('qemu-img convert from the export and qemu-img compare against the image', async () => {
    const img = tmp('conv.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', img, '8M']);
    await qemuIo(img, 'qcow2', ['write -P 0x77 0 3M', 'write -z 4M 1M', 'write -P 0x78 7M 4k']);
    const s = await startServer();
    s.addExport({ name: 'conv', node: await open(img, 'qcow2', {}, true), writable: false });
    const out = tmp('conv.raw');
    await qemuImg(['convert', '-f', 'raw', '-O', 'raw', uri('conv'), out]);
    expect((await sh('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', out, img])).code).toBe(0);
    expect((await sh('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', uri('conv'), out])).code).toBe(0);
    // And compare notices a difference (the test can fail).
    writeFileSync(out, Buffer.from([1]), { flag: 'r+' });
    expect((await sh('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', out, img])).code).toBe(1);
  });
});

describe('NBD export: writes from qemu-io over TCP', () => {
  async function tcpServer(): Promise<{ s: NbdServer; url: (n: string) => string }> {
    server = new NbdServer();
    const a = (await server.listen({ port: 0 })) as { address: string; port: number };
    sock = tmp('nbd.sock');
    await server.listen({ path: sock }); // and a UNIX socket for the raw client
    expect(a.address).toBe('127.0.0.1');
    return { s: server, url: (n) => `nbd://127.0.0.1:${a.port}/${n}` };
  }

  it('write, FUA write, write -z and discard reach the qcow2 image', async () => {
    const img = tmp('w.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', img, '8M']);
    await qemuIo(img, 'qcow2', ['write -P 0x11 0 8M']);
    const { s, url } = await tcpServer();
    s.addExport({ name: 'w', node: await open(img, 'qcow2'), writable: true });
    const out = await qemuIo(url('w'), 'raw', [
      'write -P 0xab 64k 64k', 'write -f -P 0xcd 1M 4k', 'write -z 2M 1M', 'discard 4M 1M',
      'read -P 0xab 64k 64k', 'read -P 0xcd 1M 4k', 'read -P 0 2M 1M', 'read -P 0x11 3M 1M', 'flush',
    ]);
    expect(out).not.toMatch(/error|failed|Pattern verification/i);
    await s.close();
    server = null;
    for (const n of nodes.splice(0)) unref(n);
    await settleCloses();
    // The image itself: contents as qemu reads them, and the map shows zeroes where write -z
    // and discard went.
    const check = await qemuIo(img, 'qcow2', ['read -P 0x11 0 64k', 'read -P 0xab 64k 64k', 'read -P 0xcd 1M 4k', 'read -P 0 2M 1M', 'read -P 0x11 3M 1M', 'read -P 0x11 5M 3M']);
    expect(check).not.toMatch(/Pattern verification failed/);
    const map = JSON.parse(await qemuImg(['map', '--output=json', img])) as { start: number; length: number; data: boolean; zero: boolean }[];
    const at = (off: number) => map.find((m) => m.start <= off && off < m.start + m.length)!;
    expect(at(2 * MiB)).toMatchObject({ data: false, zero: true });
    expect(at(4 * MiB)).toMatchObject({ data: false, zero: true });
    expect(at(4 * MiB + MiB - 1)).toMatchObject({ data: false, zero: true });
    expect(at(5 * MiB)).toMatchObject({ data: true });
    expect((await sh('qemu-img', ['check', img])).code).toBe(0);
  });

  it('a read-only export refuses writes with EPERM', async () => {
    const img = tmp('ro.raw');
    writeFileSync(img, pattern(MiB, 3));
    const { s, url } = await tcpServer();
    s.addExport({ name: 'ro', node: await open(img, 'raw'), writable: false });
    // QEMU sees READ_ONLY and will not open the export read-write at all.
    const r = await sh('qemu-io', ['-f', 'raw', '-c', 'write 0 4k', url('ro')]);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/Permission denied/);
    const first = pattern(16, 3).toString('hex').replace(/(..)/g, '$1 ').trim();
    const rd = await shOk('qemu-io', ['-r', '-f', 'raw', '-c', 'read -v 0 16', url('ro')]);
    expect(rd.replace(/\s+/g, ' ')).toContain(first.slice(0, 23)); // reads still work
    // A client that writes anyway gets EPERM from the server for every kind of write.
    const c = new RawClient(sockOf(s));
    const hs = await c.handshake('ro');
    expect(hs.flags & 2).toBe(2); // NBD_FLAG_READ_ONLY
    c.request(1, 1n, 0n, 4096, 0, Buffer.alloc(4096, 0xee)); // WRITE
    c.request(4, 2n, 0n, 4096); // TRIM
    c.request(6, 3n, 0n, 4096); // WRITE_ZEROES
    const replies = [await c.simpleReply(), await c.simpleReply(), await c.simpleReply()];
    expect(replies.map((x) => x.error)).toEqual([1, 1, 1]);
    expect(replies.map((x) => x.cookie).sort()).toEqual([1n, 2n, 3n]);
    c.close();
    expect(readFileSync(img).equals(pattern(MiB, 3))).toBe(true);
  });
});

/** Reads one structured chunk (a simple reply, allowed for non-reads, reads as type NONE + DONE). */
async function chunk(c: RawClient): Promise<{ flags: number; type: number; cookie: bigint; payload: Buffer }> {
  const m = await c.read(4);
  if (m.readUInt32BE(0) === 0x67446698) {
    const r = await c.read(12);
    expect(r.readUInt32BE(0)).toBe(0);
    return { flags: 1, type: 0, cookie: r.readBigUInt64BE(4), payload: Buffer.alloc(0) };
  }
  expect(m.readUInt32BE(0)).toBe(0x668e33ef);
  const h = Buffer.concat([m, await c.read(16)]);
  const len = h.readUInt32BE(16);
  return { flags: h.readUInt16BE(4), type: h.readUInt16BE(6), cookie: h.readBigUInt64BE(8), payload: len ? await c.read(len) : Buffer.alloc(0) };
}

describe('NBD export: errors and limits from the block layer', () => {
  it('maps injected ENOSPC and EIO to NBD errors qemu-io reports, and advertises a 512-byte minimum block', async () => {
    const img = tmp('err.raw');
    writeFileSync(img, pattern(MiB, 6));
    const s = await startServer();
    const node = await openNode({
      driver: 'raw',
      file: {
        driver: 'blkdebug', align: 512,
        'inject-error': [{ event: 'write_aio', errno: 'ENOSPC', once: true }, { event: 'read_aio', errno: 'EIO', once: true }],
        image: { driver: 'file', filename: img },
      },
    });
    nodes.push(node);
    s.addExport({ name: 'e', node, writable: true });
    const info = JSON.parse(await shOk('nbdinfo', ['--json', '--no-content', uri('e')])).exports[0];
    expect(info['block_size_minimum']).toBe(512);
    const w = await sh('qemu-io', ['-f', 'raw', '-c', 'write -P 0x42 0 4k', uri('e')]);
    expect(w.stdout + w.stderr).toMatch(/No space left on device/);
    const r = await sh('qemu-io', ['-f', 'raw', '-c', 'read 0 4k', uri('e')]);
    expect(r.stdout + r.stderr).toMatch(/Input\/output error/);
    // Both rules fired once; now the same requests succeed.
    expect(await qemuIo(uri('e'), 'raw', ['write -P 0x42 0 4k', 'read -P 0x42 0 4k'])).not.toMatch(/error|failed/i);
  });
});

describe('NBD export: robustness', () => {
  async function setup(): Promise<{ s: NbdServer; img: string }> {
    const img = tmp('rb.raw');
    writeFileSync(img, pattern(8 * MiB, 9));
    const s = await startServer();
    s.addExport({ name: 'x', node: await open(img, 'raw'), writable: true });
    return { s, img };
  }
  async function stillServes(): Promise<void> {
    const info = JSON.parse(await shOk('nbdinfo', ['--json', uri('x')]));
    expect(info.exports[0]['export-size']).toBe(8 * MiB);
  }
  async function settle(s: NbdServer): Promise<void> {
    for (let i = 0; i < 200 && s.clientCount > 0; i++) await sleep(5);
    expect(s.clientCount).toBe(0);
  }

  it('listening replaces a socket file a dead server left, and refuses one a live server holds', async () => {
    const path = tmp('stale.sock');
    UnixListener.listen(path, () => {}).close(false); // the file stays, no one accepts
    server = new NbdServer();
    sock = path;
    expect(await server.listen({ path })).toBe(path);
    const img = tmp('stale.raw');
    writeFileSync(img, pattern(MiB, 3));
    server.addExport({ name: 'x', node: await open(img, 'raw'), writable: false });
    expect(JSON.parse(await shOk('nbdinfo', ['--json', uri('x')])).exports[0]['export-size']).toBe(MiB);
    const other = new NbdServer();
    await expect(other.listen({ path })).rejects.toMatchObject({ code: 'EADDRINUSE' });
    await other.close();
    expect(JSON.parse(await shOk('nbdinfo', ['--json', uri('x')])).exports[0]['export-size']).toBe(MiB);
  });

  it('a client that never finishes the handshake is dropped after handshakeMaxSeconds', async () => {
    server = new NbdServer({ handshakeMaxSeconds: 0.2 });
    sock = tmp('hs.sock');
    await server.listen({ path: sock });
    const t0 = Date.now();
    const idle = new RawClient(sock);
    await idle.read(18);
    await idle.closed;
    expect(Date.now() - t0).toBeGreaterThanOrEqual(150);
    expect(() => new NbdServer({ handshakeMaxSeconds: -1 })).toThrow(/handshakeMaxSeconds/);
  });

  it('garbage bytes in the handshake or instead of a request only cost that client', async () => {
    const { s } = await setup();
    const g1 = new RawClient(sock);
    g1.write(pattern(4096, 1));
    await g1.closed;
    const g2 = new RawClient(sock);
    await g2.handshake('x');
    g2.write(pattern(100, 2)); // no request magic
    await g2.closed;
    const g3 = new RawClient(sock); // unknown client flags: dropped
    await g3.read(18);
    g3.write(Buffer.from([0, 0, 0, 0x80]));
    await g3.closed;
    const g4 = new RawClient(sock); // unknown export by EXPORT_NAME: dropped
    await g4.read(18);
    g4.write(Buffer.from([0, 0, 0, 3]));
    g4.write(option(1, Buffer.from('nope')));
    await g4.closed;
    await stillServes();
    await settle(s);
  });

  it('clients vanishing mid-write and with reads in flight leave the server and the export usable', async () => {
    const { s, img } = await setup();
    const a = new RawClient(sock);
    await a.handshake('x');
    a.request(1, 1n, 0n, 4 * MiB); // WRITE of 4 MiB ...
    a.write(Buffer.alloc(2 * MiB, 0x77)); // ... of which only half arrives
    await sleep(20);
    a.close();
    const b = new RawClient(sock);
    await b.handshake('x');
    for (let i = 0; i < 32; i++) b.request(0, BigInt(i), BigInt(i * 128 * 1024), 256 * 1024);
    b.close(); // replies have nowhere to go
    await stillServes();
    await settle(s);
    // Nothing of the half-sent write landed, and no client is left holding the export.
    expect(readFileSync(img).subarray(0, 4 * MiB).equals(pattern(8 * MiB, 9).subarray(0, 4 * MiB))).toBe(true);
    await s.removeExport('x', 'safe');
    expect(s.exports()).toEqual([]);
  });

  it('oversized, out-of-range and unknown requests get errors and the connection stays framed', async () => {
    const { s } = await setup();
    const c = new RawClient(sock);
    await c.handshake('x');
    c.request(1, 10n, 0n, 48 * MiB); // WRITE larger than the 32 MiB maximum payload
    expect(await c.simpleReply()).toEqual({ error: 22, cookie: 10n });
    c.write(Buffer.alloc(48 * MiB, 0x99)); // its payload is skipped, not held
    c.request(0, 11n, 0n, 64 * MiB); // READ too large
    expect(await c.simpleReply()).toEqual({ error: 22, cookie: 11n });
    c.request(0, 12n, BigInt(8 * MiB - 512), 1024); // READ past the end
    expect(await c.simpleReply()).toEqual({ error: 22, cookie: 12n });
    c.request(1, 13n, BigInt(8 * MiB), 512, 0, Buffer.alloc(512)); // WRITE past the end
    expect(await c.simpleReply()).toEqual({ error: 28, cookie: 13n });
    c.request(0, 14n, 0xffffffffffff0000n, 512); // offset beyond any number
    expect(await c.simpleReply()).toEqual({ error: 22, cookie: 14n });
    c.request(42, 15n, 0n, 0); // unknown command
    expect(await c.simpleReply()).toEqual({ error: 22, cookie: 15n });
    c.request(0, 16n, 0n, 512, 1 << 3); // READ with REQ_ONE: invalid flag for READ
    expect(await c.simpleReply()).toEqual({ error: 22, cookie: 16n });
    c.request(6, 17n, 0n, 4096, 1 << 4); // FAST_ZERO write-zeroes on a raw ext4 file: a punched hole
    expect(await c.simpleReply()).toEqual({ error: 0, cookie: 17n });
    c.request(7, 18n, 0n, 512); // BLOCK_STATUS without structured replies/contexts
    expect(await c.simpleReply()).toEqual({ error: 22, cookie: 18n });
    c.request(0, 19n, 4090n, 16); // and a plain read still works (zeroes, then the pattern)
    expect(await c.simpleReply()).toEqual({ error: 0, cookie: 19n });
    expect((await c.read(16)).equals(Buffer.concat([Buffer.alloc(6), pattern(8 * MiB, 9).subarray(4096, 4106)]))).toBe(true);
    c.request(2, 20n, 0n, 0); // DISC: the server closes
    await c.closed;
    await stillServes();
    await settle(s);
  });

  it('pipelined requests are answered with matching cookies, structured reads with holes', async () => {
    const img = tmp('pipe.qcow2');
    await qemuImg(['create', '-q', '-f', 'qcow2', img, '4M']);
    await qemuIo(img, 'qcow2', ['write -P 0x61 0 64k', 'write -P 0x62 1M 64k']);
    const s = await startServer();
    s.addExport({ name: 'p', node: await open(img, 'qcow2'), writable: true });
    const c = new RawClient(sock);
    await c.read(18);
    c.write(Buffer.from([0, 0, 0, 3]));
    c.write(option(8, Buffer.alloc(0))); // STRUCTURED_REPLY
    let rep = await c.read(20);
    expect(rep.readUInt32BE(12)).toBe(1); // ACK
    const go = Buffer.alloc(6 + 1);
    go.writeUInt32BE(1, 0);
    go.write('p', 4);
    go.writeUInt16BE(0, 5);
    c.write(option(7, go));
    for (;;) {
      rep = await c.read(20);
      const len = rep.readUInt32BE(16);
      if (len) await c.read(len);
      if (rep.readUInt32BE(12) === 1) break;
    }
    // 64 writes and reads interleaved, different sizes, one pipeline.
    const want = new Map<bigint, string>();
    for (let i = 0; i < 64; i++) {
      const off = BigInt(2 * MiB + i * 8192);
      c.request(1, BigInt(1000 + i), off, 4096, i % 8 === 0 ? 1 : 0, Buffer.alloc(4096, i)); // some FUA
      want.set(BigInt(1000 + i), 'write');
      c.request(0, BigInt(2000 + i), BigInt(i * 16384), 16384);
      want.set(BigInt(2000 + i), 'read');
    }
    const got = new Map<bigint, Buffer[]>();
    let done = 0;
    while (done < want.size) {
      const ch = await chunk(c);
      expect(want.has(ch.cookie)).toBe(true);
      expect(ch.type & 0x8000).toBe(0);
      if (ch.type !== 0) got.set(ch.cookie, [...(got.get(ch.cookie) ?? []), Buffer.from([ch.type]), ch.payload]);
      if (ch.flags & 1) done++;
    }
    // Reads of [0, 64k) are data; reads in the unallocated range come back as holes.
    const first = got.get(2000n)!;
    expect(first[0]![0]).toBe(1);
    expect(first[1]!.subarray(8).equals(Buffer.alloc(16384, 0x61))).toBe(true);
    const hole = got.get(2010n)!; // offset 160k: unallocated
    expect(hole[0]![0]).toBe(2);
    expect(hole[1]!.readUInt32BE(8)).toBe(16384);
    c.close();
    await s.close();
    server = null;
    for (const n of nodes.splice(0)) unref(n);
    await settleCloses();
    expect(await qemuIo(img, 'qcow2', [`read -P 5 ${2 * MiB + 5 * 8192} 4k`, `read -P 63 ${2 * MiB + 63 * 8192} 4k`])).not.toMatch(/failed/);
  });
});

describe('NBD export: several clients, removal and shutdown', () => {
  it('close() fails a write still waiting for its payload with ESHUTDOWN instead of waiting for it', async () => {
    const img = tmp('sd.raw');
    writeFileSync(img, pattern(2 * MiB, 8));
    const s = await startServer();
    s.addExport({ name: 'sd', node: await open(img, 'raw'), writable: true });
    const c = new RawClient(sock);
    await c.handshake('sd');
    c.request(1, 5n, 0n, MiB);
    c.write(Buffer.alloc(MiB / 2, 1)); // half the payload
    await sleep(50);
    const t0 = Date.now();
    await s.close();
    server = null;
    expect(Date.now() - t0).toBeLessThan(1000); // not the 5 s grace
    expect(await c.simpleReply()).toEqual({ error: 108, cookie: 5n });
    await c.closed;
    expect(readFileSync(img).equals(pattern(2 * MiB, 8))).toBe(true);
  });

  it('serves several connections at once (nbdcopy multi-conn, two qemu-io writers)', async () => {
    const img = tmp('mc.raw');
    const data = pattern(32 * MiB, 21);
    writeFileSync(img, data);
    const s = await startServer();
    s.addExport({ name: 'mc', node: await open(img, 'raw'), writable: true });
    let most = 0;
    const spy = setInterval(() => (most = Math.max(most, s.exports()[0]!.clients)), 1);
    const out1 = tmp('mc1.raw');
    const out2 = tmp('mc2.raw');
    await Promise.all([
      shOk('nbdcopy', ['--connections=4', '--requests=16', uri('mc'), out1]),
      shOk('nbdcopy', ['--connections=2', uri('mc'), out2]),
    ]);
    await Promise.all([qemuIo(uri('mc'), 'raw', ['write -P 0xe1 0 1M', 'read -P 0xe1 0 1M']), qemuIo(uri('mc'), 'raw', ['write -P 0xe2 16M 1M', 'read -P 0xe2 16M 1M'])]);
    clearInterval(spy);
    expect(most).toBeGreaterThanOrEqual(2);
    expect(readFileSync(out1).equals(data)).toBe(true);
    expect(readFileSync(out2).equals(data)).toBe(true);
    const now = readFileSync(img);
    expect(now.subarray(0, MiB).equals(Buffer.alloc(MiB, 0xe1))).toBe(true);
    expect(now.subarray(16 * MiB, 17 * MiB).equals(Buffer.alloc(MiB, 0xe2))).toBe(true);
  });

  it("removeExport: 'safe' refuses while a client is connected, 'hard' drops it", async () => {
    const img = tmp('rm.raw');
    writeFileSync(img, pattern(MiB, 4));
    const s = await startServer();
    const node = await open(img, 'raw');
    s.addExport({ name: 'rm', node, writable: true });
    expect(() => s.addExport({ name: 'rm', node, writable: false })).toThrow(/already has export named 'rm'/);
    const c = new RawClient(sock);
    await c.handshake('rm');
    await expect(s.removeExport('rm', 'safe')).rejects.toThrow("export 'rm' still in use");
    expect(s.exports().map((e) => e.name)).toEqual(['rm']);
    await s.removeExport('rm', 'hard');
    await c.closed; // dropped
    expect(s.exports()).toEqual([]);
    const r = await sh('nbdinfo', [uri('rm')]);
    expect(r.code).not.toBe(0);
    expect(r.stderr).toMatch(/No such file or directory for export: rm/);
    await expect(s.removeExport('rm')).rejects.toThrow(/not found/);
    // The node is free again: a new export on it works.
    s.addExport({ name: 'again', node, writable: false });
    expect(JSON.parse(await shOk('nbdinfo', ['--json', uri('again')])).exports[0]['export-size']).toBe(MiB);
  });

  it('close() answers requests in flight, then drops clients and releases exports', async () => {
    const s = await startServer();
    // null-co with 300 ms latency: the read is surely in flight when close() starts.
    const node = await openNode({ driver: 'null-co', size: 4 * MiB, 'latency-ns': 300e6, 'read-zeroes': true });
    nodes.push(node);
    s.addExport({ name: 'c', node, writable: false });
    const c = new RawClient(sock);
    await c.handshake('c');
    c.request(0, 7n, 0n, 2 * MiB);
    await sleep(100);
    const t0 = Date.now();
    const closing = s.close();
    const rep = await c.simpleReply();
    expect(rep).toEqual({ error: 0, cookie: 7n });
    expect((await c.read(2 * MiB)).equals(Buffer.alloc(2 * MiB))).toBe(true);
    await c.closed;
    await closing;
    expect(Date.now() - t0).toBeGreaterThanOrEqual(150);
    server = null;
    expect(s.exports()).toEqual([]);
    expect(liveBackends().some((b) => b.device?.id === 'nbd-export:c')).toBe(false);
    expect((await sh('nbdinfo', [uri('c')])).code).not.toBe(0);
  });
});
