// vhost-user-blk control plane against real kernel objects: a TypeScript front-end playing
// QEMU's part over a UNIX socket, memfds for guest RAM, eventfds for kick/call, and fd and
// mapping leak counts. The front-end itself is in vhost-user-frontend.ts.
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { closeFd, eventfd, eventfdRead, eventfdWrite, liveMappings, memfdCreate, mmapFd, unmapFd } from '../../src/native/unix-fd.js';
import type { VhostUserBlkBackend } from '../../src/export/vhost-user/backend.js';
import { BLK_CFG_WCE, BLK_CONFIG_SIZE, blkFeatures, PROTOCOL_FEATURES, VIRTIO_F_VERSION_1 } from '../../src/export/vhost-user/blk-features.js';
import { VhostUserBlkServer } from '../../src/export/vhost-user/server.js';
import { GuestMemoryTable, MemoryTableError } from '../../src/export/vhost-user/memory.js';
import * as P from '../../src/export/vhost-user/protocol.js';
import { VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_FLUSH } from '../../hw/virtio/virtio-blk-abi.js';
import {
  configReq, connect, EXPORT_LEN, fdCount, FrontEnd, frontEnds, guestRam, HIGH, LOW, memTable, MiB, qemuStartup, QSIZE,
  releaseHeld, ringLayout, servers, sleep, toClose, until, vringAddr,
} from './vhost-user-frontend.js';
import { scratchDir } from '../helpers/tmp.js';

const dir = scratchDir('spindle-vhost-');
let sockN = 0;
afterEach(releaseHeld);

function startServer(numQueues = 2, extra: { readOnly?: boolean } = {}): { server: VhostUserBlkServer; path: string } {
  const path = join(dir, `s${sockN++}.sock`);
  const server = new VhostUserBlkServer(path, { length: EXPORT_LEN, numQueues, ...extra });
  servers.push(server);
  return { server, path };
}

