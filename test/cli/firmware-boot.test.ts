// `spindle system` without -kernel: SeaBIOS finds a boot sector on a disk or a CD and runs
// it, and the boot sector (roms/bootsector/boot.S) reads the sector after itself through
// int 13h, so the firmware's IDE, virtio-blk and El Torito drivers carry the data. The images
// are built here around build/roms/bootsector.bin; the verdict comes from the guest on COM1.
import { spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { beforeAll, describe, expect, it } from 'vitest';
import { scratchDir } from '../helpers/tmp.js';
import { bundle, ensureBuilt, ok, qemuImg, root, type Run } from './helpers.js';

const SEABIOS = '/usr/share/seabios/bios-256k.bin';
const MARKER = 'SPINDLE-SECTOR-1';
/** boot.S's OPTIONS byte; bit 0 makes the guest write BASE+2 and read it back. */
const OPTIONS_OFFSET = 64;

const dir = scratchDir('spindle-fwboot-');
const path = (name: string): string => join(dir, name);
let bootSector: Buffer;

/** The sector the boot sector looks for: the marker, then bytes that are not all alike. */
function markerSector(): Buffer {
  const s = Buffer.alloc(512);
  s.write(MARKER, 0, 'latin1');
  for (let i = MARKER.length; i < 512; i++) s[i] = (i * 7) & 0xff;
  return s;
}

/** A 1 MiB raw disk: the boot sector at LBA 0 (OPTIONS as given), `sector1` at LBA 1. */
function rawDisk(name: string, opts: { options?: number; sector1?: Buffer } = {}): string {
  const img = Buffer.alloc(1 << 20);
  bootSector.copy(img, 0);
  img[OPTIONS_OFFSET] = opts.options ?? 0;
  (opts.sector1 ?? markerSector()).copy(img, 512);
  writeFileSync(path(name), img);
  return path(name);
}

function sha(file: string): string {
  return createHash('sha256').update(readFileSync(file)).digest('hex');
}

/** The serial lines a run of boot.S prints, as COM1 carries them. */
function serial(drive: string, verdict: string): string {
  return `spindle boot: drive ${drive}\r\nspindle guest: ${verdict}\r\n`;
}

/** QEMU's warning for an -hda image without a format, and nothing else, on stderr. */
function onlyProbeWarning(r: Run, file: string): void {
  const first = `WARNING: Image format was not specified for '${file}' and probing guessed raw.\n`;
  expect(r.stderr.startsWith(first), r.stderr).toBe(true);
  // The warning's continuation lines are indented; any other line is something else said.
  expect(r.stderr.slice(first.length)).toMatch(/^(?: {9}\S.*\n)*$/);
}

/** Boots take about a second; a guest that has not ended in this long is stuck. */
const BOOT_LIMIT_MS = 20_000;

function boot(...args: string[]): Run {
  const r = spawnSync(process.execPath, [bundle, 'system', '-m', '32', ...args, '-serial', 'stdio', '-display', 'none'], { encoding: 'utf8', timeout: BOOT_LIMIT_MS });
  if (r.error) throw new Error(`spindle system ${args.join(' ')}: no verdict in ${BOOT_LIMIT_MS / 1000} s (${r.error.message})\nserial: ${JSON.stringify(r.stdout)}\nstderr: ${r.stderr}`);
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

beforeAll(async () => {
  await ensureBuilt();
  expect(existsSync(SEABIOS), `${SEABIOS} is needed (Debian seabios)`).toBe(true);
  // Built afresh so the run tests roms/bootsector as it is now, even with an older dist/.
  const url = pathToFileURL(join(root, 'scripts', 'build-roms.mjs')).href;
  const r = spawnSync(process.execPath, ['--input-type=module', '-e', `const m = await import(${JSON.stringify(url)}); console.log(m.buildBootSector());`], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`building the boot sector failed: ${r.stderr}`);
  bootSector = readFileSync(r.stdout.trim());
  expect(bootSector.length).toBe(512);
});

describe('spindle system boots a boot sector through SeaBIOS', () => {
  it('-hda raw: the BIOS boots drive 80 and int 13h reads LBA 1 over IDE', () => {
    const disk = rawDisk('disk.raw');
    const r = boot('-hda', disk);
    expect(r.stdout).toBe(serial('80', 'PASS'));
    expect(r.status).toBe(0);
    onlyProbeWarning(r, disk);
  });

  it('fails when LBA 1 lacks the marker, and says so on COM1 with exit 1', () => {
    const sector1 = markerSector();
    sector1.write('SPINDLE-SECTOR-2', 0, 'latin1');
    const r = boot('-drive', `file=${rawDisk('nomarker.raw', { sector1 })},format=raw`);
    expect(r.stdout).toBe(serial('80', 'FAIL no marker'));
    expect(r.status).toBe(1);
    expect(r.stderr).toBe('');
  });

  it('a qcow2 overlay on the raw disk, on virtio-blk only: SeaBIOS boots it through its virtio driver', () => {
    const base = rawDisk('virtio-base.raw');
    const top = path('virtio-top.qcow2');
    ok(qemuImg('create', '-q', '-f', 'qcow2', '-b', base, '-F', 'raw', top));
    const before = sha(top);
    const r = boot('-drive', `file=${top},if=virtio,format=qcow2`);
    expect(r.stdout).toBe(serial('80', 'PASS'));
    expect(r.status).toBe(0);
    expect(r.stderr).toBe('');
    // A read-only boot leaves the overlay as it was (no allocation, no dirty bit left behind).
    expect(sha(top)).toBe(before);
  });

  it('-cdrom: El Torito no-emulation boot, int 13h reads the 2 KiB sector after the boot image', () => {
    // The boot file is two CD sectors: the boot sector (padded) and the marker. xorrisofs
    // -boot-info-table writes the boot file's LBA into the boot sector (BASE, offset 12).
    const files = path('iso');
    mkdirSync(files, { recursive: true });
    const img = Buffer.alloc(4096);
    bootSector.copy(img, 0);
    markerSector().copy(img, 2048);
    writeFileSync(join(files, 'boot.img'), img);
    const iso = path('boot.iso');
    const x = spawnSync('xorrisofs', ['-quiet', '-o', iso, '-b', 'boot.img', '-no-emul-boot', '-boot-load-size', '4', '-boot-info-table', files], { encoding: 'utf8' });
    if (x.error) throw new Error(`xorrisofs is needed by this test (Debian xorriso; scripts/fetch-linux-guest.sh installs it): ${x.error.message}`);
    expect(x.status, x.stderr).toBe(0);
    const r = boot('-cdrom', iso);
    // SeaBIOS numbers its first CD E0.
    expect(r.stdout).toBe(serial('E0', 'PASS'));
    expect(r.status).toBe(0);
    expect(r.stderr).toBe('');
  });

  it('-snapshot: the guest writes LBA 2 and reads it back, and the image file stays as it was', () => {
    const disk = rawDisk('snap.raw', { options: 1 });
    const before = sha(disk);
    const r = boot('-snapshot', '-hda', disk);
    // PASS means the guest read its own write back: the write went somewhere, not into the file.
    expect(r.stdout).toBe(serial('80', 'PASS'));
    expect(r.status).toBe(0);
    onlyProbeWarning(r, disk);
    expect(sha(disk)).toBe(before);
  });

  it('without -snapshot the same write lands in the image file', () => {
    const disk = rawDisk('write.raw', { options: 1 });
    const expected = readFileSync(disk);
    const stamped = markerSector();
    stamped.write('SPINDLE-WRITTEN!', 0, 'latin1');
    stamped.copy(expected, 1024);
    const r = boot('-hda', disk);
    expect(r.stdout).toBe(serial('80', 'PASS'));
    expect(r.status).toBe(0);
    onlyProbeWarning(r, disk);
    const after = readFileSync(disk);
    expect(after.subarray(1024, 1024 + 16).toString('latin1')).toBe('SPINDLE-WRITTEN!');
    expect(after.equals(expected)).toBe(true);
  });

  it('a missing -hda image: exit 1 with one line naming the file, before the guest runs', () => {
    const missing = path('nope.img');
    const r = boot('-hda', missing);
    expect(r.status).toBe(1);
    expect(r.stdout).toBe('');
    expect(r.stderr).toBe(`spindle system: Could not open '${missing}': No such file or directory\n`);
  });
});
