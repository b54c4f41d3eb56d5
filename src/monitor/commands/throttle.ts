/**
 * QMP's I/O limits and statistics, as QEMU words them: `block_set_io_throttle` (limits of a
 * backend and its throttle group; all zero removes them) and `query-blockstats` (each
 * backend's counters, and its nodes'). `throttleLimits` gives query-block the limits it shows.
 *
 * Context: main loop.
 */
import { liveBackends, findBackend, type BlockBackend } from '../../backend/backend.js';
import { nodeStats } from '../../backend/stats.js';
import { checkConfig, newConfig, throttleEnabled, Bucket } from '../../backend/throttle.js';
import { configureGroup, ioLimitsDisable, ioLimitsEnable, ioLimitsUpdateGroup } from '../../backend/throttle-group.js';
import { allNodes } from '../../block/graph.js';
import type { BlockNode } from '../../block/node.js';
import { ChildRole } from '../../block/types.js';
import { defineCommand, QmpError, type QmpMonitor } from '../qmp.js';
import { qdevOf } from './qdev.js';

const int = (doc: string) => ({ type: 'int', doc }) as const;
const opt = (doc: string) => ({ type: 'int', optional: true, doc }) as const;

/** QEMU's BlockIOThrottle. */
const THROTTLE_ARGS = {
  device: { type: 'str', optional: true, doc: 'the block device name (deprecated in QEMU; use id)' },
  id: { type: 'str', optional: true, doc: "the device's id" },
  bps: int('total throughput limit in bytes per second'),
  bps_rd: int('read throughput limit in bytes per second'),
  bps_wr: int('write throughput limit in bytes per second'),
  iops: int('total I/O operations per second'),
  iops_rd: int('read I/O operations per second'),
  iops_wr: int('write I/O operations per second'),
  bps_max: opt('total throughput limit during bursts, in bytes'),
  bps_rd_max: opt('read throughput limit during bursts, in bytes'),
  bps_wr_max: opt('write throughput limit during bursts, in bytes'),
  iops_max: opt('total I/O operations per second during bursts'),
  iops_rd_max: opt('read I/O operations per second during bursts'),
  iops_wr_max: opt('write I/O operations per second during bursts'),
  bps_max_length: opt('maximum length of the bps_max burst period, in seconds'),
  bps_rd_max_length: opt('maximum length of the bps_rd_max burst period, in seconds'),
  bps_wr_max_length: opt('maximum length of the bps_wr_max burst period, in seconds'),
  iops_max_length: opt('maximum length of the iops_max burst period, in seconds'),
  iops_rd_max_length: opt('maximum length of the iops_rd_max burst period, in seconds'),
  iops_wr_max_length: opt('maximum length of the iops_wr_max burst period, in seconds'),
  iops_size: opt('an I/O size in bytes; larger requests count as several operations'),
  group: { type: 'str', optional: true, doc: 'throttle group name' },
} as const;

/** Bucket order, and the argument names of each bucket's limit. */
const NAMES: readonly [Bucket, string][] = [
  [Bucket.BPS_TOTAL, 'bps'], [Bucket.BPS_READ, 'bps_rd'], [Bucket.BPS_WRITE, 'bps_wr'],
  [Bucket.OPS_TOTAL, 'iops'], [Bucket.OPS_READ, 'iops_rd'], [Bucket.OPS_WRITE, 'iops_wr'],
];

/** qmp_get_blk: the backend named by `device`, or the one the device `id` uses. */
function lookup(device: string | undefined, id: string | undefined): BlockBackend {
  if ((device === undefined) === (id === undefined)) throw new QmpError('GenericError', "Need exactly one of 'device' and 'id'");
  const be = device !== undefined ? findBackend(device) : liveBackends().find((b) => b.device?.id === id);
  if (!be) throw new QmpError('DeviceNotFound', `Device '${device ?? id}' not found`);
  return be;
}