describe('vhost-user-blk control plane: QEMU start-up sequence', () => {
  it('negotiates, maps guest memory, sets up rings and serves GET_VRING_BASE', async () => {
    const { server, path } = startServer(2);
    const { fe, be } = await connect(server, path);
    const ram = guestRam();
    const { kicks, calls } = await qemuStartup(fe, ram.fd, 2);

    expect(be.owned).toBe(true);
    expect(be.hasFeature(VIRTIO_F_VERSION_1)).toBe(true);
    expect(be.hasFeature(VIRTIO_BLK_F_FLUSH)).toBe(false);
    expect(be.ackedProtocolFeatures).toBe(PROTOCOL_FEATURES);

    // The back-end's view of guest memory sees the pattern, by guest-physical address...
    expect(be.memory.regions.length).toBe(2);
    expect(be.translate(0x3000, 1)![0]).toBe(3);
    expect(be.translate(HIGH.gpa + 5 * 4096, 1)![0]).toBe(((2 * MiB) / 4096 + 5) & 0xff);
    expect(be.translate(HIGH.gpa + HIGH.size - 1, 1)![0]).toBe(0xa5);
    // ...and its writes land in the front-end's mapping (same pages, MAP_SHARED).
    be.translate(HIGH.gpa + 100, 4)!.set([1, 2, 3, 4]);
    expect([...ram.view.subarray(2 * MiB + 100, 2 * MiB + 104)]).toEqual([1, 2, 3, 4]);
    ram.view[12345] = 0x77;
    expect(be.translate(12345, 1)![0]).toBe(0x77);

    for (let i = 0; i < 2; i++) {
      const r = be.rings[i]!;
      const l = ringLayout(i);
      expect(r.num).toBe(QSIZE);
      expect(r.base).toBe(7 + i);
      expect(r.started).toBe(true);
      expect(be.ringEnabled(r)).toBe(true);
      expect(be.ringReady(r)).toBe(true);
      // Ring views sit at the front-end's user address translated through the table.
      expect(r.addr!.desc.region).toBe(1);
      expect(r.addr!.desc.offset).toBe(l.desc - HIGH.uva);
      expect(r.addr!.desc.bytes.length).toBe(16 * QSIZE);
      expect(r.addr!.avail.bytes.length).toBe(6 + 2 * QSIZE);
      expect(r.addr!.used.bytes.length).toBe(6 + 8 * QSIZE);
      ram.view[2 * MiB + (l.avail - HIGH.uva) + 2] = 0x42 + i; // avail->idx low byte
      expect(r.addr!.avail.bytes[2]).toBe(0x42 + i);
      r.addr!.used.bytes[2] = 0x24 + i;
      expect(ram.view[2 * MiB + (l.used - HIGH.uva) + 2]).toBe(0x24 + i);
      // The kick eventfd the back-end holds is the one sent: a front-end kick reads there.
      eventfdWrite(kicks[i]!, 3 + i);
      expect(eventfdRead(r.kickFd)).toBe(3 + i);
      expect(eventfdRead(kicks[i]!)).toBe(0);
      // And the call fd is the front-end's: a back-end call is read by the front-end.
      eventfdWrite(r.callFd, 5);
      expect(eventfdRead(calls[i]!)).toBe(5);
    }

    // GET_VRING_BASE stops the ring and replies the base (the data plane did not move it).
    const vb = await fe.call(P.VHOST_USER_GET_VRING_BASE, P.vringStatePayload(1, 0));
    expect([...vb]).toEqual([...P.vringStatePayload(1, 8)]);
    expect(be.rings[1]!.started).toBe(false);
    expect(be.rings[1]!.kickFd).toBe(-1);
    expect(be.ringReady(be.rings[1]!)).toBe(false);
    expect(be.ringReady(be.rings[0]!)).toBe(true);
    expect(be.errors).toEqual([]);
  });

  it('GET_VRING_BASE reports what the data plane advanced through the ringStopping hook', async () => {
    const path = join(dir, `s${sockN++}.sock`);
    let stopped = -1;
    const server = new VhostUserBlkServer(path, {
      length: EXPORT_LEN,
      hooks: { ringStopping: (_b, r) => { stopped = r.index; r.lastAvailIdx = 0x1234; } },
    });
    servers.push(server);
    const { fe } = await connect(server, path);
    await fe.call(P.VHOST_USER_GET_FEATURES);
    fe.send(P.VHOST_USER_SET_VRING_BASE, P.vringStatePayload(0, 9));
    const vb = await fe.call(P.VHOST_USER_GET_VRING_BASE, P.vringStatePayload(0, 0));
    expect(stopped).toBe(0);
    expect(P.dataView(vb).getUint32(4, true)).toBe(0x1234);
  });

  it('without protocol features rings start enabled; with them, only after SET_VRING_ENABLE', async () => {
    const { server, path } = startServer(1);
    const { fe, be } = await connect(server, path);
    fe.send(P.VHOST_USER_SET_FEATURES, P.u64Payload(P.bit(VIRTIO_F_VERSION_1)));
    await fe.call(P.VHOST_USER_GET_FEATURES); // a round trip: SET_FEATURES was handled
    expect(be.ringEnabled(be.rings[0]!)).toBe(true);
    fe.send(P.VHOST_USER_SET_FEATURES, P.u64Payload(P.bit(VIRTIO_F_VERSION_1) | P.bit(P.VHOST_USER_F_PROTOCOL_FEATURES)));
    await fe.call(P.VHOST_USER_GET_FEATURES);
    expect(be.ringEnabled(be.rings[0]!)).toBe(false);
    fe.send(P.VHOST_USER_SET_VRING_ENABLE, P.vringStatePayload(0, 1));
    await fe.call(P.VHOST_USER_GET_FEATURES);
    expect(be.ringEnabled(be.rings[0]!)).toBe(true);
  });
});

