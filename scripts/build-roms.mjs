// Builds Spindle's guest programs (roms/) with the compiler a fresh machine has, into
// build/roms/: the multiboot guest with gcc -m32 -ffreestanding -nostdlib, the boot sector
// with binutils (as --32, ld --oformat binary). Prints the paths it built.
import { spawnSync } from 'node:child_process';
import { mkdirSync, readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const out = join(root, 'build', 'roms');
mkdirSync(out, { recursive: true });

// roms/guest/link.ld puts boot.c's .multiboot section first, within the first 8 KiB.
const guestSources = ['boot.c', 'lib.c', 'pci.c', 'ide.c', 'virtio.c'];

export function buildGuest() {
  const elf = join(out, 'guest.elf');
  const r = spawnSync('gcc', [
    '-m32', '-ffreestanding', '-nostdlib', '-fno-pic', '-no-pie', '-fno-stack-protector', '-O2', '-Wall', '-Werror',
    `-Wl,-T,${join(root, 'roms', 'guest', 'link.ld')}`, '-Wl,--build-id=none', '-Wl,--no-warn-rwx-segments',
    '-o', elf, ...guestSources.map((f) => join(root, 'roms', 'guest', f)),
  ], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`building roms/guest failed (gcc -m32): ${r.stderr || r.error}`);
  return elf;
}

/**
 * roms/bootsector/boot.S as the 512 bytes a BIOS loads at 0000:7C00 (build/roms/bootsector.bin),
 * checked for its size and the 55 AA signature.
 */
export function buildBootSector() {
  const obj = join(out, 'bootsector.o');
  const bin = join(out, 'bootsector.bin');
  const run = (cmd, args) => {
    const r = spawnSync(cmd, args, { encoding: 'utf8' });
    if (r.status !== 0) throw new Error(`building roms/bootsector failed (${cmd}): ${r.stderr || r.error}`);
  };
  run('as', ['--32', '-o', obj, join(root, 'roms', 'bootsector', 'boot.S')]);
  run('ld', ['-m', 'elf_i386', '-Ttext', '0x7c00', '--oformat', 'binary', '-o', bin, obj]);
  const b = readFileSync(bin);
  if (b.length !== 512 || b[510] !== 0x55 || b[511] !== 0xaa) throw new Error(`roms/bootsector: ${bin} is ${b.length} bytes, not a 512-byte sector ending 55 AA`);
  return bin;
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  console.log(buildGuest());
  console.log(buildBootSector());
}
