// Builds Spindle's guest programs (roms/) with the compiler a fresh machine has:
// gcc -m32 -ffreestanding -nostdlib, into build/roms/. Prints the paths it built.
import { spawnSync } from 'node:child_process';
import { mkdirSync } from 'node:fs';
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

if (process.argv[1] === fileURLToPath(import.meta.url)) console.log(buildGuest());