describe('REPLY_ACK', () => {
  it('acks 0 on success and 1 on refusal, and the session goes on', async () => {
    const { server, path } = startServer(1);
    const { fe, be } = await connect(server, path);
    fe.send(P.VHOST_USER_SET_PROTOCOL_FEATURES, P.u64Payload(PROTOCOL_FEATURES));
    expect(await fe.ack(P.VHOST_USER_SET_VRING_NUM, P.vringStatePayload(0, 256))).toBe(0n);
    expect(be.rings[0]!.num).toBe(256);
    expect(await fe.ack(P.VHOST_USER_SET_VRING_NUM, P.vringStatePayload(0, 100))).toBe(1n); // not a power of 2
    expect(await fe.ack(P.VHOST_USER_SET_VRING_NUM, P.vringStatePayload(1, 64))).toBe(1n); // no ring 1
    expect(be.rings[0]!.num).toBe(256);
    expect(await fe.ack(P.VHOST_USER_SET_FEATURES, P.u64Payload(P.bit(40)))).toBe(1n); // not offered
    expect(await fe.ack(999)).toBe(1n); // unknown request
    // A request with its own reply gets exactly that reply, no extra ack.
    fe.send(P.VHOST_USER_GET_QUEUE_NUM, undefined, [], true);
    expect(P.dataView(await fe.reply(P.VHOST_USER_GET_QUEUE_NUM)).getBigUint64(0, true)).toBe(1n);
    await fe.silent();
    expect(be.closed).toBe(false);
    expect(be.errors.length).toBe(4);
  });

  it('need_reply without negotiated REPLY_ACK gets no reply', async () => {
    const { server, path } = startServer(1);
    const { fe, be } = await connect(server, path);
    fe.send(P.VHOST_USER_SET_OWNER, undefined, [], true);
    await fe.silent();
    expect(be.owned).toBe(true);
    expect(await fe.u64(P.VHOST_USER_GET_QUEUE_NUM)).toBe(1n);
  });
});

