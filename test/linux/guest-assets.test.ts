/**
 * Tests for the Linux guest assets: the newc initramfs writer (read back with a small independent
 * reader), the .modinfo parser and module load order, and the /init text. Needs the cache that
 * `scripts/fetch-linux-guest.sh` fills; fails with that hint when it is missing.
 */
import { readFileSync } from 'node:fs';
import { basename } from 'node:path';
import { gunzipSync } from 'node:zlib';
import { describe, expect, it } from 'vitest';
import {
  type CpioEntry,
  GUEST_READY,
  binaryClosure,
  buildInitrd,
  guestInit,
  linuxGuestAssets,
  moduleClosure,
  moduleDepends,
  normaliseModuleName,
  readModinfo,
  writeNewc,
} from './guest-assets.js';

interface CpioFile {
  name: string;
  mode: number;
  nlink: number;
  rdev: [number, number];
  data: Buffer;
}

/** A strict newc reader, written against the format rather than against the writer. */
function readNewc(buf: Buffer): CpioFile[] {
  const out: CpioFile[] = [];
  let off = 0;
  for (;;) {
    expect(off % 4).toBe(0);
    expect(buf.toString('ascii', off, off + 6)).toBe('070701');
    const field = (i: number): number => {
      const s = buf.toString('ascii', off + 6 + i * 8, off + 14 + i * 8);
      expect(s).toMatch(/^[0-9a-f]{8}$/);
      return parseInt(s, 16);
    };
    const [mode, nlink, filesize, rdevmajor, rdevminor, namesize, check] = [
      field(1), field(4), field(6), field(9), field(10), field(11), field(12),
    ];
    expect(check).toBe(0);
    const nameStart = off + 110;
    expect(buf[nameStart + namesize - 1]).toBe(0);
    const name = buf.toString('utf8', nameStart, nameStart + namesize - 1);
    const dataStart = Math.ceil((nameStart + namesize) / 4) * 4;
    const data = buf.subarray(dataStart, dataStart + filesize);
    off = Math.ceil((dataStart + filesize) / 4) * 4;
    if (name === 'TRAILER!!!') break;
    out.push({ name, mode, nlink, rdev: [rdevmajor, rdevminor], data });
  }
  expect(buf.subarray(off).every((b) => b === 0)).toBe(true);
  return out;
}

const STORAGE = ['ata_piix', 'sd_mod', 'virtio_blk', 'virtio_pci', 'ext4', 'sr_mod', 'isofs'];

describe('newc writer', () => {
  it('pads header+name and data to 4 bytes for every name and size length', () => {
    const entries: CpioEntry[] = [];
    for (let n = 1; n <= 5; n++) {
      for (let size = 0; size <= 5; size++) {
        entries.push({ name: 'f'.repeat(n) + size, mode: 0o100644, data: Buffer.alloc(size, n * 16 + size) });
      }
    }
    const files = readNewc(writeNewc(entries));
    expect(files.map((f) => f.name)).toEqual(entries.map((e) => e.name));
    files.forEach((f, i) => expect(f.data).toEqual(entries[i]!.data));
  });

  it('writes the 110-byte header with the magic and the NUL counted in namesize', () => {
    const buf = writeNewc([{ name: 'ab', mode: 0o100600, data: Buffer.from('xyz') }]);
    expect(buf.toString('ascii', 0, 6)).toBe('070701');
    expect(buf.toString('ascii', 6 + 11 * 8, 6 + 12 * 8)).toBe('00000003'); // c_namesize
    expect(buf.toString('ascii', 110, 113)).toBe('ab\0');
    expect(buf.toString('ascii', 116, 119)).toBe('xyz'); // 110 + 3 = 113, padded to 116
  });
});

