// Debian's amd64 Linux on real QEMU, its disk served over vhost-user-blk by Spindle's storage
// daemon: an ext2 filesystem built by mke2fs -d, in qcow2. The guest mounts it, checks the host's
// file, writes its own, syncs and powers off; the host checks the image with qemu-img and reads
// the files back with e2fsprogs. Then a guest is SIGKILLed mid-run and a second QEMU reconnects
// to the same, still running daemon and finds what the first synced; and the other way round,
// the daemon is SIGKILLed and a new one on the same socket serves the running guest, also with
// writes in flight, which it resubmits from the inflight buffer QEMU kept.
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { bundle, ensureBuilt, ok, qemuImg } from '../cli/helpers.js';
import { qmpConnect } from '../helpers/qmp.js';
import { pattern, scratchDir } from '../helpers/tmp.js';
import { buildInitrd, GUEST_READY, guestInit, linuxGuestAssets } from './guest-assets.js';
import { type Accel, killAll, startQemuGuest, startStorageDaemon, type StorageDaemon, workingAccel } from './qemu-guest.js';

// The daemon under test. `SPINDLE_TEST_DAEMON=qemu-storage-daemon` runs QEMU's own, which takes the
// same options: the reference to tell a harness problem from a Spindle one.
const DAEMON = process.env.SPINDLE_TEST_DAEMON === 'qemu-storage-daemon' ? ['qemu-storage-daemon'] : [process.execPath, bundle, 'daemon'];
const MODULES = ['virtio_pci', 'virtio_blk', 'crc32c_generic', 'ext4'];
// The host's e2fsck with its ldd closure: checks the disk from inside the guest, and proves host
// binaries run there (the Linux bench runs fio that way).
const E2FSCK = '/usr/sbin/e2fsck';
const BOOT_MS = 60_000;

const dir = scratchDir('spindle-qemu-vu-');
const md5 = (b: Uint8Array): string => createHash('md5').update(b).digest('hex');
afterAll(killAll);

/**
 * An ext2 filesystem holding `files`, converted to qcow2 (the daemon's qcow2 driver and the
 * TypeScript data plane serve it) or left raw (served by the native worker, the fast path).
 */
function ext2Image(name: string, files: Record<string, Uint8Array | string>, format: 'qcow2' | 'raw' = 'qcow2', blockSize?: number): string {
  const src = join(dir, `${name}-src`);
  mkdirSync(src);
  for (const [f, data] of Object.entries(files)) writeFileSync(join(src, f), data);
  const raw = join(dir, `${name}.raw`);
  execFileSync('mke2fs', ['-q', '-F', '-t', 'ext2', ...(blockSize ? ['-b', String(blockSize)] : []), '-d', src, raw, '64M']);
  if (format === 'raw') return raw;
  const img = join(dir, `${name}.qcow2`);
  ok(qemuImg('convert', '-q', '-f', 'raw', '-O', 'qcow2', raw, img));
  return img;
}

/**
 * The daemon serving `img` on `sock`; `numQueues` is the export's (QEMU's device may not ask for
 * more); `qmp`: a QMP monitor's socket; `writethrough`: no volatile write cache (a completed
 * write survives the daemon's death).
 */
function daemon(img: string, sock: string, pidfile: string, numQueues = 1, qmp?: string, writethrough = false, extra = ''): Promise<StorageDaemon> {
  return startStorageDaemon(DAEMON, [
    ...(qmp ? ['--chardev', `socket,id=m0,path=${qmp},server=on,wait=off`, '--monitor', 'chardev=m0'] : []),
    '--blockdev', `driver=file,node-name=file0,filename=${img}`,
    '--blockdev', `driver=${img.endsWith('.qcow2') ? 'qcow2' : 'raw'},node-name=disk0,file=file0`,
    '--export', `type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path=${sock},writable=on${numQueues > 1 ? `,num-queues=${numQueues}` : ''}${writethrough ? ',writethrough=on' : ''}${extra}`,
  ], pidfile);
}

function initrd(name: string, script: string): string {
  const path = join(dir, `${name}.initrd.gz`);
  writeFileSync(path, buildInitrd({ init: guestInit(script), modules: MODULES, arch: 'amd64', binaries: [E2FSCK] }));
  return path;
}

