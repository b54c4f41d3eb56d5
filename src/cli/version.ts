/**
 * The package's root and version, from the package.json that sits above this code (dist/
 * when bundled, src/cli/ when run from source), so neither is a second copy to keep in step.
 */
import { existsSync, readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

interface Found {
  root: string;
  version: string;
}
let found: Found | null | undefined;

function findPackage(): Found | null {
  if (found !== undefined) return found;
  for (let dir = dirname(fileURLToPath(import.meta.url)); ; dir = dirname(dir)) {
    const p = join(dir, 'package.json');
    if (existsSync(p)) {
      const pkg = JSON.parse(readFileSync(p, 'utf8')) as { name?: string; version?: string };
      if (pkg.name === 'spindle') return (found = { root: dir, version: pkg.version ?? '0.0.0' });
    }
    if (dirname(dir) === dir) return (found = null);
  }
}

export function packageVersion(): string {
  return findPackage()?.version ?? '0.0.0';
}

/** Spindle's package root (where build/ and node_modules/ are). */
export function packageRoot(): string {
  const f = findPackage();
  if (!f) throw new Error("Spindle's package.json was not found above its code");
  return f.root;
}
