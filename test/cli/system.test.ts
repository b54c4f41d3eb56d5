// `spindle system` started the way QEMU's libqtest starts qemu-system: the test listens on
// the qtest and QMP sockets, the machine connects to both; then by hand (server=on), the way
// socat would drive it.
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { connect, createServer, type Server, type Socket } from 'node:net';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { bundle, ensureBuilt, spindle } from './helpers.js';
import { scratchDir } from '../helpers/tmp.js';

/** Lines from a socket, awaited one at a time. */
class Lines {
  private buf = '';
  private readonly queue: string[] = [];
  private waiter: ((l: string) => void) | null = null;
  constructor(readonly socket: Socket) {
    socket.setEncoding('utf8');
    socket.on('data', (d: string) => {
      this.buf += d;
      for (let nl = this.buf.indexOf('\n'); nl >= 0; nl = this.buf.indexOf('\n')) {
        const line = this.buf.slice(0, nl).replace(/\r$/, '');
        this.buf = this.buf.slice(nl + 1);
        if (this.waiter) {
          const w = this.waiter;
          this.waiter = null;
          w(line);
        } else this.queue.push(line);
      }
    });
  }
  next(): Promise<string> {
    const l = this.queue.shift();
    if (l !== undefined) return Promise.resolve(l);
    return new Promise((r) => (this.waiter = r));
  }
  async cmd(line: string): Promise<string> {
    this.socket.write(`${line}\n`);
    return this.next();
  }
  async qmp(execute: string, args?: object): Promise<Record<string, unknown>> {
    this.socket.write(`${JSON.stringify({ execute, ...(args ? { arguments: args } : {}) })}\n`);
    for (;;) {
      const msg = JSON.parse(await this.next()) as Record<string, unknown>;
      if (!('event' in msg)) return msg;
    }
  }
}

function listenOnce(path: string): { server: Server; accepted: Promise<Lines> } {
  let resolve!: (l: Lines) => void;
  const accepted = new Promise<Lines>((r) => (resolve = r));
  const server = createServer((s) => resolve(new Lines(s)));
  server.listen(path);
  return { server, accepted };
}

function exited(p: ChildProcess): Promise<{ code: number | null; stderr: string }> {
  let stderr = '';
  p.stderr!.setEncoding('utf8').on('data', (d: string) => (stderr += d));
  return new Promise((r) => p.on('exit', (code) => r({ code, stderr })));
}

const dir = scratchDir('spindle-system-');
beforeAll(ensureBuilt);

