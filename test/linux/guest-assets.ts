/**
 * Assets for whole-guest tests that boot a real Linux kernel (i386 on v86, amd64 on QEMU): where
 * the kernel, busybox and modules live (fetched by `scripts/fetch-linux-guest.sh [ARCH]`), the
 * module dependency closure read from each .ko's `.modinfo`, host binaries with their `ldd`
 * closure, and a gzip'ed newc cpio initramfs built in memory.
 *
 *   scripts/fetch-linux-guest.sh ──► cache/{vmlinuz, busybox, lib/modules/<ver>/kernel/**.ko, READY}
 *                                          │
 *   linuxGuestAssets() ── paths ───────────┤
 *   moduleClosure(names) ── .ko load order ┤
 *   binaryClosure(bins) ── host ELF + libs ┤
 *   guestInit(script) ── /init text ───────┴──► buildInitrd() ──► initrd (gzip'ed newc cpio)
 *
 * Context: test code only, synchronous file reads.
 */
import { execFileSync } from 'node:child_process';
import { existsSync, readFileSync, readdirSync } from 'node:fs';
import { homedir } from 'node:os';
import { basename, join } from 'node:path';
import { gzipSync } from 'node:zlib';

/** i386 boots on v86; amd64 on qemu-system-x86_64 (native packages of an amd64 host). */
export type GuestArch = 'i386' | 'amd64';

const fetchHint = (arch: GuestArch): string =>
  `run scripts/fetch-linux-guest.sh${arch === 'i386' ? '' : ' ' + arch} as root (it uses apt) to fetch the Linux guest`;

export interface LinuxGuestAssets {
  /** The kernel bzImage. */
  kernel: string;
  /** Static busybox of the guest's architecture. */
  busybox: string;
  /** `lib/modules/<version>` holding `kernel/**.ko`. */
  modulesDir: string;
  /** Kernel release, e.g. `6.1.0-50-686`. */
  version: string;
  /** SeaBIOS image from Debian's seabios package. */
  seabios: string;
}

/**
 * The guest cache directory: for i386 `$SPINDLE_GUEST_CACHE`, for amd64 `$SPINDLE_GUEST_CACHE_AMD64`,
 * else `~/.cache/spindle/linux-ARCH` (as the fetch script).
 */
export function guestCacheDir(arch: GuestArch = 'i386'): string {
  const env = arch === 'i386' ? process.env.SPINDLE_GUEST_CACHE : process.env.SPINDLE_GUEST_CACHE_AMD64;
  return env || join(homedir(), '.cache', 'spindle', `linux-${arch}`);
}

/**
 * Paths of the fetched guest. Throws, saying how to fetch it, if anything is missing.
 * Context: any.
 */
export function linuxGuestAssets(arch: GuestArch = 'i386'): LinuxGuestAssets {
  const hint = fetchHint(arch);
  const cache = guestCacheDir(arch);
  const ready = join(cache, 'READY');
  if (!existsSync(ready)) throw new Error(`Linux guest not found: ${ready} is missing; ${hint}`);
  const version = readFileSync(ready, 'utf8').trim();
  const seabios = ['/usr/share/seabios/bios-256k.bin', '/usr/share/seabios/bios.bin'].find((p) => existsSync(p));
  if (!seabios) throw new Error(`SeaBIOS not found in /usr/share/seabios; ${hint}`);
  const assets: LinuxGuestAssets = {
    kernel: join(cache, 'vmlinuz'),
    busybox: join(cache, 'busybox'),
    modulesDir: join(cache, 'lib', 'modules', version),
    version,
    seabios,
  };
  for (const p of [assets.kernel, assets.busybox, assets.modulesDir]) {
    if (!existsSync(p)) throw new Error(`Linux guest incomplete: ${p} is missing; ${hint}`);
  }
  return assets;
}

// ---- modules ------------------------------------------------------------------------------------

/** Module names treat '-' and '_' alike; the kernel's own spelling is '_'. */
export function normaliseModuleName(name: string): string {
  return name.replace(/\.ko$/, '').replace(/-/g, '_');
}

const moduleIndexes = new Map<string, Map<string, string>>();