describe('refusals', () => {
  async function mapped(): Promise<{ fe: FrontEnd; be: VhostUserBlkBackend; ram: { fd: number; view: Uint8Array } }> {
    const { server, path } = startServer(1);
    const { fe, be } = await connect(server, path);
    const ram = guestRam();
    fe.send(P.VHOST_USER_SET_PROTOCOL_FEATURES, P.u64Payload(PROTOCOL_FEATURES));
    expect(await fe.ack(P.VHOST_USER_SET_MEM_TABLE, memTable([LOW, HIGH]), [ram.fd, ram.fd])).toBe(0n);
    expect(await fe.ack(P.VHOST_USER_SET_VRING_NUM, P.vringStatePayload(0, QSIZE))).toBe(0n);
    return { fe, be, ram };
  }

  it('SET_VRING_ADDR outside the table is refused (ack 1), at the edge accepted', async () => {
    const { fe, be } = await mapped();
    const l = ringLayout(0);
    // Descriptor table in the hole between the regions.
    expect(await fe.ack(P.VHOST_USER_SET_VRING_ADDR, vringAddr(0, LOW.uva + LOW.size, l.used, l.avail))).toBe(1n);
    // Used ring straddling the end of the HIGH region by 4 bytes.
    const usedEnd = HIGH.uva + HIGH.size - (6 + 8 * QSIZE) + 4;
    expect(await fe.ack(P.VHOST_USER_SET_VRING_ADDR, vringAddr(0, l.desc, usedEnd, l.avail))).toBe(1n);
    // Avail ring before any region.
    expect(await fe.ack(P.VHOST_USER_SET_VRING_ADDR, vringAddr(0, l.desc, l.used, LOW.uva - 2))).toBe(1n);
    // Misaligned descriptor table.
    expect(await fe.ack(P.VHOST_USER_SET_VRING_ADDR, vringAddr(0, l.desc + 8, l.used, l.avail))).toBe(1n);
    expect(be.rings[0]!.addr).toBeNull();
    // Exactly at the end is fine.
    const usedLast = HIGH.uva + HIGH.size - (6 + 8 * QSIZE) - 2; // 4-aligned
    expect(await fe.ack(P.VHOST_USER_SET_VRING_ADDR, vringAddr(0, l.desc, usedLast, l.avail))).toBe(0n);
    expect(be.rings[0]!.addr!.used.offset + be.rings[0]!.addr!.used.bytes.length).toBe(HIGH.size - 2);
    expect(be.closed).toBe(false);
  });

  it('SET_VRING_ADDR outside the table without need_reply closes the connection', async () => {
    const { fe, be } = await mapped();
    const l = ringLayout(0);
    fe.send(P.VHOST_USER_SET_VRING_ADDR, vringAddr(0, 0x50000000, l.used, l.avail));
    await until('close', () => be.closed && fe.eof);
    expect(be.closeReason?.message).toMatch(/not inside the memory table/);
  });

  it('SET_CONFIG writes only writeback, and only with CONFIG_WCE', async () => {
    const path = join(dir, `s${sockN++}.sock`);
    const changes: boolean[] = [];
    const server = new VhostUserBlkServer(path, { length: EXPORT_LEN, hooks: { writeCacheChanged: (_b, on) => changes.push(on) } });
    servers.push(server);
    const { fe, be } = await connect(server, path);
    fe.send(P.VHOST_USER_SET_PROTOCOL_FEATURES, P.u64Payload(PROTOCOL_FEATURES));
    expect(be.writeCache).toBe(true);
    // Before CONFIG_WCE is negotiated writeback is read-only.
    expect(await fe.ack(P.VHOST_USER_SET_CONFIG, configReq(BLK_CFG_WCE, 1, 0, Uint8Array.of(0)))).toBe(1n);
    expect(await fe.ack(P.VHOST_USER_SET_FEATURES, P.u64Payload(P.bit(VIRTIO_BLK_F_CONFIG_WCE) | P.bit(VIRTIO_F_VERSION_1)))).toBe(0n);
    expect(await fe.ack(P.VHOST_USER_SET_CONFIG, configReq(BLK_CFG_WCE, 1, 0, Uint8Array.of(0)))).toBe(0n);
    expect(be.writeCache).toBe(false);
    expect(changes).toEqual([false]);
    // Capacity is read-only.
    expect(await fe.ack(P.VHOST_USER_SET_CONFIG, configReq(0, 8, 0, new Uint8Array(8)))).toBe(1n);
    expect(P.dataView(be.config).getBigUint64(0, true)).toBe(BigInt(Math.floor(EXPORT_LEN / 512)));
    // GET_CONFIG sees the change; a range past the config space is a zero-length (error) reply.
    const c = await fe.call(P.VHOST_USER_GET_CONFIG, configReq(BLK_CFG_WCE, 1));
    expect(c[P.CONFIG_HEADER]).toBe(0);
    expect((await fe.call(P.VHOST_USER_GET_CONFIG, configReq(BLK_CONFIG_SIZE - 4, 8))).length).toBe(0);
    expect(be.closed).toBe(false);
  });

  it('GET_CONFIG without the CONFIG protocol feature is a zero-length reply', async () => {
    const { server, path } = startServer(1);
    const { fe } = await connect(server, path);
    expect((await fe.call(P.VHOST_USER_GET_CONFIG, configReq(0, 60))).length).toBe(0);
  });
});