/** The image's filesystem as raw, checked by e2fsck (and qemu-img check for qcow2), for debugfs. */
function flatChecked(img: string): string {
  if (!img.endsWith('.qcow2')) {
    execFileSync('e2fsck', ['-fn', img], { stdio: 'pipe' });
    return img;
  }
  ok(qemuImg('check', '-q', img));
  const raw = join(dir, `${img.replace(/.*\//, '')}.flat`);
  ok(qemuImg('convert', '-q', '-O', 'raw', img, raw));
  execFileSync('e2fsck', ['-fn', raw], { stdio: 'pipe' }); // throws on any inconsistency
  return raw;
}

function debugfsCat(raw: string, path: string): Buffer {
  const out = join(dir, `dump-${md5(Buffer.from(raw + path)).slice(0, 8)}`);
  execFileSync('debugfs', ['-R', `dump ${path} ${out}`, raw], { stdio: 'ignore' });
  return readFileSync(out);
}

const guestSays = (out: string, what: string): string | undefined => new RegExp(`guest: ${what} ([0-9a-f]{32})`).exec(out)?.[1];

describe(`Linux on QEMU over vhost-user-blk from ${DAEMON.length === 1 ? DAEMON[0] : 'spindle daemon'}`, () => {
  let assets: ReturnType<typeof linuxGuestAssets>;
  let accel: Accel;
  beforeAll(async () => {
    assets = linuxGuestAssets('amd64'); // a clear error if the guest was never fetched
    await ensureBuilt();
    accel = await workingAccel(assets.kernel);
  }, 30_000);

  it('mounts ext2 in qcow2, reads the host file, writes files; qemu-img check and e2fsprogs agree afterwards', async () => {
    const hostFile = pattern(300_000, 7);
    const img = ext2Image('a', { 'host.bin': hostFile });
    const sock = join(dir, 'a.sock');
    const qmpSock = join(dir, 'a.qmp');
    const d = await daemon(img, sock, join(dir, 'a.pid'), 2, qmpSock);
    const script = [
      // block_resize on the daemon while the guest runs: the guest sees the new size.
      'echo "guest: size $(cat /sys/block/vda/size)"',
      'read go',
      'for i in $(seq 1 100); do [ "$(cat /sys/block/vda/size)" != 131072 ] && break; sleep 0.1; done',
      'echo "guest: resized to $(cat /sys/block/vda/size)"',
      'mkdir -p /mnt/d',
      'mount -t ext2 /dev/vda /mnt/d && echo "guest: mounted"',
      'echo "guest: host.bin $(md5sum /mnt/d/host.bin | cut -d" " -f1)"',
      'echo "written by the guest over vhost-user-blk" > /mnt/d/guest.txt',
      'mkdir /mnt/d/sub && echo nested > /mnt/d/sub/nested.txt',
      'dd if=/dev/urandom of=/mnt/d/big.bin bs=1M count=6 2>/dev/null',
      'echo "guest: big.bin $(md5sum /mnt/d/big.bin | cut -d" " -f1)"',
      'sync',
      'umount /mnt/d && echo "guest: unmounted"',
      `${E2FSCK} -fn /dev/vda >/dev/null 2>&1; echo "guest: e2fsck exit $?"`,
    ].join('\n');
    const t0 = Date.now();
    const g = startQemuGuest({ kernel: assets.kernel, initrd: initrd('a', script), disks: [{ socket: sock, numQueues: 2 }], smp: 2, accel, timeoutMs: BOOT_MS * 2 });
    try {
      await g.waitFor(GUEST_READY, BOOT_MS);
      console.log(`qemu-vhost-user: ${accel} boot to ${GUEST_READY} in ${Date.now() - t0} ms (2 vCPUs)`);
      expect(await g.waitFor('guest: size')).toBe('guest: size 131072');
      const q = await qmpConnect(qmpSock);
      try {
        expect(await q.run('block_resize', { 'node-name': 'disk0', size: 80 << 20 })).toEqual({ return: {} });
      } finally {
        q.close();
      }
      g.type('go\n');
      expect(await g.waitFor('guest: resized to')).toBe(`guest: resized to ${(80 << 20) / 512}`);
      const exit = await g.exited;
      const out = g.output();
      expect(exit, out).toEqual({ code: 0, signal: null }); // poweroff -f with -no-reboot
      expect(out).not.toContain('insmod');
      expect(out).toMatch(/virtio_blk virtio\d+: \[vda\] 131072 512-byte logical blocks/);
      expect(out).toMatch(/virtio_blk virtio\d+: 2\/0\/0 default\/read\/poll queues/); // both queues in use
      expect(out).toContain('guest: mounted\n');
      expect(guestSays(out, 'host.bin')).toBe(md5(hostFile));
      expect(out).toContain('guest: unmounted\n');
      expect(out).toContain('guest: e2fsck exit 0\n');
      expect(d.proc.exitCode, d.log()).toBeNull(); // the guest going away did not stop the daemon
      expect(await d.stop(), d.log()).toEqual({ code: 0, signal: null });
      const raw = flatChecked(img);
      expect(debugfsCat(raw, '/guest.txt').toString()).toBe('written by the guest over vhost-user-blk\n');
      expect(debugfsCat(raw, '/sub/nested.txt').toString()).toBe('nested\n');
      expect(md5(debugfsCat(raw, '/host.bin'))).toBe(md5(hostFile));
      const big = debugfsCat(raw, '/big.bin');
      expect(big.length).toBe(6 << 20);
      expect(md5(big)).toBe(guestSays(out, 'big.bin'));
    } finally {
      await g.kill();
      await d.stop();
    }
  }, BOOT_MS * 3);

  it('raw, on the native fast path, 4 KiB logical blocks: a second QEMU reconnects to the running daemon after the first is SIGKILLed, and sees what it synced', async () => {
    const img = ext2Image('b', { 'seed.txt': 'seed\n' }, 'raw', 4096);
    const sock = join(dir, 'b.sock');
    const d = await daemon(img, sock, join(dir, 'b.pid'), 1, undefined, false, ',logical-block-size=4096');
    const first = [
      'mkdir -p /mnt/d',
      'echo "guest: logical block $(cat /sys/block/vda/queue/logical_block_size)"',
      'mount -t ext2 /dev/vda /mnt/d && echo "guest: mounted"',
      'echo "from the first guest" > /mnt/d/first.txt',
      'dd if=/dev/urandom of=/mnt/d/first.bin bs=1M count=4 2>/dev/null',
      'echo "guest: first.bin $(md5sum /mnt/d/first.bin | cut -d" " -f1)"',
      'sync',
      'echo "guest: synced"',
      'read go', // holds the disk mounted until the host kills QEMU
    ].join('\n');
    const second = [
      'mkdir -p /mnt/d',
      'mount -t ext2 /dev/vda /mnt/d && echo "guest: mounted"',
      'echo "guest: first.txt says $(cat /mnt/d/first.txt)"',
      'echo "guest: first.bin $(md5sum /mnt/d/first.bin | cut -d" " -f1)"',
      'echo "from the second guest" > /mnt/d/second.txt',
      'sync',
      'umount /mnt/d && echo "guest: unmounted"',
    ].join('\n');
    const boot = (name: string, script: string) =>
      startQemuGuest({ kernel: assets.kernel, initrd: initrd(name, script), disks: [{ socket: sock }], accel, timeoutMs: BOOT_MS * 2 });
    const t0 = Date.now();
    const g1 = boot('b1', first);
    let g2: ReturnType<typeof boot> | undefined;
    try {
      await g1.waitFor(GUEST_READY, BOOT_MS);
      console.log(`qemu-vhost-user: ${accel} boot to ${GUEST_READY} in ${Date.now() - t0} ms (1 vCPU)`);
      expect(await g1.waitFor(/guest: logical block \d+/, BOOT_MS)).toContain('guest: logical block 4096');
      const line = await g1.waitFor(/guest: first\.bin [0-9a-f]{32}/, BOOT_MS);
      await g1.waitFor('guest: synced');
      const firstMd5 = /[0-9a-f]{32}/.exec(line)![0];
      expect(await g1.kill('SIGKILL')).toEqual({ code: null, signal: 'SIGKILL' });
      expect(d.proc.exitCode, d.log()).toBeNull();

      g2 = boot('b2', second);
      const exit = await g2.exited;
      const out = g2.output();
      expect(exit, out).toEqual({ code: 0, signal: null });
      expect(out).toContain('guest: mounted\n');
      expect(out).toContain('guest: first.txt says from the first guest\n');
      expect(guestSays(out, 'first.bin')).toBe(firstMd5);
      expect(out).toContain('guest: unmounted\n');
      expect(d.proc.exitCode, d.log()).toBeNull(); // up throughout
      expect(await d.stop(), d.log()).toEqual({ code: 0, signal: null });
      const raw = flatChecked(img);
      expect(debugfsCat(raw, '/second.txt').toString()).toBe('from the second guest\n');
      expect(md5(debugfsCat(raw, '/first.bin'))).toBe(firstMd5);
    } finally {
      await g1.kill();
      await g2?.kill();
      await d.stop();
    }
  }, BOOT_MS * 4);
  it('qcow2: the daemon is SIGKILLed while the guest idles; a new daemon on the same socket takes over, QEMU reconnects, the guest goes on', async () => {
    const img = ext2Image('c', { 'seed.txt': 'seed\n' }, 'qcow2');
    const sock = join(dir, 'c.sock');
    let d = await daemon(img, sock, join(dir, 'c1.pid'));
    const script = [
      'mkdir -p /mnt/d',
      'mount -t ext2 /dev/vda /mnt/d && echo "guest: mounted"',
      'dd if=/dev/urandom of=/mnt/d/before.bin bs=1M count=2 2>/dev/null',
      'sync',
      'echo "guest: synced"',
      'read go', // the host replaces the daemon meanwhile
      'dd if=/dev/urandom of=/mnt/d/after.bin bs=1M count=2 2>/dev/null',
      'echo 3 > /proc/sys/vm/drop_caches',
      'echo "guest: before.bin $(md5sum /mnt/d/before.bin | cut -d" " -f1)"',
      'echo "guest: after.bin $(md5sum /mnt/d/after.bin | cut -d" " -f1)"',
      'umount /mnt/d && echo "guest: unmounted"',
    ].join('\n');
    const g = startQemuGuest({ kernel: assets.kernel, initrd: initrd('c', script), disks: [{ socket: sock }], accel, timeoutMs: BOOT_MS * 2 });
    try {
      await g.waitFor('guest: synced', BOOT_MS);
      d.proc.kill('SIGKILL');
      expect(await d.exited).toEqual({ code: null, signal: 'SIGKILL' });
      d = await daemon(img, sock, join(dir, 'c2.pid'));
      g.type('go\n');
      const exit = await g.exited;
      const out = g.output();
      expect(exit, out).toEqual({ code: 0, signal: null });
      expect(out).toContain('guest: unmounted\n');
      expect(await d.stop(), d.log()).toEqual({ code: 0, signal: null });
      const raw = flatChecked(img);
      expect(md5(debugfsCat(raw, '/before.bin'))).toBe(guestSays(out, 'before.bin'));
      expect(md5(debugfsCat(raw, '/after.bin'))).toBe(guestSays(out, 'after.bin'));
    } finally {
      await g.kill();
      await d.stop();
    }
  }, BOOT_MS * 4);

  it('qcow2, two queues, write-through, RAM above 4 GiB: the daemon is SIGKILLed three times with guest writes in flight; each new daemon adopts QEMU\'s inflight buffer, resubmits them, and every byte lands', async () => {
    const hostFile = pattern(2 << 20, 5);
    const img = ext2Image('e', { 'host.bin': hostFile }, 'qcow2');
    const sock = join(dir, 'e.sock');
    // Write-through: with a write cache, a completed write not yet flushed may die with the daemon
    // (qcow2 metadata is written back on flush, as in QEMU); here every completed write must last.
    const serve = (n: number) => daemon(img, sock, join(dir, `e${n}.pid`), 2, undefined, true);
    let d = await serve(1);
    const N = [1, 2, 3, 4];
    const script = [
      'mkdir -p /mnt/d',
      'mount -t ext2 /dev/vda /mnt/d && echo "guest: mounted"',
      ...N.map((i) => `dd if=/dev/urandom of=/tmp/src${i} bs=1M count=4 2>/dev/null; echo "guest: src${i} $(md5sum /tmp/src${i} | cut -d" " -f1)"`),
      'echo "guest: cache $(cat /sys/block/vda/queue/write_cache)"',
      'echo "guest: writing"',
      // Small O_DIRECT writes from two vCPUs keep both queues busy; the worker forwards those that
      // allocate clusters to the block layer. Readers of the host's file, whose clusters the
      // worker serves itself, complete past them: a kill finds completions out of order.
      'pids=""',
      ...N.map((i) => `dd if=/tmp/src${i} of=/mnt/d/dst${i} bs=4k oflag=direct 2>/dev/null & pids="$pids $!"`),
      'for r in 1 2; do (while [ ! -e /tmp/done ]; do dd if=/mnt/d/host.bin bs=16k iflag=direct 2>/dev/null | md5sum; done >/tmp/reads$r) & done',
      'for p in $pids; do wait $p || echo "guest: a writer failed"; done',
      'touch /tmp/done; wait',
      'echo "guest: read $(cat /tmp/reads? | wc -l) times: $(cat /tmp/reads? | cut -d" " -f1 | sort -u | tr "\\n" " ")"',
      'echo "guest: written"',
      'read go', // the host looks at the last daemon's mappings meanwhile
      'sync',
      'echo 3 > /proc/sys/vm/drop_caches',
      ...N.map((i) => `echo "guest: dst${i} $(md5sum /mnt/d/dst${i} | cut -d" " -f1)"`),
      'umount /mnt/d && echo "guest: unmounted"',
    ].join('\n');
    // Inodes of the inflight buffers a daemon maps ("... <inode> /memfd:spindle-vhost-inflight (deleted)").
    const inflightMaps = (pid: number): string[] =>
      [...readFileSync(`/proc/${pid}/maps`, 'utf8').matchAll(/\s(\d+)\s+\/memfd:spindle-vhost-inflight/g)].map((m) => m[1]!);
    // 3 GiB of RAM: q35 puts 1 GiB of it at 4 GiB, where the guest's buffers mostly come from.
    const g = startQemuGuest({
      kernel: assets.kernel, initrd: initrd('e', script), disks: [{ socket: sock, numQueues: 2 }], smp: 2, memMiB: 3072, accel, timeoutMs: BOOT_MS * 2,
    });
    try {
      await g.waitFor('guest: writing', BOOT_MS);
      // QEMU asked for a buffer (GET_INFLIGHT_FD) when the queues started, and again after the
      // driver's reset at probe: the first daemon may map an older one too.
      const allocated = inflightMaps(d.pid);
      expect(allocated.length, 'no inflight buffer in the first daemon').toBeGreaterThan(0);
      // Each time the image has grown by another MiB (the writers allocate clusters, so the
      // daemon of the moment is taking writes), kill it and start the next: a placement, not an
      // assertion. A kill finds requests in flight more often than not; three make it near certain.
      const written = (): boolean => g.output().includes('guest: written');
      for (let n = 2; n <= 4; n++) {
        const grown = statSync(img).size + (1 << 20);
        for (const t = Date.now(); statSync(img).size < grown && !written() && Date.now() - t < 10_000;) await new Promise((r) => setTimeout(r, 20));
        if (written()) break; // a faster machine: the writes are over
        d.proc.kill('SIGKILL');
        expect(await d.exited).toEqual({ code: null, signal: 'SIGKILL' });
        d = await serve(n);
      }
      await g.waitFor('guest: written', BOOT_MS);
      // QEMU handed its kept buffer on (SET_INFLIGHT_FD): the last daemon maps one the first allocated.
      const adopted = inflightMaps(d.pid);
      expect(adopted).toHaveLength(1);
      expect(allocated).toContain(adopted[0]);
      g.type('go\n');
      const exit = await g.exited;
      const out = g.output();
      expect(exit, out).toEqual({ code: 0, signal: null });
      expect(out).toMatch(/virtio_blk virtio\d+: 2\/0\/0 default\/read\/poll queues/);
      expect(out).toContain('guest: cache write through\n');
      expect(out).not.toContain('a writer failed');
      expect(out).toMatch(new RegExp(`guest: read [1-9]\\d* times: ${md5(hostFile)} \n`)); // every pass read the same
      expect(out).toContain('guest: unmounted\n');
      expect(await d.stop(), d.log()).toEqual({ code: 0, signal: null });
      // A kill between an allocation's refcount and L2 write-backs leaks the cluster, nothing
      // worse (writeback.ts): repair leaks only (exit 2 on corruption), then check strictly.
      ok(qemuImg('check', '-q', '-r', 'leaks', img));
      const raw = flatChecked(img);
      for (const i of N) {
        const src = guestSays(out, `src${i}`);
        expect(src).toBeDefined();
        expect(guestSays(out, `dst${i}`), `dst${i}`).toBe(src);
        expect(md5(debugfsCat(raw, `/dst${i}`)), `dst${i} in the image`).toBe(src);
      }
    } finally {
      await g.kill();
      await d.stop();
    }
  }, BOOT_MS * 4);
});