/** name → .ko path for every module under `dir`, cached per directory. */
function moduleIndex(dir: string): Map<string, string> {
  let index = moduleIndexes.get(dir);
  if (index) return index;
  index = new Map();
  const walk = (d: string): void => {
    for (const e of readdirSync(d, { withFileTypes: true })) {
      const p = join(d, e.name);
      if (e.isDirectory()) walk(p);
      else if (e.name.endsWith('.ko')) index!.set(normaliseModuleName(e.name), p);
    }
  };
  walk(dir);
  moduleIndexes.set(dir, index);
  return index;
}

/**
 * The NUL-separated `key=value` strings of an ELF file's `.modinfo` section.
 * Reads ELF32 and ELF64, either byte order (ELF spec, "Section Header").
 */
export function readModinfo(elf: Buffer, what = 'module'): string[] {
  if (elf.length < 52 || elf.readUInt32BE(0) !== 0x7f454c46) throw new Error(`${what}: not an ELF file`);
  const is64 = elf[4] === 2;
  const le = elf[5] === 1;
  const u16 = (o: number): number => (le ? elf.readUInt16LE(o) : elf.readUInt16BE(o));
  const u32 = (o: number): number => (le ? elf.readUInt32LE(o) : elf.readUInt32BE(o));
  const word = (o: number): number => (is64 ? Number(le ? elf.readBigUInt64LE(o) : elf.readBigUInt64BE(o)) : u32(o));
  // e_shoff, e_shentsize, e_shnum, e_shstrndx
  const shoff = word(is64 ? 0x28 : 0x20);
  const shentsize = u16(is64 ? 0x3a : 0x2e);
  const shnum = u16(is64 ? 0x3c : 0x30);
  const shstrndx = u16(is64 ? 0x3e : 0x32);
  // Elf_Shdr: sh_name @0, sh_offset @0x10 (32) / 0x18 (64), sh_size @0x14 (32) / 0x20 (64)
  const section = (i: number): { name: number; offset: number; size: number } => {
    const h = shoff + i * shentsize;
    if (h + shentsize > elf.length) throw new Error(`${what}: section header ${i} beyond end of file`);
    return { name: u32(h), offset: word(h + (is64 ? 0x18 : 0x10)), size: word(h + (is64 ? 0x20 : 0x14)) };
  };
  const strtab = section(shstrndx);
  for (let i = 0; i < shnum; i++) {
    const s = section(i);
    const nameStart = strtab.offset + s.name;
    const name = elf.toString('latin1', nameStart, elf.indexOf(0, nameStart));
    if (name !== '.modinfo') continue;
    return elf
      .toString('latin1', s.offset, s.offset + s.size)
      .split('\0')
      .filter((x) => x.length > 0);
  }
  throw new Error(`${what}: no .modinfo section`);
}

/** The `depends=` list of one .ko, normalised. */
export function moduleDepends(koPath: string): string[] {
  const info = readModinfo(readFileSync(koPath), koPath);
  const dep = info.find((x) => x.startsWith('depends='));
  if (!dep) return [];
  return dep
    .slice('depends='.length)
    .split(',')
    .filter((x) => x.length > 0)
    .map(normaliseModuleName);
}

/**
 * The .ko paths of `names` and everything they depend on, dependencies first, each once.
 * Throws naming any module not found under `modulesDir`.
 * Context: any.
 */
export function moduleClosure(modulesDir: string, names: string[]): string[] {
  const index = moduleIndex(modulesDir);
  const order: string[] = [];
  const state = new Map<string, 'visiting' | 'done'>();
  const visit = (name: string, chain: string[]): void => {
    const n = normaliseModuleName(name);
    const s = state.get(n);
    if (s === 'done') return;
    if (s === 'visiting') throw new Error(`module dependency cycle: ${[...chain, n].join(' -> ')}`);
    const path = index.get(n);
    if (!path) {
      const via = chain.length ? ` (needed by ${chain[chain.length - 1]})` : '';
      throw new Error(`module ${n}${via} not found under ${modulesDir}`);
    }
    state.set(n, 'visiting');
    for (const d of moduleDepends(path)) visit(d, [...chain, n]);
    state.set(n, 'done');
    order.push(path);
  };
  for (const n of names) visit(n, []);
  return order;
}

// ---- initramfs ----------------------------------------------------------------------------------

/** newc mode bits (<sys/stat.h>). */
const S_IFDIR = 0o040000;
const S_IFREG = 0o100000;
const S_IFLNK = 0o120000;
const S_IFCHR = 0o020000;