describe('spindle system', () => {
  it('connects to the harness as QEMU does, answers qtest and QMP, and quits on QMP quit', async () => {
    const qt = listenOnce(join(dir, 'qtest.sock'));
    const qm = listenOnce(join(dir, 'qmp.sock'));
    const log = join(dir, 'qtest.log');
    const img = join(dir, 'disk.img');
    writeFileSync(img, Buffer.alloc(1 << 20));
    const p = spawn(process.execPath, [
      bundle, 'system', '-qtest', `unix:${join(dir, 'qtest.sock')}`, '-qtest-log', log,
      '-chardev', `socket,path=${join(dir, 'qmp.sock')},id=char0`, '-mon', 'chardev=char0,mode=control',
      '-display', 'none', '-machine', 'pc', '-m', '64', '-nodefaults',
      '-drive', `file=${img},if=none,id=drive0,format=raw`, '-accel', 'qtest',
    ]);
    const done = exited(p);
    const [q, m] = await Promise.all([qt.accepted, qm.accepted]);
    const greeting = JSON.parse(await m.next()) as { QMP: { version: { qemu: object }; capabilities: unknown[] } };
    expect(greeting.QMP.capabilities).toEqual([]);
    expect(await m.qmp('query-status')).toEqual({ error: { class: 'CommandNotFound', desc: "Expecting capabilities negotiation with 'qmp_capabilities'" } });
    expect(await m.qmp('qmp_capabilities')).toEqual({ return: {} });
    expect((await m.qmp('query-status'))['return']).toMatchObject({ status: 'running' });
    expect((await m.qmp('no-such-command'))['error']).toMatchObject({ class: 'CommandNotFound' });
    // The i440FX host bridge through config mechanism #1, and fw_cfg's RAM size.
    expect(await q.cmd('outl 0xcf8 0x80000000')).toBe('OK');
    expect(await q.cmd('inl 0xcfc')).toBe('OK 0x12378086');
    expect(await q.cmd('outw 0x510 0x3')).toBe('OK');
    const ram: string[] = [];
    for (let i = 0; i < 8; i++) ram.push((await q.cmd('inb 0x511')).slice(3));
    expect(ram.map((h) => Number(h)).reduce((a, b, i) => a + b * 256 ** i, 0)).toBe(64 << 20);
    expect(await q.cmd('write 0x1000 4 0xdeadbeef')).toBe('OK');
    expect(await q.cmd('readl 0x1000')).toBe('OK 0x00000000efbeadde');
    expect(await q.cmd('irq_intercept_in ioapic')).toBe('OK');
    expect(await q.cmd('clock_step 1000')).toBe('OK 1000');
    expect(await q.cmd('frobnicate')).toBe("FAIL Unknown command 'frobnicate'");
    expect(await m.qmp('quit')).toEqual({ return: {} });
    const r = await done;
    expect(r.code, r.stderr).toBe(0);
    expect(readFileSync(log, 'utf8')).toMatch(/^\[R \+\d+\.\d{6}\] outl 0xcf8 0x80000000\n\[S \+\d+\.\d{6}\] OK\n/);
    qt.server.close();
    qm.server.close();
  });

  it('listens with server=on, so a person (or socat) can drive it, and stops on SIGTERM', async () => {
    const path = join(dir, 'hand.sock');
    const p = spawn(process.execPath, [bundle, 'system', '-machine', 'pc', '-qtest', `unix:${path},server=on,wait=off`, '-display', 'none']);
    const done = exited(p);
    let s: Socket | undefined;
    // The socket exists once the machine is up: poll for it (readiness, not timing).
    for (let tries = 0; !s && tries < 3000; tries++) {
      s = await new Promise<Socket | undefined>((r) => {
        const c = connect(path);
        c.once('connect', () => r(c));
        c.once('error', () => setTimeout(() => r(undefined), 10));
      });
    }
    const q = new Lines(s!);
    expect(await q.cmd('endianness')).toBe('OK little');
    expect(await q.cmd('outl 0xcf8 0x80000800')).toBe('OK'); // 00:01.0
    expect(await q.cmd('inl 0xcfc')).toBe('OK 0x70008086');
    p.kill('SIGTERM');
    expect((await done).code).toBe(0);
  });

  it('refuses unknown options, device models it does not have, and bad values by name', () => {
    for (const [args, msg] of [
      [['-frobnicate'], /^spindle system: -frobnicate: invalid option$/m],
      [['-m'], /-m: requires an argument/],
      [['-m', 'lots'], /-m: invalid size 'lots'/],
      [['-machine', 'q35'], /unsupported machine type 'q35'/],
      [['-device', 'e1000,netdev=n0'], /-device e1000: Spindle has no such device model yet/],
      [['-device', 'virtio-blk-pci,drive=d0'], /Property 'virtio-blk-device.drive' can't find value 'd0'/],
      [['-device', 'virtio-blk-pci,drive=d0,bogus=1'], /Property 'virtio-blk-pci.bogus' not found/],
      [['-device', 'ide-hd,bus=ide.7,drive=d0'], /Bus 'ide.7' not found/],
      [['-device', 'xen-disk,vdev=hda'], /invalid vdev 'hda'/],
      [['-drive', 'file=x.img,if=scsi'], /if=scsi: Spindle has no scsi controller/],
      [['-drive', 'file=x.img,if=ide,bogus=1'], /-drive: Invalid parameter 'bogus'/],
      [['-drive', 'file=x.img,cache=fast'], /Invalid cache mode 'fast'/],
      [['-drive', 'file=x.img,format=raw,werror=sometimes'], /werror|sometimes/],
      [['-qtest', 'udp:localhost:4444'], /only 'unix:PATH' and 'tcp:HOST:PORT' sockets are supported/],
      [['-qmp', 'tcp:localhost:99999,server=on'], /-qmp: 'localhost:99999' is not HOST:PORT/],
      [['-mon', 'chardev=nope,mode=control'], /chardev 'nope' not found/],
      [['-drive', 'file=/nonexistent/x.img,if=none'], /nonexistent/],
    ] as const) {
      const r = spindle('system', ...args);
      expect(r.status, `${args.join(' ')}: ${r.stderr}`).toBe(1);
      expect(r.stderr, args.join(' ')).toMatch(msg);
    }
  });

  it('can be driven by hand with socat: IDENTIFY of the IDE disk from -drive if=ide', async () => {
    const img = join(dir, 'socat.img');
    writeFileSync(img, Buffer.alloc(1 << 20));
    const sock = join(dir, 'socat.sock');
    // socat listens, as a person would start it; the machine connects to it (QEMU's default).
    const cmds = ['outl 0xcf8 0x80000900', 'inl 0xcfc', 'outb 0x1f6 0xe0', 'outb 0x1f7 0xec', 'inb 0x1f7', 'inw 0x1f0'];
    const socat = spawn('socat', [`UNIX-LISTEN:${sock}`, '-']);
    socat.on('error', (e) => {
      throw new Error(`socat is needed by this test (Debian socat): ${e.message}`);
    });
    let out = '';
    const replies = new Promise<string[]>((resolve) => {
      socat.stdout.setEncoding('utf8').on('data', (d: string) => {
        out += d;
        const lines = out.split('\n').filter(Boolean);
        if (lines.length >= cmds.length) resolve(lines);
      });
    });
    // Wait for socat's socket before starting the machine (readiness, not timing).
    for (let i = 0; i < 3000 && !existsSync(sock); i++) await new Promise((r) => setTimeout(r, 10));
    const p = spawn(process.execPath, [bundle, 'system', '-machine', 'pc', '-qtest', `unix:${sock}`, '-drive', `file=${img},if=ide,format=raw`, '-display', 'none']);
    const done = exited(p);
    socat.stdin.write(`${cmds.join('\n')}\n`);
    expect(await replies).toEqual(['OK', 'OK 0x70108086', 'OK', 'OK', 'OK 0x0058', 'OK 0x0040']);
    p.kill('SIGTERM');
    expect((await done).code).toBe(0);
    socat.kill();
  });

  it('with no arguments boots the embedded default (what npm start runs): the guest program on qcow2 overlay disks, ending with its verdict', () => {
    const r = spindle('system');
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/booting the embedded guest \(roms\/guest\) from .*ide\.qcow2 \(IDE\) and .*virtio\.qcow2 \(virtio-blk\) over .*base\.raw/);
    for (const line of ['ide0 base ok', 'ide0 pio pattern ok', 'ide0 dma 16 sectors ok (IRQ 14), irq ok', 'ide0 dma code ok', 'virtio 00:02.0 base ok',
      'virtio 00:02.0 pattern 16 sectors ok']) expect(r.stdout).toContain(`spindle guest: ${line}\n`);
    expect(r.stdout.endsWith('spindle guest: disks checked: 2\nspindle guest: PASS\n')).toBe(true);
  });

  it('says what to install or pass when there is no firmware, and what a -kernel is not', () => {
    const nofw = spindle('system', '-bios', join(dir, 'nope.bin'), '-hda', join(dir, 'nope.img'));
    expect(nofw.status).toBe(1);
    expect(nofw.stderr).toMatch(/^spindle system: -bios: could not read '.*nope\.bin': No such file or directory$/m);
    const junk = join(dir, 'junk.bin');
    writeFileSync(junk, Buffer.alloc(4096, 0x41));
    expect(spindle('system', '-kernel', junk).stderr).toMatch(/-kernel: '.*junk\.bin' is neither a multiboot kernel nor a Linux bzImage/);
    expect(spindle('system', '-initrd', junk).stderr).toMatch(/-initrd only allowed with -kernel option/);
  });

  it('refuses a -kernel it cannot read, and -kernel together with -qtest', () => {
    const bad = spindle('system', '-kernel', join(dir, 'nope.elf'));
    expect(bad.status).toBe(1);
    expect(bad.stderr).toMatch(/-kernel: could not read '.*nope\.elf'/);
    const both = spindle('system', '-kernel', 'x', '-qtest', 'unix:/tmp/x.sock');
    expect(both.stderr).toMatch(/driven by a CPU or by qtest, not both/);
  });
});

