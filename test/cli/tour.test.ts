// spindle tour: runs to the end, every step printed, each contract shown.
import { beforeAll, describe, expect, it } from 'vitest';
import { ensureBuilt, ok, spindle } from './helpers.js';

beforeAll(ensureBuilt);

describe('tour', () => {
  it('exits 0 and prints its steps', () => {
    const out = ok(spindle('tour')).stdout;
    const steps = [...out.matchAll(/^(\d+)\. /gm)].map((m) => Number(m[1]));
    expect(steps).toEqual(steps.map((_, i) => i + 1));
    expect(steps.length).toBeGreaterThanOrEqual(8);
    expect(out).toMatch(/I\/O engine: (io_uring|threads)/);
    expect(out).toMatch(/read back matches/);
    expect(out).toMatch(/\[1048576, 1114112\) data/);
    expect(out).toMatch(/EPERM: Permission conflict on node .*anonymous block device.*device 'disk0' \(block device 'drive0'\)/);
    expect(out).toMatch(/write: EIO: /);
    expect(out).toMatch(/\[disk0\] changeMedia\(false\)[\s\S]*\[disk0\] changeMedia\(true\)/);
    expect(out).toMatch(/ENOMEDIUM/);
    expect(out).toMatch(/the name is free: a new backend 'drive0' exists, and it is not the old one: true/);
    expect(out).toMatch(/old backend is gone/);
    expect(out).not.toMatch(/unexpectedly|DIFFERS|STILL ALIVE/);
    expect(ok(spindle('tour')).stdout).toBe(out); // deterministic
  });
});
