// vhost-user host facts against real kernel objects: UNIX sockets carrying fds
// (our own listener/connection and a python3 peer), shared mappings of memfds,
// eventfds, EOF/close behaviour and fd leaks.
import { spawn } from 'node:child_process';
import { closeSync, fstatSync, openSync, readdirSync, readFileSync, readSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import { Worker } from 'node:worker_threads';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { native } from '../../src/native/addon.js';
import { EngineError } from '../../src/native/errors.js';
import {
  closeFd, eventfd, eventfdRead, eventfdWrite, liveMappings, memfdCreate, mmapFd, unmapFd,
  UnixConnection, UnixListener, type ReceivedMessage,
} from '../../src/native/unix-fd.js';
import { tempDir } from './helpers.js';

const fdCount = (): number => readdirSync('/proc/self/fd').length;
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
/** A few turns of the event loop: a readable socket's poll callback would have run by then. */
async function loopTurns(n = 3): Promise<void> {
  for (let i = 0; i < n; i++) await new Promise<void>((r) => setImmediate(r));
}

async function until(what: string, pred: () => boolean, ms = 5000): Promise<void> {
  const end = Date.now() + ms;
  while (!pred()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(2);
  }
}

function errOf(f: () => unknown): unknown {
  try {
    f();
  } catch (e) {
    return e;
  }
  throw new Error('expected an exception');
}

/** Collects everything a connection receives; records EOF and callbacks after EOF. */
class Inbox {
  msgs: ReceivedMessage[] = [];
  data: Buffer[] = [];
  eof = false;
  callbacks = 0;
  callbacksAfterEof = 0;
  errors: EngineError[] = [];
  constructor(readonly conn: UnixConnection) {
    const buf = Buffer.alloc(4096);
    conn.onReadable((err) => {
      this.callbacks++;
      if (this.eof) this.callbacksAfterEof++;
      if (err) {
        this.errors.push(err);
        return;
      }
      for (;;) {
        const m = conn.recv(buf);
        if (m === null) return;
        if (m.bytes === 0 && m.fds.length === 0) {
          this.eof = true;
          return;
        }
        this.msgs.push(m);
        this.data.push(Buffer.from(buf.subarray(0, m.bytes)));
      }
    });
  }
  get text(): string {
    return Buffer.concat(this.data).toString();
  }
  get fds(): number[] {
    return this.msgs.flatMap((m) => m.fds);
  }
}

let dir: string;
let cleanup: () => void;
beforeAll(() => {
  ({ dir, cleanup } = tempDir());
});
afterAll(() => cleanup());

describe('UNIX sockets carrying fds, in one process', () => {
  it('passes an eventfd and a memfd: kicks cross, and both mappings see each other', async () => {
    const before = fdCount();
    const path = join(dir, 'a.sock');
    const accepted: UnixConnection[] = [];
    const server = UnixListener.listen(path, (c) => accepted.push(c));
    const client = UnixConnection.connect(path);
    await until('accept', () => accepted.length === 1);
    const serverSide = new Inbox(accepted[0]!);
    const clientSide = new Inbox(client);

    const efd = eventfd(0, true);
    const mfd = memfdCreate('spindle-test', 1 << 16);
    expect(fstatSync(mfd).size).toBe(1 << 16);
    expect(client.send(Buffer.from('SET_MEM_TABLE'), [efd, mfd])).toBe(13);
    await until('message with fds', () => serverSide.msgs.length > 0);
    expect(serverSide.text).toBe('SET_MEM_TABLE');
    const got = serverSide.fds;
    expect(got).toHaveLength(2);
    // New fds in this process, not the numbers we sent.
    expect(got).not.toContain(efd);
    expect(got).not.toContain(mfd);
    const [rEfd, rMfd] = got as [number, number];

    // The receiver kicks; the sender reads the count.
    expect(eventfdRead(efd)).toBe(0);
    eventfdWrite(rEfd, 3);
    eventfdWrite(rEfd, 4);
    expect(eventfdRead(efd)).toBe(7);
    expect(eventfdRead(efd)).toBe(0);

    // Both map the memfd (writable) and see each other's writes.
    const mine = new Uint8Array(mmapFd(mfd, 1 << 16, 0, true));
    const theirs = new Uint8Array(mmapFd(rMfd, 4096, 8192, true)); // page 2 only
    mine[8192 + 5] = 0xab;
    expect(theirs[5]).toBe(0xab);
    theirs[100] = 0x5a;
    expect(mine[8192 + 100]).toBe(0x5a);
    // Unaligned offsets map the enclosing pages.
    const odd = new Uint8Array(mmapFd(rMfd, 10, 8192 + 99, false));
    expect(odd[1]).toBe(0x5a);
    expect(odd.length).toBe(10);
    // And the writes are in the file itself.
    const b = Buffer.alloc(1);
    readSync(mfd, b, 0, 1, 8192 + 100);
    expect(b[0]).toBe(0x5a);

    // A reply the other way, without fds.
    accepted[0]!.send(Buffer.from('ok'));
    await until('reply', () => clientSide.text === 'ok');
    expect(clientSide.fds).toEqual([]);

    for (const ab of [mine.buffer, theirs.buffer, odd.buffer]) unmapFd(ab as ArrayBuffer);
    for (const fd of [efd, mfd, rEfd, rMfd]) closeFd(fd);
    client.close();
    await until('EOF on the server side', () => serverSide.eof);
    accepted[0]!.close();
    server.close();
    expect(fdCount()).toBe(before);
  });

  it('peer close: EOF once, no callbacks after it, polling stops; closing our side frees every fd', async () => {
    const before = fdCount();
    const [a, b] = UnixConnection.pair();
    const inbox = new Inbox(a);
    expect(a.polling).toBe(true);
    b.send(Buffer.from('last words'));
    b.close();
    await until('EOF', () => inbox.eof);
    expect(inbox.text).toBe('last words');
    expect(a.ended).toBe(true);
    expect(a.polling).toBe(false);
    const n = inbox.callbacks;
    await loopTurns();
    expect(inbox.callbacks).toBe(n);
    expect(inbox.callbacksAfterEof).toBe(0);
    a.close();
    a.close(); // idempotent
    expect(fdCount()).toBe(before);
  });

  it('the readiness callback runs through MakeCallback: its microtasks run before the next I/O callback', async () => {
    // Two sockets readable in the same loop iteration: the first callback's microtask must
    // already have run when the second callback starts (a plain call would defer it).
    const [a1, b1] = UnixConnection.pair();
    const [a2, b2] = UnixConnection.pair();
    const order: string[] = [];
    let n = 0;
    const handler = (conn: UnixConnection) => () => {
      if (conn.recv(Buffer.alloc(8)) === null) return;
      const me = ++n;
      order.push(`callback${me}`);
      void Promise.resolve().then(() => order.push(`microtask${me}`));
    };
    a1.onReadable(handler(a1));
    a2.onReadable(handler(a2));
    try {
      b1.send(Buffer.from('x'));
      b2.send(Buffer.from('y'));
      await until('both callbacks', () => order.length === 4);
      expect(order).toEqual(['callback1', 'microtask1', 'callback2', 'microtask2']);
    } finally {
      for (const c of [a1, b1, a2, b2]) c.close();
    }
  });

  it('close() from inside the callback: no further callbacks though data is still queued', async () => {
    const [a, b] = UnixConnection.pair();
    let calls = 0;
    a.onReadable(() => {
      calls++;
      a.close(); // nothing read: the fd would stay readable forever
    });
    b.send(Buffer.from('x'));
    b.send(Buffer.from('y'));
    await until('first callback', () => calls === 1);
    await loopTurns();
    expect(calls).toBe(1);
    // The peer sees our close.
    expect(errOf(() => b.send(Buffer.from('z')))).toMatchObject({ code: 'EPIPE' });
    expect(a.polling).toBe(false);
    b.close();
  });

  it('a socket file left by a dead server is replaced; a live server\'s socket and other files are not', async () => {
    const path = join(dir, 'stale.sock');
    const first = UnixListener.listen(path, () => {});
    // A live listener keeps its path.
    expect(errOf(() => UnixListener.listen(path, () => {}))).toMatchObject({ code: 'EADDRINUSE' });
    UnixConnection.connect(path).close();
    first.close(false); // as if the server died: the file stays, no one accepts
    expect(errOf(() => UnixConnection.connect(path))).toMatchObject({ code: 'ECONNREFUSED' });
    const accepted: UnixConnection[] = [];
    const second = UnixListener.listen(path, (c) => accepted.push(c));
    const client = UnixConnection.connect(path);
    await until('accept', () => accepted.length === 1);
    client.close();
    accepted[0]!.close();
    second.close();
    // Not a socket: left alone.
    const file = join(dir, 'not-a-socket');
    writeFileSync(file, 'data');
    expect(errOf(() => UnixListener.listen(file, () => {}))).toMatchObject({ code: 'EADDRINUSE' });
    expect(readFileSync(file, 'utf8')).toBe('data');
  });

  it('closing our side while polling, with the peer still open, stops polling without a leak', async () => {
    const before = fdCount();
    const path = join(dir, 'b.sock');
    const accepted: UnixConnection[] = [];
    const server = UnixListener.listen(path, (c) => accepted.push(c));
    const client = UnixConnection.connect(path);
    await until('accept', () => accepted.length === 1);
    const inbox = new Inbox(accepted[0]!);
    accepted[0]!.close();
    expect(errOf(() => client.send(Buffer.from('too late')))).toMatchObject({ code: 'EPIPE' });
    await loopTurns();
    expect(inbox.callbacks).toBe(0);
    expect(accepted[0]!.polling).toBe(false);
    // Our close is the client's EOF (or a reset).
    const cInbox = new Inbox(client);
    await until('client EOF', () => cInbox.eof || cInbox.errors.length > 0);
    client.close();
    server.close();
    expect(fdCount()).toBe(before);
    expect(errOf(() => UnixConnection.connect(path))).toMatchObject({ code: 'ENOENT' });
  });

  it('a message with more fds than maxFds is refused and its fds are closed', async () => {
    const [a, b] = UnixConnection.pair();
    const before = fdCount();
    const fds = [eventfd(), eventfd(), eventfd()];
    b.send(Buffer.from('m'), fds);
    for (const fd of fds) closeFd(fd);
    await loopTurns();
    expect(fdCount()).toBe(before);
    expect(errOf(() => a.recv(Buffer.alloc(16), 2))).toMatchObject({ code: 'EMSGSIZE' });
    expect(fdCount()).toBe(before);
    a.close();
    b.close();
  });

  it('many messages with fds in a burst all arrive, in order', async () => {
    const [a, b] = UnixConnection.pair();
    const inbox = new Inbox(a);
    const N = 50;
    for (let i = 0; i < N; i++) {
      const e = eventfd(i + 1, true);
      const msg = Buffer.alloc(4);
      msg.writeUInt32LE(i);
      expect(b.send(msg, [e])).toBe(4);
      closeFd(e);
    }
    await until('all messages', () => inbox.fds.length === N);
    // Each fd arrived with the bytes of its own sendmsg (the kernel does not merge across fds).
    inbox.msgs.forEach((m, i) => {
      expect(m.bytes).toBe(4);
      expect(m.fds).toHaveLength(1);
      expect(inbox.data[i]!.readUInt32LE(0)).toBe(i);
      expect(eventfdRead(m.fds[0]!)).toBe(i + 1);
      closeFd(m.fds[0]!);
    });
    a.close();
    b.close();
  });
});

describe('lifetime', () => {
  it('an unstarted socket dropped without close() is closed when collected', async () => {
    setFlagsFromString('--expose-gc');
    const gc = runInNewContext('gc') as () => void;
    gc();
    await sleep(5);
    const before = fdCount();
    (() => {
      UnixConnection.pair();
    })();
    expect(fdCount()).toBe(before + 2);
    for (let i = 0; i < 50 && fdCount() > before; i++) {
      gc();
      await sleep(5);
    }
    expect(fdCount()).toBe(before);
  });

  it('a worker that exits with polling sockets still open tears down cleanly', async () => {
    const addonFile = join(process.cwd(), 'build', 'Release', 'spindle_native.node');
    const code = `
      const { parentPort } = require('node:worker_threads');
      const n = require(${JSON.stringify(addonFile)});
      const [x, y] = n.socketPair();
      const a = new n.UnixSocket(x), b = new n.UnixSocket(y);
      let calls = 0;
      a.start(() => { calls++; a.recvmsg(Buffer.alloc(64)); });
      b.start(() => {});
      b.sendmsg(Buffer.from('hi'));
      setTimeout(() => { parentPort.postMessage(calls); process.exit(0); }, 20);
    `;
    const w = new Worker(code, { eval: true });
    const exited = new Promise((r) => w.on('exit', r));
    const calls = await new Promise<number>((resolve, reject) => {
      w.on('message', resolve);
      w.on('error', reject);
    }).finally(() => exited);
    expect(calls).toBe(1);
    expect(await exited).toBe(0);
  });
});

describe('a real peer: python3 socket.send_fds / recv_fds', () => {
  it('receives a file fd from python, reads the file through it, and sends python an eventfd', async () => {
    const before = fdCount();
    const path = join(dir, 'py.sock');
    const file = join(dir, 'payload.txt');
    writeFileSync(file, 'contents only the fd can reveal');
    const script = [
      'import os, socket, sys',
      'path, file = sys.argv[1], sys.argv[2]',
      's = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)',
      's.connect(path)',
      'fd = os.open(file, os.O_RDONLY)',
      'socket.send_fds(s, [b"HELLO"], [fd])',
      'os.close(fd)',
      'os.unlink(file)',  // from now on only the fd reaches the data
      'msg, fds, flags, addr = socket.recv_fds(s, 100, 4)',
      'assert len(fds) == 1, fds',
      'os.write(fds[0], (41).to_bytes(8, "little"))',
      'sys.stdout.write(msg.decode())',
      's.close()',
    ].join('\n');
    const accepted: UnixConnection[] = [];
    const server = UnixListener.listen(path, (c) => accepted.push(c));
    const py = spawn('python3', ['-c', script, path, file], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    py.stdout.on('data', (d: Buffer) => (out += d.toString()));
    py.stderr.on('data', (d: Buffer) => (err += d.toString()));
    const exited = new Promise<number | null>((r) => py.on('close', r));

    await until('python connects', () => accepted.length === 1);
    const conn = accepted[0]!;
    const inbox = new Inbox(conn);
    await until('python message', () => inbox.fds.length === 1);
    expect(inbox.text).toBe('HELLO');
    const fileFd = inbox.fds[0]!;
    const buf = Buffer.alloc(100);
    await until('python unlinked the file', () => {
      try {
        closeSync(openSync(file, 'r'));
        return false;
      } catch {
        return true;
      }
    });
    const n = readSync(fileFd, buf, 0, 100, 0);
    expect(buf.subarray(0, n).toString()).toBe('contents only the fd can reveal');
    expect(fstatSync(fileFd).size).toBe(31);

    const efd = eventfd(1, true);
    conn.send(Buffer.from('ACK'), [efd]);
    expect(await exited, err).toBe(0);
    expect(out).toBe('ACK');
    expect(eventfdRead(efd)).toBe(42); // 1 + python's 41
    await until('EOF from python', () => inbox.eof);
    expect(inbox.callbacksAfterEof).toBe(0);

    closeFd(efd);
    closeFd(fileFd);
    conn.close();
    server.close();
    expect(fdCount()).toBe(before);
  });
});

describe('mmapFd', () => {
  it('refuses bad ranges and bad fds with clear errors', () => {
    const mfd = memfdCreate('ranges', 8192);
    expect(errOf(() => mmapFd(mfd, 0))).toBeInstanceOf(RangeError);
    expect(String(errOf(() => mmapFd(mfd, 0)))).toMatch(/length must be > 0/);
    expect(String(errOf(() => mmapFd(mfd, -1)))).toMatch(/length must be > 0/);
    expect(String(errOf(() => mmapFd(mfd, 4096, -4096)))).toMatch(/offset must be >= 0/);
    expect(String(errOf(() => mmapFd(mfd, 2 ** 53, 0)))).toMatch(/exceeds 2\^53/);
    expect(String(errOf(() => mmapFd(mfd, 2 ** 52, 2 ** 52)))).toMatch(/exceeds 2\^53/);
    expect(String(errOf(() => mmapFd(mfd, 1.5)))).toMatch(/integers/);
    // Too large for the address space: the kernel's ENOMEM.
    expect(errOf(() => mmapFd(mfd, 2 ** 50))).toMatchObject({ code: 'ENOMEM' });
    // Not a mappable fd.
    expect(errOf(() => mmapFd(999_999, 4096))).toMatchObject({ code: 'EBADF' });
    const efd = eventfd();
    expect(errOf(() => mmapFd(efd, 4096))).toBeInstanceOf(EngineError);
    closeFd(efd);
    // Read-only fd, writable map.
    const ro = openSync(`/proc/self/fd/${mfd}`, 'r');
    expect(errOf(() => mmapFd(ro, 4096, 0, true))).toMatchObject({ code: 'EACCES' });
    const view = new Uint8Array(mmapFd(ro, 4096, 0, false));
    expect(view[0]).toBe(0);
    unmapFd(view.buffer as ArrayBuffer);
    closeSync(ro);
    closeFd(mfd);
    expect(errOf(() => mmapFd(-1, 4096))).toBeInstanceOf(TypeError);
  });

  it('unmapFd detaches every view, frees the mapping, and refuses anything else', () => {
    const mfd = memfdCreate('unmap', 4096);
    const live = liveMappings();
    const ab = mmapFd(mfd, 4096);
    const v = new Uint8Array(ab);
    v[0] = 1;
    expect(liveMappings()).toBe(live + 1);
    expect(mapsMention('unmap')).toBe(true);
    unmapFd(ab);
    expect(ab.byteLength).toBe(0);
    expect(v.length).toBe(0);
    expect(v[0]).toBeUndefined();
    expect(liveMappings()).toBe(live);
    expect(mapsMention('unmap')).toBe(false);
    expect(errOf(() => unmapFd(ab))).toMatchObject({ code: 'EINVAL' });
    expect(errOf(() => unmapFd(new ArrayBuffer(8)))).toMatchObject({ code: 'EINVAL' });
    closeFd(mfd);
  });

  it('the mapping is munmapped when its ArrayBuffer is collected', async () => {
    setFlagsFromString('--expose-gc');
    const gc = runInNewContext('gc') as () => void;
    const mfd = memfdCreate('collected', 4096);
    const live = liveMappings();
    (() => {
      new Uint8Array(mmapFd(mfd, 4096))[0] = 7;
    })();
    expect(liveMappings()).toBe(live + 1);
    expect(mapsMention('collected')).toBe(true);
    for (let i = 0; i < 50 && liveMappings() > live; i++) {
      gc();
      await sleep(5);
    }
    expect(liveMappings()).toBe(live);
    expect(mapsMention('collected')).toBe(false);
    closeFd(mfd);
  });
});

/** Whether /proc/self/maps has a mapping of the memfd called `name`. */
function mapsMention(name: string): boolean {
  const maps = readFileSyncText('/proc/self/maps');
  return maps.includes(`/memfd:${name} `) || maps.includes(`/memfd:${name}\n`);
}
function readFileSyncText(p: string): string {
  const fd = openSync(p, 'r');
  try {
    const chunks: Buffer[] = [];
    const b = Buffer.alloc(65536);
    for (;;) {
      const n = readSync(fd, b, 0, b.length, null);
      if (n === 0) break;
      chunks.push(Buffer.from(b.subarray(0, n)));
    }
    return Buffer.concat(chunks).toString();
  } finally {
    closeSync(fd);
  }
}

describe('eventfd, memfd and argument errors', () => {
  it('eventfd counts, blocks nowhere, and reports errors', () => {
    const fd = eventfd(5, true);
    expect(eventfdRead(fd)).toBe(5);
    expect(eventfdRead(fd)).toBe(0);
    expect(native.eventfdRead(fd)).toBe(-11); // -EAGAIN from the raw call
    eventfdWrite(fd, 2 ** 40);
    expect(eventfdRead(fd)).toBe(2 ** 40);
    expect(errOf(() => eventfdWrite(fd, 0))).toBeInstanceOf(RangeError);
    expect(errOf(() => eventfd(-1))).toBeInstanceOf(RangeError);
    closeFd(fd);
    expect(errOf(() => eventfdRead(fd))).toMatchObject({ code: 'EBADF' });
    expect(errOf(() => eventfdWrite(fd, 1))).toMatchObject({ code: 'EBADF' });
    expect(errOf(() => closeFd(fd))).toMatchObject({ code: 'EBADF' });
    // Reading a non-eventfd with 8 bytes: a memfd at EOF returns 0 bytes.
    const m = memfdCreate('not-an-eventfd', 0);
    expect(errOf(() => eventfdRead(m))).toMatchObject({ code: 'EINVAL' });
    closeFd(m);
  });

  it('memfdCreate sizes the file and refuses bad sizes', () => {
    const fd = memfdCreate('sized', 12345);
    expect(fstatSync(fd).size).toBe(12345);
    closeFd(fd);
    expect(errOf(() => memfdCreate('neg', -1))).toBeInstanceOf(RangeError);
    expect(errOf(() => memfdCreate('x'.repeat(300), 1))).toBeInstanceOf(RangeError);
  });

  it('sockets refuse bad fds, non-sockets, busy paths and missing peers', () => {
    const closed = eventfd();
    closeFd(closed);
    expect(errOf(() => new UnixConnection(closed))).toMatchObject({ errno: -9 });
    const notSock = eventfd();
    expect(String(errOf(() => new UnixConnection(notSock)))).toMatch(/is not a socket/);
    closeFd(notSock);
    const path = join(dir, 'busy.sock');
    const l = UnixListener.listen(path, () => {}, { ref: false });
    expect(errOf(() => UnixListener.listen(path, () => {}))).toMatchObject({ code: 'EADDRINUSE' });
    l.close();
    expect(errOf(() => UnixConnection.connect(join(dir, 'nobody.sock')))).toMatchObject({ code: 'ENOENT' });
    expect(errOf(() => UnixConnection.connect(join(dir, 'x'.repeat(200))))).toMatchObject({ code: 'ENAMETOOLONG' });
    const [a, b] = UnixConnection.pair();
    expect(errOf(() => a.recv(Buffer.alloc(0)))).toBeInstanceOf(RangeError);
    expect(errOf(() => a.send(Buffer.alloc(0), [1]))).toBeInstanceOf(RangeError);
    expect(errOf(() => a.send(Buffer.from('x'), [-1]))).toBeInstanceOf(TypeError);
    expect(errOf(() => a.send(Buffer.from('x'), [999_999]))).toMatchObject({ code: 'EBADF' });
    expect(a.recv(Buffer.alloc(8))).toBeNull(); // EAGAIN, not EOF
    a.onReadable(() => {});
    expect(String(errOf(() => a.onReadable(() => {})))).toMatch(/already started/);
    a.close();
    expect(errOf(() => a.recv(Buffer.alloc(8)))).toMatchObject({ code: 'EBADF' });
    expect(errOf(() => a.send(Buffer.from('x')))).toMatchObject({ code: 'EBADF' });
    b.close();
  });
});
