// The simulated Xen pieces: xenstore (tree, watches), grant table v1 checks, event channels,
// and the xen bridge's port interface as a guest drives it through qtest.
import { describe, expect, it } from 'vitest';
import { Machine } from '../../hw/core/machine.js';
import { PcMachine } from '../../hw/pc/pc.js';
import { ABI_X86_32, BLKIF_OP_INDIRECT, BLKIF_OP_WRITE, blkifRingSize, decodeRequest, encodeRequest } from '../../hw/xen/blkif-ring.js';
import { GTF_permit_access, GTF_readonly, GrantTable } from '../../hw/xen/grant-table.js';
import { Errno, XEN_BRIDGE_BASE, XEN_BRIDGE_SIGNATURE, XenBridge, XenBridgeCmd } from '../../hw/xen/xen-bridge.js';
import { XenStore } from '../../hw/xen/xenstore.js';
import { GuestAlloc } from '../../src/qos/alloc.js';
import { QtestClient } from '../../src/qos/qtest-client.js';
import { XenGuest } from '../../src/qos/xen-blkfront.js';

describe('xenstore', () => {
  it('reads, writes, lists and removes subtrees; bad paths are refused', () => {
    const xs = new XenStore();
    xs.write('/a/b/c', '1');
    xs.write('/a/b/d', '2');
    expect(xs.read('/a/b/c')).toBe('1');
    expect(xs.read('/a/b')).toBe('');
    expect(xs.directory('/a/b')).toEqual(['c', 'd']);
    expect(xs.directory('/nope')).toBeUndefined();
    xs.mkdir('/a/b/c');
    expect(xs.read('/a/b/c')).toBe('1'); // mkdir keeps an existing value
    expect(xs.readInt('/a/b/d')).toBe(2);
    expect(xs.rm('/a/b')).toBe(true);
    expect(xs.read('/a/b/c')).toBeUndefined();
    expect(xs.rm('/a/b')).toBe(false);
    expect(() => xs.write('relative', 'x')).toThrow(/invalid path/);
    expect(() => xs.write('/a//b', 'x')).toThrow(/empty component/);
  });

  it('fires watches at registration and for changes at or below the path, not beside it', () => {
    const xs = new XenStore();
    const seen: string[] = [];
    const unwatch = xs.watch('/fe/state', 'tok', (p, t) => seen.push(`${t}:${p}`));
    xs.write('/fe/state', '1');
    xs.write('/fe/state2', 'x'); // a sibling sharing the prefix
    xs.write('/fe/state/sub', 'y');
    xs.rm('/fe');
    unwatch();
    xs.write('/fe/state', '3');
    expect(seen).toEqual(['tok:/fe/state', 'tok:/fe/state', 'tok:/fe/state/sub', 'tok:/fe/state']);
  });

  it('delivers events caused by a watcher after it returns, and keeps a watcher\'s error away from the writer', () => {
    const xs = new XenStore();
    const order: string[] = [];
    xs.watch('/x', 'a', (p) => {
      order.push(`a ${p}`);
      if (p === '/x/1') xs.write('/x/2', 'z');
    });
    xs.watch('/x/1', 'b', () => {
      order.push('b');
      throw new Error('watcher bug');
    });
    order.length = 0;
    expect(() => xs.write('/x/1', 'v')).not.toThrow();
    expect(order).toEqual(['a /x/1', 'b', 'a /x/2']);
    expect(xs.watchErrors.length).toBe(2); // at registration and on the write
  });
});