describe('framing and hostile input', () => {
  it('reassembles a message split across writes, and back-to-back messages in one write', async () => {
    const { server, path } = startServer(3);
    const { fe } = await connect(server, path);
    const m = P.encodeMessage(P.VHOST_USER_GET_QUEUE_NUM, P.VHOST_USER_VERSION);
    fe.sendRaw(m.subarray(0, 5));
    await sleep(10);
    fe.sendRaw(m.subarray(5));
    expect(P.dataView(await fe.reply(P.VHOST_USER_GET_QUEUE_NUM)).getBigUint64(0, true)).toBe(3n);
    const two = Buffer.concat([P.encodeMessage(P.VHOST_USER_GET_FEATURES, 1), P.encodeMessage(P.VHOST_USER_GET_PROTOCOL_FEATURES, 1)]);
    fe.sendRaw(two);
    expect(P.dataView(await fe.reply(P.VHOST_USER_GET_FEATURES)).getBigUint64(0, true)).toBe(blkFeatures(false));
    expect(P.dataView(await fe.reply(P.VHOST_USER_GET_PROTOCOL_FEATURES)).getBigUint64(0, true)).toBe(PROTOCOL_FEATURES);
  });

  const hostile: [string, (fe: FrontEnd) => void, RegExp][] = [
    ['a bad version', (fe) => fe.sendRaw(P.encodeMessage(P.VHOST_USER_GET_FEATURES, 2)), /bad version/],
    ['an oversized payload', (fe) => {
      const h = new Uint8Array(12);
      const dv = P.dataView(h);
      dv.setUint32(0, P.VHOST_USER_SET_MEM_TABLE, true);
      dv.setUint32(4, 1, true);
      dv.setUint32(8, 0x7fffffff, true);
      fe.sendRaw(h);
    }, /exceeds/],
    ['an unknown request', (fe) => fe.send(0xdead), /unsupported request/],
    ['garbage bytes', (fe) => fe.sendRaw(new Uint8Array(64).fill(0xff)), /bad version/],
    ['a short u64 payload', (fe) => fe.send(P.VHOST_USER_SET_FEATURES, new Uint8Array(4)), /need a u64/],
    ['unexpected fds', (fe) => {
      const e = eventfd();
      fe.send(P.VHOST_USER_SET_OWNER, undefined, [e]);
      closeFd(e);
    }, /unexpected fds/],
    ['a kick with two fds', (fe) => {
      const a = eventfd();
      const b = eventfd();
      fe.send(P.VHOST_USER_SET_VRING_KICK, P.u64Payload(0), [a, b]);
      closeFd(a);
      closeFd(b);
    }, /2 fds, expected 1/],
    ['a memory table with fewer fds than regions', (fe) => {
      const m = memfdCreate('x', 4096);
      fe.send(P.VHOST_USER_SET_MEM_TABLE, memTable([{ gpa: 0, size: 4096, uva: 0, off: 0 }, { gpa: 8192, size: 4096, uva: 8192, off: 0 }]), [m]);
      closeFd(m);
    }, /2 regions but 1 fds/],
    ['a memory region beyond 2^53', (fe) => {
      const m = memfdCreate('x', 4096);
      fe.send(P.VHOST_USER_SET_MEM_TABLE, memTable([{ gpa: 0, size: 4096, uva: 2 ** 60, off: 0 }]), [m]);
      closeFd(m);
    }, /beyond 2\^53/],
    ['a memory region past its fd\'s end (SIGBUS bait)', (fe) => {
      const m = memfdCreate('x', 4096);
      fe.send(P.VHOST_USER_SET_MEM_TABLE, memTable([{ gpa: 0, size: 8192, uva: 0, off: 0 }]), [m]);
      closeFd(m);
    }, /past the end of its fd/],
    ['nine fds', (fe) => {
      const fds = Array.from({ length: 9 }, () => eventfd());
      fe.send(P.VHOST_USER_SET_OWNER, undefined, fds);
      for (const fd of fds) closeFd(fd);
    }, /Message too long|more than 8 fds/],
  ];

  for (const [what, send, reason] of hostile) {
    it(`${what} closes only that connection, leaking nothing`, async () => {
      const { server, path } = startServer(1);
      const fds0 = fdCount();
      const maps0 = liveMappings();
      const { fe, be } = await connect(server, path);
      send(fe);
      await until('the back-end closing', () => be.closed);
      await until('EOF at the front-end', () => fe.eof);
      expect(be.closeReason?.message ?? '').toMatch(reason);
      fe.close();
      expect(fdCount()).toBe(fds0);
      expect(liveMappings()).toBe(maps0);
      // The server still serves a new front-end.
      const again = await connect(server, path);
      expect(await again.fe.u64(P.VHOST_USER_GET_QUEUE_NUM)).toBe(1n);
      expect(again.be).not.toBe(be);
    });
  }

  it('a second concurrent front-end is turned away; the first is undisturbed', async () => {
    const { server, path } = startServer(1);
    const { fe, be } = await connect(server, path);
    const other = FrontEnd.connect(path);
    frontEnds.push(other);
    await until('rejection', () => other.eof);
    expect(server.rejected).toBe(1);
    expect(server.session).toBe(be);
    expect(await fe.u64(P.VHOST_USER_GET_QUEUE_NUM)).toBe(1n);
  });
});