describe('linuxGuestAssets', () => {
  it('says how to fetch the guest when the cache is missing', () => {
    const saved = process.env.SPINDLE_GUEST_CACHE;
    process.env.SPINDLE_GUEST_CACHE = '/nonexistent/spindle-guest';
    try {
      expect(() => linuxGuestAssets()).toThrow(/READY is missing; run scripts\/fetch-linux-guest\.sh as root/);
    } finally {
      if (saved === undefined) delete process.env.SPINDLE_GUEST_CACHE;
      else process.env.SPINDLE_GUEST_CACHE = saved;
    }
  });

  it('keeps a cache per architecture, each with its own override and fetch hint', () => {
    const saved = process.env.SPINDLE_GUEST_CACHE_AMD64;
    process.env.SPINDLE_GUEST_CACHE_AMD64 = '/nonexistent/spindle-guest-amd64';
    try {
      expect(() => linuxGuestAssets('amd64')).toThrow(/spindle-guest-amd64\/READY is missing; run scripts\/fetch-linux-guest\.sh amd64 as root/);
    } finally {
      if (saved === undefined) delete process.env.SPINDLE_GUEST_CACHE_AMD64;
      else process.env.SPINDLE_GUEST_CACHE_AMD64 = saved;
    }
    const [i386, amd64] = [linuxGuestAssets(), linuxGuestAssets('amd64')];
    expect(amd64.modulesDir).not.toBe(i386.modulesDir);
    // ELF e_machine: 3 is i386, 0x3e x86-64.
    expect(readFileSync(i386.busybox).readUInt16LE(18)).toBe(3);
    expect(readFileSync(amd64.busybox).readUInt16LE(18)).toBe(0x3e);
    expect(amd64.version).toMatch(/-amd64$/);
  });

  it('finds the kernel, busybox, modules and SeaBIOS', () => {
    const a = linuxGuestAssets();
    expect(readFileSync(a.kernel).toString('latin1', 0x202, 0x206)).toBe('HdrS'); // bzImage setup header
    expect(readFileSync(a.busybox).readUInt32BE(0)).toBe(0x7f454c46);
    expect(basename(a.modulesDir)).toBe(a.version);
    expect(a.seabios).toMatch(/^\/usr\/share\/seabios\/bios(-256k)?\.bin$/);
  });
});

describe('modules', () => {
  it('reads .modinfo from a real module', () => {
    const a = linuxGuestAssets();
    const [ext4] = moduleClosure(a.modulesDir, ['ext4']).slice(-1);
    const info = readModinfo(readFileSync(ext4!));
    expect(info).toContain('name=ext4');
    expect(info.some((x) => x.startsWith('vermagic=' + a.version))).toBe(true);
    expect(moduleDepends(ext4!)).toEqual(expect.arrayContaining(['jbd2', 'mbcache']));
  });

  it('rejects a file that is not ELF', () => {
    expect(() => readModinfo(Buffer.alloc(64), 'x.ko')).toThrow(/x\.ko: not an ELF file/);
  });

  it('orders the storage closure dependencies first, without duplicates', () => {
    const a = linuxGuestAssets();
    const order = moduleClosure(a.modulesDir, STORAGE).map((p) => normaliseModuleName(basename(p)));
    expect(new Set(order).size).toBe(order.length);
    const before = (dep: string, user: string): void => {
      expect(order, `${dep} in closure`).toContain(dep);
      expect(order.indexOf(dep), `${dep} before ${user}`).toBeLessThan(order.indexOf(user));
    };
    before('libata', 'ata_piix');
    before('scsi_mod', 'sd_mod');
    before('scsi_mod', 'sr_mod');
    before('cdrom', 'sr_mod');
    before('virtio_ring', 'virtio_blk');
    before('virtio', 'virtio_ring');
    before('jbd2', 'ext4');
    before('mbcache', 'ext4');
    for (const m of STORAGE) expect(order).toContain(m);
    // Every module's own depends= are loaded before it.
    for (const p of moduleClosure(a.modulesDir, STORAGE)) {
      const self = order.indexOf(normaliseModuleName(basename(p)));
      for (const d of moduleDepends(p)) expect(order.indexOf(d)).toBeLessThan(self);
    }
  });

  it("treats '-' and '_' alike", () => {
    const a = linuxGuestAssets();
    expect(moduleClosure(a.modulesDir, ['crc32c-generic'])).toEqual(moduleClosure(a.modulesDir, ['crc32c_generic']));
  });

  it('names a module it cannot find', () => {
    const a = linuxGuestAssets();
    expect(() => moduleClosure(a.modulesDir, ['ext4', 'no_such_mod'])).toThrow(/module no_such_mod not found/);
  });
});

