// Bundles the CLI into dist/spindle.mjs (the package's bin). The native addon stays in
// build/Release and is found at run time from the package root.
import { build } from 'esbuild';
import { chmodSync } from 'node:fs';

await build({
  entryPoints: ['src/cli/main.ts'],
  bundle: true,
  platform: 'node',
  target: 'node20',
  format: 'esm',
  outfile: 'dist/spindle.mjs',
  banner: { js: "#!/usr/bin/env node\nimport { createRequire as __cr } from 'node:module'; const require = __cr(import.meta.url);" },
  sourcemap: 'linked',
  logLevel: 'warning',
});
chmodSync('dist/spindle.mjs', 0o755);
