// Failures are one line on stderr, `spindle img: ...` / `spindle: ...`, exit status 1.
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ensureBuilt, ok, spindle, tempDir } from './helpers.js';

const t = tempDir();
beforeAll(ensureBuilt);
afterAll(t.cleanup);

function fails(args: string[], message: string | RegExp): void {
  const r = spindle(...args);
  expect(r.status).toBe(1);
  expect(r.stdout).toBe('');
  expect(r.stderr.split('\n')).toHaveLength(2); // one line and its newline
  if (typeof message === 'string') expect(r.stderr).toBe(`${message}\n`);
  else expect(r.stderr).toMatch(message);
}

describe('errors', () => {
  it('bad sizes', () => {
    const msg = 'spindle img: Invalid image size specified. You may use k, M, G, T, P or E suffixes for kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.';
    for (const size of ['12x', '1.5', '1e3', '1kb', 'G', '']) fails(['img', 'create', join(t.dir, 'a.img'), size], msg);
    fails(['img', 'create', join(t.dir, 'a.img'), '8E'], 'spindle img: Invalid image size specified. Must be between 0 and 9223372036854775807.');
  });

  it('a missing file is named', () => {
    const f = join(t.dir, 'missing.img');
    fails(['img', 'info', f], new RegExp(`^spindle img: Could not open '${f}': No such file or directory\\n$`));
    fails(['img', 'convert', f, join(t.dir, 'out.img')], /^spindle img: .*missing\.img.*No such file/);
    fails(['img', 'bench', '-c', '10', '-f', 'raw', f], /^spindle img: .*missing\.img.*No such file/);
  });

  it('unknown and unsupported formats', () => {
    const f = join(t.dir, 'fmt.img');
    ok(spindle('img', 'create', f, '1M'));
    fails(['img', 'info', '-f', 'foo', f], /^spindle img: Unknown driver 'foo' \(known: .*raw.*\)\n$/);
    fails(['img', 'create', '-f', 'foo', f, '1M'], /^spindle img: Unknown driver 'foo' \(known: .*raw.*\)\n$/);
    fails(['img', 'create', '-f', 'qcow2', '-o', 'cluster_size=3k', f, '1M'], `spindle img: ${f}: Cluster size must be a power of two between 512 and 2048k`);
    fails(['img', 'convert', '-O', 'null-co', f, join(t.dir, 'o.img')], "spindle img: Format driver 'null-co' does not support image creation");
    fails(['img', 'convert', '-c', '-O', 'raw', f, join(t.dir, 'o.img')], "spindle img: Compression not supported for format 'raw'");
  });

  it('bad options and commands', () => {
    fails(['img', 'info', '--bogus', 'x.img'], "spindle img: unknown option '--bogus'");
    fails(['img', 'frob'], /^spindle img: unknown command 'frob'/);
    fails(['frob'], /^spindle: unknown command 'frob'/);
    fails(['img', 'info', '--output=xml', 'x.img'], 'spindle img: --output must be used with human or json as argument.');
    fails(['img', 'bench', '-t', 'sometimes', 'x.img'], /^spindle img: Invalid cache mode 'sometimes'/);
    fails(['img', 'bench', '-i', 'carrier-pigeon', 'x.img'], 'spindle img: Invalid aio option: carrier-pigeon');
    fails(['img', 'bench', '--flush-interval=64', 'x.img'], 'spindle img: --flush-interval is only available in write tests');
    fails(['img', 'info', 'json:{"driver":'], /^spindle img: Could not parse the JSON options/);
  });

  it('--help and --version exit 0', () => {
    expect(ok(spindle('--version')).stdout).toMatch(/^\d+\.\d+\.\d+\n$/);
    expect(ok(spindle('img', 'bench', '--help')).stdout).toMatch(/--flush-interval/);
  });
});
