// img snapshot: the same operations by Spindle and by qemu-img give the same listings, data,
// messages and exit codes; images stay clean; `img info` lists snapshots as qemu-img does.
import { spawnSync } from 'node:child_process';
import { copyFileSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { serializeSnapshotTable, type SnapshotInfo } from '../../src/block/drivers/qcow2/snapshot-table.js';
import { bundle, ensureBuilt, ok, qemuImg, spindle, tempDir } from './helpers.js';

const t = tempDir();
const p = (n: string): string => join(t.dir, n);
const io = (file: string, ...cmds: string[]): void => {
  const r = spawnSync('qemu-io', ['-f', 'qcow2', ...cmds.flatMap((c) => ['-c', c]), file], { encoding: 'utf8' });
  expect(r.status, r.stderr).toBe(0);
};
const raw = (file: string, ...extra: string[]): Buffer => {
  ok(qemuImg('convert', ...extra, '-O', 'raw', file, `${file}.raw`));
  return readFileSync(`${file}.raw`);
};
const clean = (file: string): void => {
  const r = qemuImg('check', file);
  expect(r.stdout, r.stderr).toContain('No errors were found');
  expect(r.status).toBe(0);
};
/** Dates differ between two runs; everything else in a listing must not. */
const undated = (s: string): string => s.replace(/\d{4}-\d\d-\d\d \d\d:\d\d:\d\d/g, 'DATE').replace(/"date-n?sec": \d+/g, '"date"');

const oldTz = process.env.TZ;
beforeAll(async () => {
  await ensureBuilt();
  process.env.TZ = 'UTC';
  ok(qemuImg('create', '-f', 'qcow2', p('base.qcow2'), '4M'));
  io(p('base.qcow2'), 'write -P 1 0 1M', 'write -P 2 3M 64k');
});
afterAll(() => {
  process.env.TZ = oldTz;
  t.cleanup();
});

function pair(tag: string): [string, string] {
  const a = p(`${tag}-s.qcow2`);
  const b = p(`${tag}-q.qcow2`);
  copyFileSync(p('base.qcow2'), a);
  copyFileSync(p('base.qcow2'), b);
  return [a, b];
}

/** Runs the same snapshot command through both tools; outputs and statuses must agree. */
function both(a: string, b: string, ...args: string[]): void {
  const s = spindle('img', 'snapshot', ...args, a);
  const q = qemuImg('snapshot', ...args, b);
  expect(s.status, s.stderr).toBe(q.status);
  expect(undated(s.stdout)).toBe(undated(q.stdout));
  expect(s.stderr).toBe(q.stderr.replace(/^qemu-img:/, 'spindle img:'));
}

describe('img snapshot', () => {
  it('create, list, apply and delete side by side with qemu-img', () => {
    const [a, b] = pair('seq');
    both(a, b, '-l');
    both(a, b, '-c', 's1');
    for (const f of [a, b]) io(f, 'write -P 3 512k 1M');
    both(a, b, '-c', 's2');
    both(a, b, '-c', 's1'); // duplicate names are allowed, with a new ID
    for (const f of [a, b]) io(f, 'write -P 4 0 4k');
    both(a, b, '-l');
    clean(a);
    // qemu-img applies what Spindle made, and the other way round.
    expect(raw(a, '-l', 'snapshot.name=s2').equals(raw(b, '-l', 'snapshot.name=s2'))).toBe(true);
    both(a, b, '-a', 's1');
    clean(a);
    expect(raw(a).equals(raw(b))).toBe(true);
    both(a, b, '-a', '2'); // -a takes IDs too
    expect(raw(a).equals(raw(b))).toBe(true);
    both(a, b, '-d', '2'); // -d does not
    both(a, b, '-d', 's1'); // the first of two
    both(a, b, '-l');
    both(a, b, '-d', 's2');
    both(a, b, '-d', 's1');
    both(a, b, '-l');
    clean(a);
    expect(raw(a).equals(raw(b))).toBe(true);
    const info = (f: string): string => undated(qemuImg('info', '--output=json', f).stdout.replace(f, 'X').replace(/"actual-size": \d+/, ''));
    expect(info(a)).toBe(info(b));
  });

  it('errors and messages as qemu-img', () => {
    const [a, b] = pair('err');
    both(a, b, '-a', 'nope');
    both(a, b, '-d', 'nope');
    both(a, b, '-c', '');
    both(a, b, '-l');
    const mix = spindle('img', 'snapshot', '-l', '-c', 'x', a);
    expect(mix.status).toBe(1);
    expect(mix.stderr).toBe("spindle img: Cannot mix '-l', '-a', '-c', '-d'\n");
    expect(spindle('img', 'snapshot', '-c', 'x', '-c', 'y', a).stderr).toContain('Cannot mix');
    const missing = spindle('img', 'snapshot', '-l', p('none.qcow2'));
    expect(missing.status).toBe(1);
    expect(missing.stderr).toMatch(/^spindle img: Could not open '.*none.qcow2'/);
    // Raw images have no internal snapshots.
    const r = p('r.raw');
    ok(qemuImg('create', '-f', 'raw', r, '1M'));
    for (const args of [['-l'], ['-c', 'x'], ['-a', 'x'], ['-d', 'x']]) {
      const s = spindle('img', 'snapshot', ...args, r);
      const q = qemuImg('snapshot', ...args, r);
      expect(s.status, args.join(' ')).toBe(q.status);
      expect(s.stdout).toBe(q.stdout);
      // (qemu-img -a prints the probing warning twice: it reopens the file; the message is what counts.)
      const last = (x: string): string => x.trim().split('\n').pop()!.replace(/^(spindle img|qemu-img):/, '');
      expect(last(s.stderr), args.join(' ')).toBe(last(q.stderr));
    }
  });

  it('lists every column as qemu-img does, in local time', () => {
    const f = p('cols.qcow2');
    copyFileSync(p('base.qcow2'), f);
    ok(spindle('img', 'snapshot', '-c', 'x', f));
    ok(spindle('img', 'snapshot', '-c', 'y', f));
    // Rewrite the entries with what qemu-img cannot set: VM state size, VM clock, no icount,
    // names longer than the column and not ASCII.
    const img = readFileSync(f);
    const at = Number(img.readBigUInt64BE(64));
    const base = { l1Offset: 0, l1Size: 0, dateNsec: 5, diskSize: 4 << 20, extraRest: Buffer.alloc(0) };
    const second = at + Math.ceil((40 + img.readUInt32BE(at + 36) + img.readUInt16BE(at + 12) + img.readUInt16BE(at + 14)) / 8) * 8;
    const l1 = (i: number): Pick<SnapshotInfo, 'l1Offset' | 'l1Size'> => {
      const e = i ? second : at;
      return { l1Offset: Number(img.readBigUInt64BE(e)), l1Size: img.readUInt32BE(e + 8) };
    };
    const x = { ...base, ...l1(0), id: '1', name: 'a name longer than seventeen', dateSec: 1_700_000_000, vmClockNsec: 3723_456_789_000, vmStateSize: 1536, icount: -1 };
    const y = { ...base, ...l1(1), id: '12', name: 'ünïcode', dateSec: 1_600_000_000, vmClockNsec: 400_000 * 1e9, vmStateSize: 0, icount: 77 };
    serializeSnapshotTable([x, y], 4 << 20).copy(img, at);
    writeFileSync(f, img);
    for (const tz of ['UTC', 'Asia/Kolkata', 'America/New_York']) {
      const env = { ...process.env, TZ: tz };
      const s = spawnSync(process.execPath, [bundle, 'img', 'snapshot', '-l', f], { encoding: 'utf8', env });
      const q = spawnSync('qemu-img', ['snapshot', '-l', f], { encoding: 'utf8', env });
      expect(s.stdout).toBe(q.stdout);
      const si = spawnSync(process.execPath, [bundle, 'img', 'info', f], { encoding: 'utf8', env });
      const qi = spawnSync('qemu-img', ['info', f], { encoding: 'utf8', env });
      expect(si.stdout.replace(/disk size: .*\n/, '')).toBe(qi.stdout.replace(/disk size: .*\n/, ''));
    }
    const sj = ok(spindle('img', 'info', '--output=json', f)).stdout.replace(/"actual-size": \d+/, '');
    // Key order and values as qemu-img's (which also escapes non-ASCII; Spindle's info does not).
    const qj = JSON.stringify(JSON.parse(ok(qemuImg('info', '--output=json', f)).stdout), null, 4);
    expect(sj.trim()).toBe(qj.replace(/"actual-size": \d+/, ''));
    clean(f);
  });

  it('works on an overlay whose backing file is gone (the backing file is never opened)', () => {
    const base = p('gone-base.qcow2');
    const top = p('gone-top.qcow2');
    ok(qemuImg('create', '-f', 'qcow2', base, '1M'));
    ok(qemuImg('create', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top));
    io(top, 'write -P 9 0 64k');
    const saved = readFileSync(base);
    writeFileSync(base, '');
    ok(spindle('img', 'snapshot', '-c', 'o', top));
    expect(ok(spindle('img', 'snapshot', '-l', '-U', top)).stdout).toMatch(/^1 +o /m);
    ok(spindle('img', 'snapshot', '-a', 'o', top));
    ok(spindle('img', 'snapshot', '-d', 'o', top));
    writeFileSync(base, saved); // qemu-img check opens the backing file
    clean(top);
  });
});