describe('buildInitrd', () => {
  it('holds busybox, /init, /dev/console, the module closure with its load order, and extra files', () => {
    const a = linuxGuestAssets();
    const init = guestInit('echo hi');
    const img = buildInitrd({
      init,
      modules: ['sd_mod', 'ata_piix'],
      files: { '/etc/motd': 'hello\n', '/opt/x/run.sh': '#!/bin/sh\necho\n', '/data.bin': new Uint8Array([1, 2, 3]) },
    });
    expect(img[0]).toBe(0x1f); // gzip magic
    expect(img[1]).toBe(0x8b);
    const files = readNewc(gunzipSync(img));
    const by = new Map(files.map((f) => [f.name, f]));
    expect(by.size).toBe(files.length); // no name twice

    for (const d of ['bin', 'dev', 'proc', 'sys', 'mnt', 'lib', 'lib/modules', 'etc', 'opt', 'opt/x']) {
      expect(by.get(d)?.mode, d).toBe(0o040755);
    }
    // Every entry's parent directory comes before it.
    files.forEach((f, i) => {
      const parent = f.name.includes('/') ? f.name.slice(0, f.name.lastIndexOf('/')) : '';
      if (parent) expect(files.findIndex((g) => g.name === parent), f.name).toBeLessThan(i);
    });

    expect(by.get('bin/busybox')!.mode).toBe(0o100755);
    expect(by.get('bin/busybox')!.data.equals(readFileSync(a.busybox))).toBe(true);
    expect(by.get('bin/sh')!.mode).toBe(0o120777);
    expect(by.get('bin/sh')!.data.toString()).toBe('busybox');
    expect(by.get('dev/console')!.mode).toBe(0o020600);
    expect(by.get('dev/console')!.rdev).toEqual([5, 1]);
    expect(by.get('init')!.mode).toBe(0o100755);
    expect(by.get('init')!.data.toString()).toBe(init);

    const closure = moduleClosure(a.modulesDir, ['sd_mod', 'ata_piix']);
    const order = by.get('lib/modules/load-order')!.data.toString();
    expect(order).toBe(closure.map((p) => basename(p) + '\n').join(''));
    expect(order).toMatch(/^scsi_common\.ko\nscsi_mod\.ko\n/);
    for (const p of closure) {
      const f = by.get(`lib/modules/${basename(p)}`)!;
      expect(f.mode).toBe(0o100644);
      expect(f.data.equals(readFileSync(p))).toBe(true);
    }

    expect(by.get('etc/motd')!.data.toString()).toBe('hello\n');
    expect(by.get('etc/motd')!.mode).toBe(0o100644);
    expect(by.get('opt/x/run.sh')!.mode).toBe(0o100755);
    expect([...by.get('data.bin')!.data]).toEqual([1, 2, 3]);
  });
});

describe('host binaries', () => {
  // e2fsck: small, and dynamically linked against e2fsprogs' own libraries as well as libc.
  const E2FSCK = '/usr/sbin/e2fsck';

  it("lists a binary, its libraries and the ELF interpreter from ldd; a static binary alone", () => {
    const c = binaryClosure([E2FSCK, E2FSCK]);
    expect(c[0]).toBe(E2FSCK);
    expect(new Set(c).size).toBe(c.length);
    expect(c).toContain('/lib64/ld-linux-x86-64.so.2');
    expect(c.some((p) => /\/libc\.so\.6$/.test(p))).toBe(true);
    expect(c.some((p) => /\/libext2fs\.so\.2$/.test(p))).toBe(true);
    expect(c.every((p) => p.startsWith('/') && !p.includes('vdso'))).toBe(true);
    const busybox = linuxGuestAssets('amd64').busybox;
    expect(binaryClosure([busybox])).toEqual([busybox]);
    expect(() => binaryClosure(['e2fsck'])).toThrow(/absolute path/);
  });

  it('puts them into an amd64 initrd at their host paths, with amd64 busybox and modules', () => {
    const a = linuxGuestAssets('amd64');
    const files = readNewc(gunzipSync(buildInitrd({ init: guestInit('true'), modules: ['virtio_blk'], arch: 'amd64', binaries: [E2FSCK] })));
    const by = new Map(files.map((f) => [f.name, f]));
    expect(by.size).toBe(files.length);
    expect(by.get('bin/busybox')!.data.equals(readFileSync(a.busybox))).toBe(true);
    expect(by.get('lib/modules/load-order')!.data.toString()).toMatch(/virtio_blk\.ko\n$/);
    for (const p of binaryClosure([E2FSCK])) {
      const f = by.get(p.slice(1));
      expect(f?.mode, p).toBe(0o100755);
      expect(f!.data.equals(readFileSync(p))).toBe(true); // symlinks (the interpreter's) followed
    }
  });
});

describe('guestInit', () => {
  it('mounts, redirects to the console, loads modules, runs the script, then powers off', () => {
    const text = guestInit('mount -t ext2 /dev/sda /mnt');
    const at = (s: string): number => {
      const i = text.indexOf(s);
      expect(i, s).toBeGreaterThanOrEqual(0);
      return i;
    };
    expect(text.startsWith('#!/bin/sh\n')).toBe(true);
    const order = [
      at('mount -t proc proc /proc'),
      at('mount -t sysfs sysfs /sys'),
      at('mount -t devtmpfs devtmpfs /dev'),
      at('>/dev/console 2>&1'),
      at('insmod "/lib/modules/$m"'),
      at(GUEST_READY),
      at('mount -t ext2 /dev/sda /mnt'),
      at('sync'),
      at('poweroff -f'),
    ];
    expect([...order].sort((x, y) => x - y)).toEqual(order);
  });
});