describe('teardown', () => {
  it('disconnect unmaps guest memory and closes every fd the back-end held', async () => {
    const { server, path } = startServer(2);
    const ram = guestRam(); // the front-end's own fds/mapping are counted in the baseline
    const fds0 = fdCount();
    const maps0 = liveMappings();
    const { fe, be } = await connect(server, path);
    const { kicks, calls } = await qemuStartup(fe, ram.fd, 2);
    const errFd = eventfd();
    expect(await fe.ack(P.VHOST_USER_SET_VRING_ERR, P.u64Payload(0), [errFd])).toBe(0n);
    closeFd(errFd);
    // The back-end holds 2 mappings (both regions in one layout; the inflight buffer) and
    // 2 kick + 2 call + 1 err fds (the region and inflight fds were closed). The front-end
    // keeps the inflight buffer: 1 fd, 1 mapping, beyond the baseline until the test ends.
    expect(liveMappings()).toBe(maps0 + 2 + 1);
    expect(fdCount()).toBe(fds0 + 2 /* sockets */ + 4 /* our kick/call */ + 1 /* our inflight */ + 5 /* back-end's */);
    const views = be.rings.map((r) => r.addr!.desc.bytes);
    fe.close();
    frontEnds.length = 0;
    for (const fd of [...kicks, ...calls]) closeFd(fd);
    toClose.splice(toClose.indexOf(kicks[0]!), 4);
    await until('the back-end closing', () => be.closed);
    expect(be.closeReason).toBeNull();
    expect(liveMappings()).toBe(maps0 + 1);
    expect(fdCount()).toBe(fds0 + 1);
    // Old views are detached, not dangling.
    for (const v of views) expect(v.length).toBe(0);
    expect(be.rings.every((r) => r.kickFd === -1 && r.callFd === -1 && r.errFd === -1 && r.addr === null)).toBe(true);
  });

  it('a new SET_MEM_TABLE replaces (and unmaps) the old one and re-translates rings', async () => {
    const { server, path } = startServer(1);
    const { fe, be } = await connect(server, path);
    const ram = guestRam();
    const maps0 = liveMappings();
    const fds0 = fdCount();
    fe.send(P.VHOST_USER_SET_PROTOCOL_FEATURES, P.u64Payload(PROTOCOL_FEATURES));
    expect(await fe.ack(P.VHOST_USER_SET_MEM_TABLE, memTable([LOW, HIGH]), [ram.fd, ram.fd])).toBe(0n);
    expect(await fe.ack(P.VHOST_USER_SET_VRING_NUM, P.vringStatePayload(0, QSIZE))).toBe(0n);
    const l = ringLayout(0);
    expect(await fe.ack(P.VHOST_USER_SET_VRING_ADDR, vringAddr(0, l.desc, l.used, l.avail))).toBe(0n);
    const oldDesc = be.rings[0]!.addr!.desc.bytes;
    expect(liveMappings()).toBe(maps0 + 1);
    // Hot-plug: a third region (its own memfd).
    const extra = memfdCreate('hotplug', MiB);
    expect(await fe.ack(P.VHOST_USER_SET_MEM_TABLE, memTable([LOW, HIGH, { gpa: 0x20000000, size: MiB, uva: 0x7f1000000000, off: 0 }]), [ram.fd, ram.fd, extra])).toBe(0n);
    closeFd(extra);
    expect(liveMappings()).toBe(maps0 + 1);
    expect(fdCount()).toBe(fds0);
    expect(oldDesc.length).toBe(0);
    const desc = be.rings[0]!.addr!.desc;
    expect(desc.bytes.length).toBe(16 * QSIZE);
    ram.view[2 * MiB + (l.desc - HIGH.uva)] = 0x5a;
    expect(desc.bytes[0]).toBe(0x5a);
    // A table that does not cover the ring any more drops its addresses.
    expect(await fe.ack(P.VHOST_USER_SET_MEM_TABLE, memTable([LOW]), [ram.fd])).toBe(0n);
    expect(be.rings[0]!.addr).toBeNull();
    expect(liveMappings()).toBe(maps0 + 1);
    // A refused table (overlapping regions) leaves the current one in place and leaks nothing.
    expect(await fe.ack(P.VHOST_USER_SET_MEM_TABLE, memTable([LOW, { ...HIGH, gpa: LOW.size - 4096 }]), [ram.fd, ram.fd])).toBe(1n);
    expect(liveMappings()).toBe(maps0 + 1);
    expect(fdCount()).toBe(fds0);
    expect(be.memory.regions.length).toBe(1);
  });

  it('replacing kick/call fds closes the old ones; the no-fd bit leaves none', async () => {
    const { server, path } = startServer(1);
    const { fe, be } = await connect(server, path);
    fe.send(P.VHOST_USER_SET_PROTOCOL_FEATURES, P.u64Payload(PROTOCOL_FEATURES));
    await fe.call(P.VHOST_USER_GET_FEATURES);
    const fds0 = fdCount();
    const a = eventfd();
    expect(await fe.ack(P.VHOST_USER_SET_VRING_CALL, P.u64Payload(0), [a])).toBe(0n);
    closeFd(a);
    expect(fdCount()).toBe(fds0 + 1);
    const b = eventfd();
    expect(await fe.ack(P.VHOST_USER_SET_VRING_CALL, P.u64Payload(0), [b])).toBe(0n);
    expect(fdCount()).toBe(fds0 + 2);
    eventfdWrite(be.rings[0]!.callFd);
    expect(eventfdRead(b)).toBe(1);
    closeFd(b);
    expect(await fe.ack(P.VHOST_USER_SET_VRING_CALL, P.u64Payload(P.VHOST_USER_VRING_NOFD_MASK))).toBe(0n);
    expect(be.rings[0]!.callFd).toBe(-1);
    expect(fdCount()).toBe(fds0);
    // No-fd bit with an fd attached is refused and the fd not kept.
    const c = eventfd();
    expect(await fe.ack(P.VHOST_USER_SET_VRING_KICK, P.u64Payload(P.VHOST_USER_VRING_NOFD_MASK), [c])).toBe(1n);
    closeFd(c);
    expect(fdCount()).toBe(fds0);
    expect(be.rings[0]!.started).toBe(false);
  });
});