export interface CpioEntry {
  name: string;
  mode: number;
  data: Uint8Array;
  rdevMajor?: number;
  rdevMinor?: number;
}

const pad4 = (n: number): number => (4 - (n % 4)) % 4;

/**
 * One newc archive: per entry a 110-byte ASCII header ("070701", then 13 eight-digit hex fields),
 * the NUL-terminated name, padding to 4, the data, padding to 4; ends with "TRAILER!!!".
 */
export function writeNewc(entries: CpioEntry[]): Buffer {
  const parts: Buffer[] = [];
  let ino = 1;
  const hex = (v: number): string => v.toString(16).padStart(8, '0');
  const put = (e: CpioEntry): void => {
    const name = Buffer.from(e.name + '\0', 'utf8');
    const isDir = (e.mode & 0o170000) === S_IFDIR;
    const fields = [
      ino++, // c_ino
      e.mode, // c_mode
      0, // c_uid
      0, // c_gid
      isDir ? 2 : 1, // c_nlink
      0, // c_mtime
      e.data.length, // c_filesize
      0, // c_devmajor
      0, // c_devminor
      e.rdevMajor ?? 0, // c_rdevmajor
      e.rdevMinor ?? 0, // c_rdevminor
      name.length, // c_namesize, NUL included
      0, // c_check
    ];
    const header = Buffer.from('070701' + fields.map(hex).join(''), 'ascii');
    parts.push(header, name, Buffer.alloc(pad4(header.length + name.length)));
    parts.push(Buffer.from(e.data), Buffer.alloc(pad4(e.data.length)));
  };
  for (const e of entries) put(e);
  put({ name: 'TRAILER!!!', mode: 0, data: new Uint8Array(0) });
  return Buffer.concat(parts);
}

export interface InitrdOptions {
  /** The /init script text (see guestInit). */
  init: string;
  /** Module names; their closure goes to /lib/modules with a load-order file. */
  modules: string[];
  /** Whose kernel modules and busybox (default i386). */
  arch?: GuestArch;
  /** Host executables copied to the same paths, with their shared libraries (binaryClosure). */
  binaries?: string[];
  /**
   * Extra files by absolute path; parent directories are created. Mode 0755 if the content
   * starts with "#!", else 0644.
   */
  files?: Record<string, Uint8Array | string>;
}

/**
 * A gzip'ed newc initramfs: /bin/busybox (+ /bin/sh), /dev/console, /init, the module closure in
 * /lib/modules with /lib/modules/load-order (one file name a line, dependencies first), and `files`.
 * Context: any.
 */
export function buildInitrd(o: InitrdOptions): Buffer {
  const assets = linuxGuestAssets(o.arch);
  const entries: CpioEntry[] = [];
  const dirs = new Set<string>();
  const empty = new Uint8Array(0);
  const dir = (path: string): void => {
    const parts = path.split('/').filter(Boolean);
    for (let i = 1; i <= parts.length; i++) {
      const d = parts.slice(0, i).join('/');
      if (dirs.has(d)) continue;
      dirs.add(d);
      entries.push({ name: d, mode: S_IFDIR | 0o755, data: empty });
    }
  };
  const file = (path: string, data: Uint8Array | string, perm: number): void => {
    const rel = path.replace(/^\/+/, '');
    if (rel.includes('/')) dir(rel.slice(0, rel.lastIndexOf('/')));
    const bytes = typeof data === 'string' ? Buffer.from(data, 'utf8') : data;
    entries.push({ name: rel, mode: S_IFREG | perm, data: bytes });
  };
  for (const d of ['bin', 'dev', 'proc', 'sys', 'mnt', 'tmp', 'lib/modules']) dir(d);
  // The kernel opens /dev/console for /init's stdio before /init runs: it must exist in the archive.
  entries.push({ name: 'dev/console', mode: S_IFCHR | 0o600, data: empty, rdevMajor: 5, rdevMinor: 1 });
  file('/bin/busybox', readFileSync(assets.busybox), 0o755);
  entries.push({ name: 'bin/sh', mode: S_IFLNK | 0o777, data: Buffer.from('busybox') });
  file('/init', o.init, 0o755);

  const kos = moduleClosure(assets.modulesDir, o.modules);
  const names = kos.map((p) => basename(p));
  if (new Set(names).size !== names.length) throw new Error(`module file names collide: ${names.join(' ')}`);
  for (const p of kos) file(`/lib/modules/${basename(p)}`, readFileSync(p), 0o644);
  file('/lib/modules/load-order', names.map((n) => n + '\n').join(''), 0o644);

  // Host programs: their ELF interpreter and libraries at the host's paths, so PT_INTERP, RUNPATH
  // and glibc's built-in multiarch search dirs find them without an ld.so.cache.
  const done = new Set<string>();
  for (const p of binaryClosure(o.binaries ?? [])) {
    const rel = p.replace(/^\/+/, '');
    if (done.has(rel)) continue;
    done.add(rel);
    if (dirs.has(rel) || rel === 'bin/busybox' || rel === 'bin/sh') throw new Error(`${p} would replace the initrd's own ${rel}`);
    file(p, readFileSync(p), 0o755);
  }

  for (const [path, data] of Object.entries(o.files ?? {})) {
    const text = typeof data === 'string' ? data : '';
    const shebang = text.startsWith('#!') || (typeof data !== 'string' && data[0] === 0x23 && data[1] === 0x21);
    file(path, data, shebang ? 0o755 : 0o644);
  }
  return gzipSync(writeNewc(entries));
}

