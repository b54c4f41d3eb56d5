// Debian's i386 Linux boots on the v86 CPU through Debian's SeaBIOS, its disks served by
// Spindle: an ext2 filesystem built by mke2fs -d under two qcow2 overlays, one through
// ata_piix (IDE, bus-master DMA) and one through virtio_blk. The guest reads the host's file,
// writes its own, syncs and powers off; the host reads the files back through Spindle and
// checks the overlays with qemu-img. A second guest reads an ISO through ide-cd while the
// monitor ejects it: refused while the guest holds the tray locked, done once it lets go.
import { execFileSync, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { connect } from 'node:net';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { bundle, ensureBuilt, ok, qemuImg, spindle } from '../cli/helpers.js';
import { scratchDir } from '../helpers/tmp.js';
import { buildInitrd, GUEST_READY, guestInit, linuxGuestAssets } from './guest-assets.js';

const dir = scratchDir('spindle-linux-');
const CMDLINE = 'console=ttyS0 cryptomgr.notests noisapnp';
const md5 = (b: Uint8Array): string => createHash('md5').update(b).digest('hex');

interface Booted {
  out: string;
  code: number | null;
}

/**
 * Boots the kernel with an initrd running `script`; `onLine` sees each COM1 line and may type
 * at the guest's console (what arrives on spindle's stdin). Resolves when the process ends.
 */
function boot(script: string, modules: string[], args: string[], onLine?: (line: string, type: (s: string) => void) => void): Promise<Booted> {
  const a = linuxGuestAssets();
  const initrd = join(dir, `initrd-${modules.length}-${md5(Buffer.from(script)).slice(0, 8)}.gz`);
  writeFileSync(initrd, buildInitrd({ init: guestInit(script), modules }));
  const p = spawn(process.execPath, [bundle, 'system', '-m', '128', '-kernel', a.kernel, '-initrd', initrd, '-append', CMDLINE, '-serial', 'stdio', ...args]);
  let out = '';
  let err = '';
  let partial = '';
  p.stderr.on('data', (d: Buffer) => (err += d.toString()));
  p.stdout.on('data', (d: Buffer) => {
    const s = d.toString('latin1');
    out += s;
    partial += s;
    const lines = partial.split('\n');
    partial = lines.pop()!;
    for (const l of lines) onLine?.(l.replace(/\r$/, ''), (t) => p.stdin.write(t));
  });
  return new Promise((resolve) => p.on('exit', (code) => resolve({ out: (out + err).replace(/\r\n/g, '\n'), code })));
}

/** A QMP session on a UNIX socket: negotiates, then runs commands and collects events. */
async function qmp(path: string): Promise<{ run(cmd: string, args?: object): Promise<Record<string, unknown>>; events: Record<string, unknown>[]; close(): void }> {
  const s = connect(path);
  await new Promise<void>((r, j) => s.once('connect', r).once('error', j));
  const events: Record<string, unknown>[] = [];
  const waiting: ((m: Record<string, unknown>) => void)[] = [];
  let buf = '';
  s.on('data', (d) => {
    buf += d.toString();
    let i;
    while ((i = buf.indexOf('\n')) >= 0) {
      const m = JSON.parse(buf.slice(0, i)) as Record<string, unknown>;
      buf = buf.slice(i + 1);
      if (m['event']) events.push(m);
      else if (!m['QMP']) waiting.shift()?.(m);
    }
  });
  const run = (cmd: string, args?: object): Promise<Record<string, unknown>> =>
    new Promise((r) => {
      waiting.push(r);
      s.write(JSON.stringify({ execute: cmd, ...(args ? { arguments: args } : {}) }) + '\n');
    });
  await run('qmp_capabilities');
  return { run, events, close: () => s.destroy() };
}

describe('Linux on Spindle', () => {
  beforeAll(async () => {
    linuxGuestAssets(); // a clear error if the guest was never fetched
    await ensureBuilt();
  });

  it('writes files onto ext2 in qcow2 overlays through ata_piix and virtio_blk; the host reads them back', async () => {
    const src = join(dir, 'src');
    mkdirSync(src);
    writeFileSync(join(src, 'seed.txt'), 'seed from the host\n');
    const base = join(dir, 'base.raw');
    execFileSync('mke2fs', ['-q', '-F', '-t', 'ext2', '-d', src, base, '16M']);
    const baseSum = md5(readFileSync(base));
    const overlays = { ide: join(dir, 'ide.qcow2'), virtio: join(dir, 'virtio.qcow2') };
    for (const o of Object.values(overlays)) ok(qemuImg('create', '-q', '-f', 'qcow2', '-b', base, '-F', 'raw', o));
    const script = [
      'mkdir -p /mnt/a /mnt/b',
      'mount -t ext2 /dev/sda /mnt/a || echo "guest: mount sda failed"',
      'mount -t ext2 /dev/vda /mnt/b || echo "guest: mount vda failed"',
      'echo "guest: sda seed: $(cat /mnt/a/seed.txt)"',
      'echo "guest: vda seed: $(cat /mnt/b/seed.txt)"',
      'echo "written by the guest through ata_piix" > /mnt/a/guest.txt',
      'echo "written by the guest through virtio_blk" > /mnt/b/guest.txt',
      'dd if=/dev/urandom of=/mnt/a/big.bin bs=64k count=32 2>/dev/null',
      'cp /mnt/a/big.bin /mnt/b/big.bin',
      'echo "guest: md5 $(md5sum /mnt/b/big.bin)"',
      'sync',
      'umount /mnt/a && umount /mnt/b && echo "guest: unmounted"',
    ].join('\n');
    const r = await boot(script, ['ata_piix', 'sd_mod', 'virtio_pci', 'virtio_blk', 'crc32c_generic', 'ext4'], [
      '-drive', `file=${overlays.ide},if=ide,format=qcow2`, '-drive', `file=${overlays.virtio},if=virtio,format=qcow2`,
    ]);
    expect(r.code, r.out).toBe(0);
    expect(r.out).toContain(GUEST_READY);
    expect(r.out).toMatch(/ata1\.00: ATA-\d+: SPINDLE HARDDISK/);
    expect(r.out).toMatch(/virtio_blk virtio0: \[vda\] 32768 512-byte logical blocks/);
    expect(r.out).toContain('guest: sda seed: seed from the host\n');
    expect(r.out).toContain('guest: vda seed: seed from the host\n');
    expect(r.out).toContain('guest: unmounted\n');
    // ACPI (SeaBIOS's tables, the PIIX4 PM block) powers the machine off, which ends the run.
    expect(r.out).toContain('ACPI: PM: Preparing to enter system sleep state S5\n');
    expect(r.out).toMatch(/reboot: Power down\n/);
    expect(r.out).not.toMatch(/Start\/Stop Unit failed/); // STANDBY IMMEDIATE at shutdown is fine
    const guestMd5 = /guest: md5 ([0-9a-f]{32})/.exec(r.out)?.[1];
    expect(guestMd5).toBeDefined();
    expect(md5(readFileSync(base))).toBe(baseSum); // the base never changed
    for (const [kind, overlay] of Object.entries(overlays)) {
      ok(qemuImg('check', '-q', overlay));
      // Read back through Spindle: its qcow2 driver flattens the chain, e2fsprogs reads the files.
      const flat = join(dir, `${kind}.raw`);
      const c = spindle('img', 'convert', '-O', 'raw', overlay, flat);
      expect(c.status, c.stderr).toBe(0);
      ok(qemuImg('compare', '-q', overlay, flat));
      execFileSync('e2fsck', ['-fn', flat], { stdio: 'pipe' });
      const text = execFileSync('debugfs', ['-R', 'cat /guest.txt', flat], { stdio: ['ignore', 'pipe', 'ignore'] }).toString();
      expect(text).toBe(`written by the guest through ${kind === 'ide' ? 'ata_piix' : 'virtio_blk'}\n`);
      const big = join(dir, `${kind}-big.bin`);
      execFileSync('debugfs', ['-R', `dump /big.bin ${big}`, flat], { stdio: 'ignore' });
      expect(md5(readFileSync(big))).toBe(guestMd5);
    }
  }, 180_000);

  it('reads an ISO through ide-cd; eject is refused while the guest holds the tray locked and works once it lets go', async () => {
    const src = join(dir, 'iso');
    mkdirSync(src);
    writeFileSync(join(src, 'cd.txt'), 'read from the CD\n');
    const iso = join(dir, 'cd.iso');
    execFileSync('xorrisofs', ['-quiet', '-o', iso, src], { stdio: 'ignore' });
    const sock = join(dir, 'qmp.sock');
    const script = [
      'mkdir -p /mnt/cd',
      'mount -t iso9660 /dev/sr0 /mnt/cd && echo "guest: cd says $(cat /mnt/cd/cd.txt)"',
      'echo "guest: mounted"; read go',
      'umount /mnt/cd',
      'echo "guest: let go"; read go',
      'dd if=/dev/sr0 of=/dev/null bs=2048 count=1 2>&1 | head -1 | sed "s/^/guest: after eject: /"',
    ].join('\n');
    let monitor: Awaited<ReturnType<typeof qmp>> | null = null;
    const replies: Record<string, unknown>[] = [];
    let events: Record<string, unknown>[] = [];
    const r = await boot(script, ['ata_piix', 'sr_mod', 'isofs'], [
      '-drive', `if=none,id=cd0,file=${iso},media=cdrom,format=raw`, '-device', 'ide-cd,drive=cd0,id=cdrom0', '-qmp', `unix:${sock},server=on,wait=off`,
    ], (line, type) => {
      if (line === 'guest: mounted') {
        void (async () => {
          monitor = await qmp(sock);
          replies.push(await monitor.run('eject', { id: 'cdrom0' }));
          type('go\n');
        })();
      } else if (line === 'guest: let go') {
        void (async () => {
          replies.push(await monitor!.run('eject', { id: 'cdrom0' }));
          events = [...monitor!.events];
          type('go\n');
        })();
      }
    });
    (monitor as { close(): void } | null)?.close();
    expect(r.code, r.out).toBe(0);
    expect(r.out).toContain('guest: cd says read from the CD\n');
    expect(replies[0]).toEqual({ error: { class: 'GenericError', desc: "Device 'cdrom0' is locked and force was not specified, wait for tray to open and try again" } });
    expect(replies[1]).toEqual({ return: {} });
    expect(events.map((e) => [e['event'], e['data']])).toEqual([['DEVICE_TRAY_MOVED', { device: 'cd0', id: 'cdrom0', 'tray-open': true }]]);
    expect(r.out).toMatch(/guest: after eject: .*No medium found/);
  }, 180_000);
});