describe('GuestMemoryTable', () => {
  let fd = -1;
  beforeAll(() => {
    fd = memfdCreate('table', 3 * 4096);
  });
  afterAll(() => closeFd(fd));

  it('translates strictly inside one region', () => {
    const t = GuestMemoryTable.map([
      { guestPhysAddr: 0x1000, size: 4096, userAddr: 0x10000, mmapOffset: 0 },
      { guestPhysAddr: 0x2000, size: 8192, userAddr: 0x20000, mmapOffset: 4096 },
    ], [fd, fd]);
    try {
      expect(t.gpa(0x1000, 4096)?.bytes.length).toBe(4096);
      expect(t.gpa(0x1000, 4097)).toBeNull(); // contiguous in gpa, but two regions: refused
      // Guest RAM joins adjacent regions and refuses holes, including the page before them.
      expect(t.ram!.contains(0x1000, 3 * 4096)).toBe(true);
      expect(t.ram!.contains(0xfff, 2)).toBe(false);
      expect(t.ram!.contains(0x3fff, 2)).toBe(false);
      expect(t.ram!.contains(0x4000, 0)).toBe(false);
      expect(t.ram!.bytes.length).toBe(0x4000);
      expect(t.gpa(0xfff, 1)).toBeNull();
      expect(t.gpa(0x3fff, 1)?.offset).toBe(0x1fff);
      expect(t.gpa(0x4000, 0)).toBeNull();
      expect(t.gpa(0x4000, 1)).toBeNull();
      expect(t.gpa(0x2000, -1)).toBeNull();
      expect(t.gpa(8192.5, 1)).toBeNull();
      expect(t.uva(0x20000 + 8191, 1)?.region).toBe(1);
      expect(t.uva(0x20000 + 8191, 2)).toBeNull();
      expect(t.uvaToGpa(0x20010)).toBe(0x2010);
      expect(t.uvaToGpa(0x30000)).toBeNull();
      // mmap offset honoured: region 1 starts at page 1 of the fd.
      t.uva(0x20000, 1)!.bytes[0] = 0x99;
      t.uva(0x10000 + 4095, 1)!.bytes[0] = 0x11;
      const all = new Uint8Array(mmapFd(fd, 3 * 4096));
      expect(all[4096]).toBe(0x99);
      expect(all[4095]).toBe(0x11);
      unmapFd(all.buffer as ArrayBuffer);
    } finally {
      t.close();
    }
    expect(t.gpa(0x1000, 1)).toBeNull();
  });

  it('refuses bad tables without leaving mappings', () => {
    const maps0 = liveMappings();
    const bad = (descs: Parameters<typeof GuestMemoryTable.map>[0], fds: number[]): unknown => {
      try {
        GuestMemoryTable.map(descs, fds).close();
      } catch (e) {
        return e;
      }
      throw new Error('expected a refusal');
    };
    const r = (g: number, s: number, u: number, o = 0) => ({ guestPhysAddr: g, size: s, userAddr: u, mmapOffset: o });
    expect(bad([r(0, 4096, 0), r(4095, 4096, 8192)], [fd, fd])).toBeInstanceOf(MemoryTableError);
    expect(bad([r(0, 4096, 0), r(8192, 4096, 4095)], [fd, fd])).toBeInstanceOf(MemoryTableError);
    expect(bad([r(0, 0, 0)], [fd])).toBeInstanceOf(MemoryTableError);
    expect(bad([r(Number.MAX_SAFE_INTEGER, 4096, 0)], [fd])).toBeInstanceOf(MemoryTableError);
    expect(bad([r(0, 4096, 0)], [])).toBeInstanceOf(MemoryTableError);
    expect(bad([r(2048, 4096, 0)], [fd])).toBeInstanceOf(MemoryTableError); // not page-aligned
    expect(String(bad([r(2 ** 40, 4096, 0)], [fd]))).toMatch(/above 1 TiB .* not supported/);
    // Second region's mmap fails (bad fd): the first is unmapped again.
    expect(bad([r(0, 4096, 0), r(8192, 4096, 8192)], [fd, 99999])).toMatchObject({ code: 'EBADF' });
    expect(liveMappings()).toBe(maps0);
  });
});