/**
 * `bins` and the shared objects `ldd` says they load (the ELF interpreter included), as absolute
 * host paths, each once. Throws on a library `ldd` cannot find. A static binary is just itself.
 * Context: test code only; runs the host's ldd (which runs the binary's interpreter: host binaries only).
 */
export function binaryClosure(bins: string[]): string[] {
  const out = new Set<string>();
  for (const bin of bins) {
    if (!bin.startsWith('/')) throw new Error(`${bin}: give binaries by absolute path`);
    if (!existsSync(bin)) throw new Error(`${bin}: no such file`);
    out.add(bin);
    let text: string;
    try {
      text = execFileSync('ldd', [bin], { encoding: 'utf8', stdio: ['ignore', 'pipe', 'pipe'] });
    } catch (e) {
      // ldd exits 1 with "not a dynamic executable" for static binaries.
      const err = e as { stdout?: string; stderr?: string };
      if (/not a dynamic executable|statically linked/.test(`${err.stdout ?? ''}${err.stderr ?? ''}`)) continue;
      throw new Error(`ldd ${bin} failed: ${err.stderr ?? String(e)}`);
    }
    for (const raw of text.split('\n')) {
      const line = raw.trim();
      if (!line || /statically linked/.test(line)) continue;
      // "libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x...)", "/lib64/ld-linux-x86-64.so.2 (0x...)",
      // "linux-vdso.so.1 (0x...)" (the kernel's: no file), "libfoo.so.1 => not found".
      const arrow = /^(\S+) => (.*?)(?: \(0x[0-9a-f]+\))?$/.exec(line);
      if (arrow) {
        if (arrow[2] === 'not found') throw new Error(`${bin}: ldd cannot find ${arrow[1]}`);
        if (arrow[2]!.startsWith('/')) out.add(arrow[2]!);
        continue;
      }
      const bare = /^(\/\S+) \(0x[0-9a-f]+\)$/.exec(line);
      if (bare) out.add(bare[1]!);
    }
  }
  return [...out];
}

/** The line /init prints once modules are loaded, before it runs the test's script. */
export const GUEST_READY = 'spindle-init: ready';

/**
 * A busybox-sh /init: mounts proc, sysfs and devtmpfs, sends all output to the console (ttyS0
 * with `console=ttyS0`), insmods /lib/modules/load-order (a line per failure), prints
 * `spindle-init: ready`, runs `script` in a subshell, prints `spindle-init: script exit N`,
 * then syncs and powers off.
 * Context: any.
 */
export function guestInit(script: string): string {
  return [
    '#!/bin/sh',
    'export PATH=/bin',
    '/bin/busybox --install -s /bin',
    'mount -t proc proc /proc',
    'mount -t sysfs sysfs /sys',
    'mount -t devtmpfs devtmpfs /dev',
    'exec </dev/console >/dev/console 2>&1',
    'while read -r m; do',
    '  insmod "/lib/modules/$m" || echo "spindle-init: insmod $m failed"',
    'done </lib/modules/load-order',
    `echo "${GUEST_READY}"`,
    '(',
    script,
    ')',
    'echo "spindle-init: script exit $?"',
    'sync',
    'poweroff -f',
    '',
  ].join('\n');
}