/**
 * The I/O limits query-block shows in `inserted` (QEMU's BlockDeviceInfo): the six rates
 * (0 when not throttled), the burst rates and lengths that are set, iops_size if set, and the
 * group. Context: main loop.
 */
export function throttleLimits(be: BlockBackend): Record<string, number | string> {
  const out: Record<string, number | string> = {};
  const m = be.throttle;
  for (const [, name] of NAMES) out[name] = 0;
  if (!m) return out;
  const cfg = m.config;
  for (const [b, name] of NAMES) {
    const k = cfg.buckets[b]!;
    out[name] = k.avg;
    if (k.max) {
      out[`${name}_max`] = k.max;
      out[`${name}_max_length`] = k.burstLength;
    }
  }
  if (cfg.opSize) out['iops_size'] = cfg.opSize;
  out['group'] = m.group.name;
  return out;
}

/** bdrv_query_bds_stats for a node: zeroed counters, its data child, and (backend level) its backing. */
function nodeEntry(n: BlockNode, blkLevel: boolean): Record<string, unknown> {
  const s: Record<string, unknown> = { 'node-name': n.name, stats: nodeStats() };
  let child = n.primary;
  if (!child || !(child.role & (ChildRole.DATA | ChildRole.FILTERED))) child = n.children.find((c) => (c.role & (ChildRole.DATA | ChildRole.FILTERED)) !== 0);
  if (child) s['parent'] = nodeEntry(child.node, blkLevel);
  const backing = n.backing;
  if (blkLevel && backing) s['backing'] = nodeEntry(backing.node, blkLevel);
  return s;
}

function backendEntry(be: BlockBackend): Record<string, unknown> {
  const root = be.root?.node;
  const s: Record<string, unknown> = { device: be.name };
  const qdev = qdevOf(be);
  if (qdev) s['qdev'] = qdev;
  if (root) {
    const n = nodeEntry(root, true);
    s['node-name'] = n['node-name'];
    if (n['parent']) s['parent'] = n['parent'];
    if (n['backing']) s['backing'] = n['backing'];
  }
  s['stats'] = be.stats.toQmp();
  return s;
}

export function registerThrottleCommands(monitor: QmpMonitor): void {
  monitor.register(defineCommand({
    name: 'block_set_io_throttle',
    doc: "Changes a block device's I/O limits (all zero: no limits) and throttle group",
    args: THROTTLE_ARGS,
    run: async (a) => {
      const be = lookup(a.device, a.id);
      if (!be.root) throw new QmpError('GenericError', 'Device has no medium');
      const cfg = newConfig();
      const args = a as unknown as Record<string, number | undefined>;
      for (const [b, name] of NAMES) {
        const k = cfg.buckets[b]!;
        k.avg = args[name]!;
        k.max = args[`${name}_max`] ?? 0;
        k.burstLength = args[`${name}_max_length`] ?? 1;
      }
      // QEMU stores iops_size unsigned: a negative value is a huge size.
      if (a.iops_size !== undefined) cfg.opSize = a.iops_size < 0 ? 2 ** 64 + a.iops_size : a.iops_size;
      const err = checkConfig(cfg);
      if (err) throw new QmpError('GenericError', err);
      if (throttleEnabled(cfg)) {
        if (!be.throttle) ioLimitsEnable(be, a.group ?? a.device ?? a.id!);
        else if (a.group !== undefined) await ioLimitsUpdateGroup(be, a.group);
        configureGroup(be.throttle!, cfg);
      } else if (be.throttle) {
        await ioLimitsDisable(be);
      }
      return {};
    },
  }));
  monitor.register(defineCommand({
    name: 'query-blockstats',
    doc: "Every block device's I/O statistics (or every node's, with query-nodes)",
    args: { 'query-nodes': { type: 'bool', optional: true, doc: 'list named nodes instead of block devices' } },
    run: (a) => {
      if (a['query-nodes']) return allNodes().map((n) => nodeEntry(n, false));
      return liveBackends().filter((b) => !b.dead && (b.name !== '' || b.device !== null)).map(backendEntry);
    },
  }));
}
