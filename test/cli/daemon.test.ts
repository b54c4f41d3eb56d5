// `spindle daemon`, Spindle's qemu-storage-daemon: block nodes from --blockdev, iothreads from
// --object, QMP monitors on UNIX and TCP chardevs, a pidfile; iothread objects through QMP,
// and a node moved into one and back; errors for what it does not have, by name.
import { execFileSync, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { bundle, ensureBuilt, spindle } from './helpers.js';
import { scratchDir } from '../helpers/tmp.js';
import { qmpConnect } from '../helpers/qmp.js';

const dir = scratchDir('spindle-daemon-');

/** A TCP port nobody listens on right now. */
async function freePort(): Promise<number> {
  const srv = createServer();
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
  const port = (srv.address() as { port: number }).port;
  await new Promise<void>((r) => srv.close(() => r()));
  return port;
}

/** Starts the daemon; resolves once its pidfile exists (it writes it when ready). */
async function startDaemon(args: string[], pidfile: string): Promise<ChildProcess> {
  const p = spawn(process.execPath, [bundle, 'daemon', ...args, '--pidfile', pidfile]);
  let err = '';
  p.stderr!.on('data', (d: Buffer) => (err += d.toString()));
  for (let i = 0; i < 500 && !existsSync(pidfile); i++) {
    if (p.exitCode !== null) throw new Error(`daemon exited: ${err}`);
    await new Promise((r) => setTimeout(r, 20));
  }
  return p;
}

describe('spindle daemon', () => {
  beforeAll(ensureBuilt);

  it('serves QMP on UNIX and TCP monitors: iothreads, a node moved into one and back, quit', async () => {
    const img = join(dir, 'a.img');
    writeFileSync(img, Buffer.alloc(1 << 20));
    const sock = join(dir, 'qmp.sock');
    const port = await freePort();
    const pidfile = join(dir, 'd.pid');
    const p = await startDaemon([
      '--blockdev', `driver=file,node-name=f0,filename=${img}`,
      '--blockdev', '{"driver": "raw", "node-name": "r0", "file": "f0"}',
      '--object', 'iothread,id=io0,poll-max-ns=0',
      '--chardev', `socket,id=m0,path=${sock},server=on,wait=off`, '--monitor', 'chardev=m0',
      '--chardev', `socket,id=m1,host=127.0.0.1,port=${port},server=on,wait=off`, '--monitor', 'm1',
    ], pidfile);
    const exited = new Promise<number | null>((r) => p.on('exit', (c) => r(c)));
    expect(Number(readFileSync(pidfile, 'utf8'))).toBe(p.pid);
    const a = await qmpConnect(sock);
    const b = await qmpConnect(port);
    expect(a.greeting).toMatchObject({ QMP: { version: { package: expect.stringMatching(/^spindle-/) } } });
    expect(await a.run('query-iothreads')).toEqual({ return: [{ id: 'io0', 'thread-id': p.pid, 'poll-max-ns': 0, 'poll-grow': 0, 'poll-shrink': 0, 'aio-max-batch': 0 }] });
    expect(await b.run('object-add', { 'qom-type': 'iothread', id: 'io1' })).toEqual({ return: {} });
    expect((await a.run('object-add', { 'qom-type': 'iothread', id: 'io1' }))['error']).toMatchObject({ class: 'GenericError' });
    expect((await a.run('object-add', { 'qom-type': 'memory-backend-ram', id: 'm' }))['error']).toMatchObject({ class: 'GenericError' });
    expect(await a.run('x-blockdev-set-iothread', { 'node-name': 'r0', iothread: 'io0' })).toEqual({ return: {} });
    // r0's file node moved with it, so io0 is in use until both come back.
    expect(await a.run('object-del', { id: 'io0' })).toEqual({ error: { class: 'GenericError', desc: "iothread 'io0' is in use by node 'f0'" } });
    expect(await a.run('x-blockdev-set-iothread', { 'node-name': 'nope', iothread: 'io0' })).toEqual({ error: { class: 'GenericError', desc: 'Cannot find node nope' } });
    expect(await a.run('x-blockdev-set-iothread', { 'node-name': 'f0', iothread: null })).toEqual({ return: {} });
    expect(await a.run('object-del', { id: 'io0' })).toEqual({ return: {} });
    expect((await b.run('query-iothreads'))['return']).toEqual([expect.objectContaining({ id: 'io1' })]);
    // --blockdev nodes are the monitor's, as blockdev-add's: listed, and deleted top first.
    const names = ((await a.run('query-named-block-nodes'))['return'] as { 'node-name': string }[]).map((n) => n['node-name']);
    expect(names.sort()).toEqual(['f0', 'r0']);
    expect((await a.run('blockdev-del', { 'node-name': 'f0' }))['error']).toMatchObject({ class: 'GenericError' }); // r0 uses it
    expect(await a.run('blockdev-del', { 'node-name': 'r0' })).toEqual({ return: {} });
    expect(await a.run('blockdev-del', { 'node-name': 'f0' })).toEqual({ return: {} });
    expect(await a.run('query-named-block-nodes')).toEqual({ return: [] });
    expect(await b.run('quit')).toEqual({ return: {} });
    expect(await exited).toBe(0);
    expect(a.events.map((e) => e['event'])).toEqual(['SHUTDOWN']); // every client gets the event
    expect(existsSync(pidfile)).toBe(false);
    a.close();
    b.close();
  });

  it('exports a node over NBD from the command line and over QMP; QEMU reads and writes it', async () => {
    const img = join(dir, 'nbd.img');
    const data = Buffer.alloc(1 << 20);
    for (let i = 0; i < data.length; i++) data[i] = (i * 13) & 0xff;
    writeFileSync(img, data);
    const sock = join(dir, 'q2.sock');
    const nbd = join(dir, 'nbd.sock');
    const pidfile = join(dir, 'n.pid');
    const p = await startDaemon([
      '--blockdev', `driver=file,node-name=nf,filename=${img}`, '--blockdev', 'driver=raw,node-name=nr,file=nf',
      '--object', 'iothread,id=io0',
      '--nbd-server', `addr.type=unix,addr.path=${nbd}`, '--export', 'type=nbd,id=e0,node-name=nr,name=disk,writable=on,iothread=io0',
      '--chardev', `socket,id=m,path=${sock},server=on,wait=off`, '--monitor', 'chardev=m',
    ], pidfile);
    const exited = new Promise<number | null>((r) => p.on('exit', (c) => r(c)));
    const q = await qmpConnect(sock);
    try {
      const uri = `nbd+unix:///disk?socket=${nbd}`;
      const info = JSON.parse(execFileSync('qemu-img', ['info', '--output=json', uri]).toString()) as { 'virtual-size': number };
      expect(info['virtual-size']).toBe(1 << 20);
      execFileSync('qemu-io', ['-f', 'raw', '-c', 'write -P 0xab 4096 4096', uri]);
      expect(readFileSync(img).subarray(4096, 8192).every((x) => x === 0xab)).toBe(true);
      expect(await q.ok('query-block-exports')).toEqual([{ type: 'nbd', id: 'e0', 'node-name': 'nr', 'shutting-down': false }]);
      expect(await q.err('block-export-add', { type: 'nbd', id: 'e0', 'node-name': 'nf' })).toEqual({ class: 'GenericError', desc: "Block export id 'e0' is already in use" });
      // iothread=io0 moved the exported node into the iothread, as QEMU's export does.
      expect((await q.err('object-del', { id: 'io0' })).desc).toMatch(/^iothread 'io0' is in use by node 'n[rf]'$/);
      expect(await q.err('block-export-add', { type: 'nbd', id: 'e9', 'node-name': 'nf', iothread: 'nope' })).toEqual({ class: 'GenericError', desc: 'iothread "nope" not found' });
      expect(await q.run('block-export-add', { type: 'nbd', id: 'e1', 'node-name': 'nf', name: 'file' })).toEqual({ return: {} });
      // A read-only export: QEMU's client is refused a write.
      const ro = spawnSync('qemu-io', ['-f', 'raw', '-c', 'write 0 512', `nbd+unix:///file?socket=${nbd}`], { encoding: 'utf8' });
      expect(ro.stdout + ro.stderr).toMatch(/Permission denied|Operation not permitted/); // QEMU's client will not open it for writing
      expect(readFileSync(img).subarray(0, 512).equals(data.subarray(0, 512))).toBe(true);
      expect(await q.run('block-export-del', { id: 'e1' })).toEqual({ return: {} });
      expect(q.events.filter((e) => e['event'] === 'BLOCK_EXPORT_DELETED').map((e) => e['data'])).toEqual([{ id: 'e1' }]);
      expect(await q.err('nbd-server-start', { addr: { type: 'unix', data: { path: nbd } } })).toEqual({ class: 'GenericError', desc: 'NBD server already running' });
      expect(await q.run('nbd-server-stop')).toEqual({ return: {} });
      expect(await q.ok('query-block-exports')).toEqual([]);
      expect(await q.err('nbd-server-stop')).toEqual({ class: 'GenericError', desc: 'NBD server not running' });
      expect(await q.run('quit')).toEqual({ return: {} });
      expect(await exited).toBe(0);
    } finally {
      q.close();
      if (p.exitCode === null) p.kill();
    }
  });

  it('vhost-user-blk exports from the command line and QMP: iothread, listing, errors, deletion', async () => {
    const img = join(dir, 'vu.img');
    writeFileSync(img, Buffer.alloc(1 << 20));
    const sock = join(dir, 'q3.sock');
    const vu0 = join(dir, 'vu0.sock');
    const vu1 = join(dir, 'vu1.sock');
    const p = await startDaemon([
      '--blockdev', `driver=file,node-name=vf,filename=${img}`, '--blockdev', 'driver=raw,node-name=vr,file=vf',
      '--object', 'iothread,id=io0',
      '--export', `type=vhost-user-blk,id=v0,node-name=vr,addr.type=unix,addr.path=${vu0},writable=on,num-queues=2,iothread=io0`,
      '--chardev', `socket,id=m,path=${sock},server=on,wait=off`, '--monitor', 'chardev=m',
    ], join(dir, 'v.pid'));
    const exited = new Promise<number | null>((r) => p.on('exit', (c) => r(c)));
    const q = await qmpConnect(sock);
    try {
      expect(existsSync(vu0)).toBe(true);
      expect(await q.ok('query-block-exports')).toEqual([{ type: 'vhost-user-blk', id: 'v0', 'node-name': 'vr', 'shutting-down': false }]);
      const vu = (o: Record<string, unknown>) => ({ type: 'vhost-user-blk', id: 'v1', 'node-name': 'vf', addr: { type: 'unix', path: vu1 }, ...o });
      expect(await q.err('block-export-add', vu({ id: 'v0' }))).toEqual({ class: 'GenericError', desc: "Block export id 'v0' is already in use" });
      expect(await q.err('block-export-add', vu({ addr: { type: 'inet', host: '127.0.0.1', port: '1' } }))).toEqual({ class: 'GenericError', desc: "vhost-user-blk needs addr.type=unix, not 'inet'" });
      expect(await q.err('block-export-add', vu({ iothread: 'nope' }))).toEqual({ class: 'GenericError', desc: 'iothread "nope" not found' });
      expect(await q.err('block-export-add', vu({ 'logical-block-size': 1000 }))).toEqual({
        class: 'GenericError', desc: "Parameter 'logical-block-size' must be a power of 2 between 512 and 2097152, not 1000",
      });
      expect(await q.err('block-export-add', vu({ type: 'nbd' }))).toEqual({ class: 'GenericError', desc: "Parameter 'addr' is unexpected" });
      expect(await q.run('block-export-add', vu({ 'logical-block-size': 4096 }))).toEqual({ return: {} });
      expect(existsSync(vu1)).toBe(true);
      expect((await q.ok('query-block-exports') as unknown[]).length).toBe(2);
      expect(await q.run('block-export-del', { id: 'v1' })).toEqual({ return: {} });
      expect(existsSync(vu1)).toBe(false);
      expect(q.events.filter((e) => e['event'] === 'BLOCK_EXPORT_DELETED').map((e) => e['data'])).toEqual([{ id: 'v1' }]);
      expect(await q.run('quit')).toEqual({ return: {} });
      expect(await exited).toBe(0);
    } finally {
      q.close();
      if (p.exitCode === null) p.kill();
    }
    expect(existsSync(vu0)).toBe(false);
  });

  it('exits cleanly on SIGTERM, and refuses what it does not have, by name', async () => {
    const pidfile = join(dir, 'e.pid');
    const p = await startDaemon(['--object', 'iothread,id=x'], pidfile);
    const exited = new Promise<number | null>((r) => p.on('exit', (c) => r(c)));
    p.kill('SIGTERM');
    expect(await exited).toBe(0);
    expect(existsSync(pidfile)).toBe(false);
    const cases: [string[], RegExp][] = [
      [['--daemonize', 'x'], /^spindle daemon: --daemonize: not supported yet/m],
      [['--export', 'type=nbd,id=x,node-name=y'], /--export: type=nbd needs --nbd-server/],
      [['--export', 'type=fuse,id=x'], /export type 'fuse' is not supported \(nbd, vhost-user-blk\)/],
      [['--export', 'type=vhost-user-blk,id=x,node-name=n,addr.type=inet,addr.host=a,addr.port=1'], /vhost-user-blk needs addr.type=unix/],
      [['--frob', 'x'], /^spindle daemon: --frob: invalid option$/m],
      [['--monitor', 'chardev=nope'], /--monitor: chardev 'nope' not found/],
      [['--blockdev', 'driver=null-co'], /'node-name' must be specified for the root node/],
      [['--object', 'iothread,id=y,poll-max-ns=x'], /--object: Parameter 'poll-max-ns' expects a number/],
      [['--blockdev', `driver=file,node-name=f,filename=${join(dir, 'nope.img')}`], /nope\.img/],
    ];
    for (const [args, re] of cases) {
      const r = spindle('daemon', ...args);
      expect(r.status, args.join(' ')).toBe(1);
      expect(r.stderr).toMatch(re);
    }
    expect(spindle('daemon', '--help').stdout).toMatch(/--blockdev .*\n[\s\S]*--pidfile/);
  });
});