describe('grant table v1', () => {
  it('maps permitted entries and refuses bad refs, foreign domains, read-only writes and frames outside RAM', () => {
    const m = new Machine({ ramSize: 1 << 20 });
    const g = new GrantTable(m.ram);
    const table = 0x10000;
    g.setup(table, 1);
    expect(g.size).toBe(512);
    const entry = (ref: number, flags: number, domid: number, frame: number) => {
      const dv = new DataView(m.ram.bytes.buffer, table + ref * 8, 8);
      dv.setUint16(0, flags, true);
      dv.setUint16(2, domid, true);
      dv.setUint32(4, frame, true);
    };
    entry(8, GTF_permit_access, 0, 0x20);
    entry(9, GTF_permit_access | GTF_readonly, 0, 0x21);
    entry(10, GTF_permit_access, 5, 0x22);
    entry(11, GTF_permit_access, 0, 0x100000);
    m.ram.bytes[0x20000] = 0x77;
    const page = g.map(8, 0, true);
    expect(page.length).toBe(4096);
    expect(page[0]).toBe(0x77);
    page[1] = 0x66; // a view, not a copy
    expect(m.ram.bytes[0x20001]).toBe(0x66);
    expect(g.map(9, 0, false).length).toBe(4096);
    expect(() => g.map(9, 0, true)).toThrow(/read-only/);
    expect(() => g.map(7, 0, false)).toThrow(/does not permit access/);
    expect(() => g.map(10, 0, false)).toThrow(/granted to domain 5/);
    expect(() => g.map(11, 0, false)).toThrow(/outside guest RAM/);
    expect(() => g.map(512, 0, false)).toThrow(/outside the grant table/);
    expect(() => g.setup(0x10001, 1)).toThrow(/page-aligned/);
  });

  it('sizes blkif rings as the ring macros do, and lays requests out per ABI', () => {
    expect([1, 2, 4, 8, 16].map((p) => blkifRingSize(p))).toEqual([32, 64, 128, 256, 512]);
    expect([1, 2, 4].map((p) => blkifRingSize(p, ABI_X86_32))).toEqual([32, 64, 128]);
    const req = { operation: BLKIF_OP_WRITE, id: 0x1122334455667788n, sector: 0x99n, seg: [{ gref: 0xabcd, firstSect: 1, lastSect: 6 }] };
    const b64 = encodeRequest(req);
    const b32 = encodeRequest(req, ABI_X86_32);
    expect([b64.length, b32.length]).toEqual([112, 108]);
    // x86_64: id at 8, sector at 16, segments at 24; x86_32 packs u64s at 4-byte alignment.
    expect(new DataView(b64.buffer).getBigUint64(8, true)).toBe(req.id);
    expect(new DataView(b32.buffer).getBigUint64(4, true)).toBe(req.id);
    expect(new DataView(b64.buffer).getUint32(24, true)).toBe(0xabcd);
    expect(new DataView(b32.buffer).getUint32(20, true)).toBe(0xabcd);
    expect(decodeRequest(b32, ABI_X86_32)).toMatchObject({ operation: BLKIF_OP_WRITE, nrSegments: 1, id: req.id, sector: 0x99n, seg: req.seg });
    const ind = encodeRequest({ operation: BLKIF_OP_INDIRECT, id: 5n, indirectOp: BLKIF_OP_WRITE, nrSegments: 300, handle: 7, indirectGrefs: [9, 10] }, ABI_X86_32);
    expect(new DataView(ind.buffer).getUint32(24, true)).toBe(9);
    expect(decodeRequest(ind, ABI_X86_32)).toMatchObject({ indirectOp: BLKIF_OP_WRITE, nrSegments: 300, handle: 7, indirectGrefs: [9, 10, 0, 0, 0, 0, 0, 0] });
  });
});

describe('xen bridge', () => {
  it('answers at 0x5a0 with xenstore requests, grant setup and event channels, errors as errno', async () => {
    const m = new PcMachine({ ramSize: 32 << 20 });
    const bridge = new XenBridge({ id: 'xenbridge' });
    m.addDevice(bridge);
    const qts = QtestClient.inProcess(m);
    expect(await qts.inl(XEN_BRIDGE_BASE)).toBe(XEN_BRIDGE_SIGNATURE);
    const xen = await XenGuest.create(qts, await GuestAlloc.forPc(qts));
    expect(bridge.grants.size).toBe(1024);

    await xen.write('/local/domain/1/data/k', 'hello');
    expect(bridge.store.read('/local/domain/1/data/k')).toBe('hello');
    expect(await xen.read('/local/domain/1/data/k')).toBe('hello');
    expect(await xen.directory('/local/domain/1/data')).toEqual(['k']);
    expect((await xen.xs('read', '/nope')).status).toBe(Errno.ENOENT);
    expect((await xen.xs('frobnicate', '/x')).status).toBe(Errno.EINVAL);
    expect((await xen.xs('write', 'bad path', 'v')).status).toBe(Errno.EINVAL);
    expect(await xen.rm('/local/domain/1/data')).toBe(true);
    expect(await xen.read('/local/domain/1/data/k')).toBeUndefined();
    expect((await xen.cmd(99)).status).toBe(Errno.ENOSYS);
    expect((await xen.cmd(XenBridgeCmd.GNTTAB_SETUP, 0x1001, 1)).status).toBe(Errno.ERANGE);

    // Event channels: guest → backend calls the bound handler; backend → guest sets
    // the pending bit and raises the 'xen-evtchn' line until the guest acknowledges it.
    await qts.irqInterceptIn('xen-evtchn');
    const port = await xen.evtchnAlloc(0);
    expect(port).toBeGreaterThan(0);
    let kicks = 0;
    expect(() => bridge.evtchn.bind(port, 1, () => undefined)).toThrow(/for domain 0, not 1/);
    bridge.evtchn.bind(port, 0, () => kicks++);
    expect(() => bridge.evtchn.bind(port, 0, () => undefined)).toThrow(/already bound/);
    expect(await xen.notify(port)).toBe(0);
    expect(kicks).toBe(1);
    expect(await xen.notify(port + 7)).toBe(Errno.ENOENT);
    expect(qts.getIrq(port)).toBe(false);
    bridge.evtchn.notifyGuest(port);
    expect(qts.getIrq(port)).toBe(true);
    expect(await xen.pending(port)).toBe(true);
    expect(await xen.ack(port)).toBe(true);
    expect(qts.getIrq(port)).toBe(false);
    expect(await xen.pending(port)).toBe(false);
    expect(await xen.ack(port)).toBe(false);
    await xen.evtchnClose(port);
    expect(await xen.notify(port)).toBe(Errno.ENOENT);

    m.removeDevice('xenbridge');
    expect(await qts.inl(XEN_BRIDGE_BASE)).toBe(0xffffffff);
  });
});
