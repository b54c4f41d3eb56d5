/**
 * The driver registry: every driver is one const table, registered here.
 */
import { BlockError } from '../error.js';
import type { BlockDriver } from '../types.js';
import { blkdebugDriver } from './blkdebug.js';
import { fileDriver } from './file.js';
import { nullDriver } from './null.js';
import { qcow2Driver } from './qcow2/driver.js';
import { rawDriver } from './raw.js';

const drivers = new Map<string, BlockDriver>();

export function registerDriver(drv: BlockDriver): void {
  if (drivers.has(drv.format)) throw new Error(`driver '${drv.format}' registered twice`);
  drivers.set(drv.format, drv);
}

export function getDriver(name: string): BlockDriver {
  const d = drivers.get(name);
  if (!d) throw new BlockError('EINVAL', `Unknown driver '${name}' (known: ${[...drivers.keys()].sort().join(', ')})`);
  return d;
}

export function driverNames(): string[] {
  return [...drivers.keys()].sort();
}

for (const d of [fileDriver, rawDriver, nullDriver, blkdebugDriver, qcow2Driver]) registerDriver(d);
