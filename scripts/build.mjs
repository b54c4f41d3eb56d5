// Bundles the CLI into dist/spindle.mjs (the package's bin). The native addon stays in
// build/Release and is found at run time from the package root. The bundle is written
// aside and renamed, so a test running meanwhile never sees half a file.
import { build } from 'esbuild';
import { spawnSync } from 'node:child_process';
import { chmodSync, renameSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const out = join(root, 'dist', 'spindle.mjs');
const tmp = join(root, 'dist', `.spindle-${process.pid}.mjs`);
await build({
  entryPoints: [join(root, 'src/cli/main.ts')],
  bundle: true,
  platform: 'node',
  target: 'node20',
  format: 'esm',
  outfile: tmp,
  banner: { js: "#!/usr/bin/env node\nimport { createRequire as __cr } from 'node:module'; const require = __cr(import.meta.url);" },
  // v86 stays in node_modules: its wasm is found next to it at run time.
  external: ['v86'],
  logLevel: 'warning',
});
chmodSync(tmp, 0o755);
renameSync(tmp, out);

// spindle/qos: the guest-side test library, as its own module (package.json "exports").
const qosOut = join(root, 'dist', 'qos.mjs');
const qosTmp = join(root, 'dist', `.qos-${process.pid}.mjs`);
await build({
  entryPoints: [join(root, 'src/qos/index.ts')],
  bundle: true,
  platform: 'node',
  target: 'node20',
  format: 'esm',
  outfile: qosTmp,
  logLevel: 'warning',
});
renameSync(qosTmp, qosOut);

// Its types, for TypeScript users of spindle/qos (declarations only; esbuild made the code).
const tsc = spawnSync(process.execPath, [join(root, 'node_modules', 'typescript', 'bin', 'tsc'), '-p', join(root, 'tsconfig.qos.json')], { encoding: 'utf8' });
if (tsc.status !== 0) {
  process.stderr.write(tsc.stdout + tsc.stderr);
  process.exit(1);
}

// Spindle's guest programs (roms/): the guest `spindle system` boots by default, and the
// boot sector the firmware-boot tests put on disks and CDs.
const { buildGuest, buildBootSector } = await import('./build-roms.mjs');
buildGuest();
buildBootSector();

