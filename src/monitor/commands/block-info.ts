/**
 * What query-block and query-named-block-nodes say, in QEMU's shapes (qapi/block-core.json):
 *
 *   BlockInfo (a backend) ──inserted──> BlockDeviceInfo (its root node) ──image──> ImageInfo
 *                                                                       └─backing-image─> ImageInfo ...
 *
 * ImageInfo is built from the open node (as QEMU's bdrv_query_image_info does), with the
 * field names and values of `qemu-img info --output=json`; keys are in QDict order like the
 * CLI's. Nothing here reads a driver's private state: formats speak through their `info`
 * hook, and the rest comes from the node and its child list.
 *
 * Context: main loop.
 */
import { liveBackends, type BlockBackend } from '../../backend/backend.js';
import type { BlockNode } from '../../block/node.js';
import { combinePath } from '../../cli/img/qcow2-info.js';
import { qdictOrder } from '../../cli/img/qdict.js';
import { throttleLimits } from './throttle.js';
import { qdevOf } from './qdev.js';

/** QEMU's bs->filename: a protocol node's own name, else its data child's. */
export function nodeFilename(node: BlockNode): string {
  for (let n: BlockNode | undefined = node; n; n = n.primary?.node ?? n.file?.node) {
    const f = n.options['filename'];
    if (typeof f === 'string') return f;
    if (n.driver.format === 'null-co') return 'null-co://';
    if (n.driver.protocol) return '';
  }
  return '';
}

/** Host bytes allocated: the first node down the primary chain whose driver knows. */
function actualSize(node: BlockNode): number | undefined {
  for (let n: BlockNode | undefined = node; n; n = n.primary?.node) {
    if (n.driver.allocatedSize) return n.driver.allocatedSize(n);
  }
  return undefined;
}

/** How many backing files are below `node`. */
function backingDepth(node: BlockNode): number {
  let depth = 0;
  for (let n = node.backing?.node; n; n = n.backing?.node) depth++;
  return depth;
}

/** ImageInfo of an open node; unless `flat`, the backing chain nests as `backing-image`. */
export function imageInfo(node: BlockNode, flat: boolean): Record<string, unknown> {
  const filename = nodeFilename(node);
  const info: Record<string, unknown> = {
    'virtual-size': node.length,
    filename,
    format: node.driver.format,
  };
  const actual = actualSize(node);
  if (actual !== undefined) info['actual-size'] = actual;
  if (!node.driver.protocol) {
    info['dirty-flag'] = false;
    Object.assign(info, node.driver.info?.(node));
  }
  const recorded = typeof info['backing-filename'] === 'string' ? (info['backing-filename'] as string) : undefined;
  const backing = recorded ?? (node.backing ? nodeFilename(node.backing.node) : undefined);
  if (backing !== undefined) {
    info['backing-filename'] = backing;
    // As qemu-img resolves it: a recorded name against the image's directory.
    info['full-backing-filename'] = recorded !== undefined ? combinePath(filename, recorded) : backing;
    if (info['backing-filename-format'] === undefined && node.backing) info['backing-filename-format'] = node.backing.node.driver.format;
    if (!flat && node.backing) info['backing-image'] = imageInfo(node.backing.node, false);
  }
  return info;
}

/**
 * I/O throttling as query-block reports it. Zero until throttling is wired in; the monitor
 * fills the real limits here (bps_max and friends appear only when a limit is set).
 */
/** The backend's I/O limits as query-block shows them (the six rates always; the rest when set). */
function throttleFields(be: BlockBackend | null): Record<string, number | string> {
  return be ? throttleLimits(be) : { bps: 0, bps_rd: 0, bps_wr: 0, iops: 0, iops_rd: 0, iops_wr: 0 };
}

/** BlockDeviceInfo of `node`, seen through `be` (query-block) or alone (query-named-block-nodes). */
export function blockDeviceInfo(node: BlockNode, be: BlockBackend | null, flat: boolean): Record<string, unknown> {
  const image = imageInfo(node, flat);
  const info: Record<string, unknown> = {
    file: nodeFilename(node),
    'node-name': node.name,
    ro: node.readOnly,
    drv: node.driver.format,
  };
  const backing = image['backing-filename'];
  if (typeof backing === 'string') info['backing_file'] = backing;
  Object.assign(info, {
    backing_file_depth: backingDepth(node),
    encrypted: image['encrypted'] === true,
    detect_zeroes: node.detectZeroes,
    ...throttleFields(be),
    image,
    write_threshold: 0,
    cache: {
      writeback: be ? be.writeCache : true,
      direct: node.options.cache?.direct === true,
      'no-flush': node.options.cache?.['no-flush'] === true,
    },
  });
  return qdictOrder(info);
}

/**
 * The backends query-block lists, in creation order: every named one, and anonymous ones a
 * device holds (QEMU lists those with device ""), e.g. after drive_del.
 */
export function listedBackends(): BlockBackend[] {
  return liveBackends().filter((b) => b.visible || b.device !== null);
}

/**
 * BlockInfo of a backend. A backend without a device counts as removable (QEMU's
 * blk_dev_has_removable_media); with one, a device that has a tray is removable.
 */
export function blockInfo(be: BlockBackend): Record<string, unknown> {
  const ops = be.ops;
  const hasTray = ops?.isTrayOpen !== undefined;
  const info: Record<string, unknown> = { device: be.visible ? be.name : '' };
  const qdev = qdevOf(be);
  if (qdev) info['qdev'] = qdev;
  info['type'] = 'unknown';
  info['removable'] = be.device === null || hasTray;
  info['locked'] = ops?.isMediumLocked?.() ?? false;
  const node = be.node;
  if (node) info['inserted'] = blockDeviceInfo(node, be, false);
  if (hasTray) info['tray_open'] = ops!.isTrayOpen!();
  // QEMU reports io-status when the device enabled it and the error policy can stop or
  // report ENOSPC (blk_iostatus_is_enabled).
  if (be.device && (be.werror === 'enospc' || be.werror === 'stop' || be.rerror === 'stop')) info['io-status'] = be.iostatus;
  return qdictOrder(info);
}
