// startMachine: `spindle system` launched the libqtest way, driven through the built
// spindle/qos module as a user of the package would import it.
import { describe, expect, it } from 'vitest';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { ensureBuilt, root } from '../cli/helpers.js';

type Qos = typeof import('../../src/qos/index.js');
/** The built module, by the package's own name (a string, so tsc does not look for types). */
const QOS = 'spindle/qos';

describe('qos: startMachine', () => {
  it('starts spindle system under qtest, enumerates its PCI bus, and quits cleanly', async () => {
    await ensureBuilt();
    const qos = (await import(QOS)) as Qos;
    const vm = await qos.startMachine(['-machine', 'pc', '-m', '32', '-nodefaults']);
    const bus = new qos.QPciBus(vm.qts);
    expect((await bus.enumerate()).map(([devfn, v, d]) => `${devfn.toString(16)} ${v.toString(16)}:${d.toString(16)}`)).toEqual([
      '0 8086:1237', '8 8086:7000', '9 8086:7010', 'b 8086:7113',
    ]);
    const alloc = await qos.GuestAlloc.forPc(vm.qts);
    const at = alloc.alloc(4096);
    await vm.qts.memwrite(at, Uint8Array.of(7, 7, 7));
    expect([...(await vm.qts.memread(at, 3))]).toEqual([7, 7, 7]);
    expect(await vm.qmp.execute('query-status')).toMatchObject({ status: 'running' });
    await expect(vm.qmp.execute('no-such')).rejects.toThrow(/has not been found/);
    expect(await vm.quit()).toBe(0);
  });

  it('ships its types: the package export names a declaration file that declares the API', async () => {
    await ensureBuilt();
    const pkg = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')) as { exports: Record<string, { types: string; default: string }> };
    const types = readFileSync(join(root, pkg.exports['./qos']!.types), 'utf8');
    for (const name of ['startMachine', 'QtestClient', 'QPciBus', 'GuestAlloc', 'QVirtioBlk', 'QAtaChannel', 'XenBlkfront']) expect(types).toContain(name);
  });

  it('reports a machine that exits before connecting, with its error', async () => {
    await ensureBuilt();
    const qos = (await import(QOS)) as Qos;
    await expect(qos.startMachine(['-frobnicate'])).rejects.toThrow(/exited \(1\) before connecting: .*-frobnicate: invalid option/);
  });
});
