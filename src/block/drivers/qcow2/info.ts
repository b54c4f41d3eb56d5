/**
 * The qcow2 part of `img info`: the `format-specific` object of `qemu-img info --output=json`,
 * from the header alone. Keys and their presence follow qemu-img 7.2: version 2 images
 * report only compat, compression type and refcount width; version 3 adds the feature bits.
 */
import { AUTOCLEAR, COMPAT, EXT_DATA_FILE, INCOMPAT, type Qcow2Header } from './format.js';

const COMPRESSION_TYPES = ['zlib', 'zstd'];

export function qcow2FormatSpecific(h: Qcow2Header): Record<string, unknown> {
  const compressionType = COMPRESSION_TYPES[h.compressionType] ?? `unknown(${h.compressionType})`;
  if (h.version === 2) {
    return { type: 'qcow2', data: { compat: '0.10', 'compression-type': compressionType, 'refcount-bits': 16 } };
  }
  const data: Record<string, unknown> = {
    compat: '1.1',
    'compression-type': compressionType,
    'lazy-refcounts': (h.compatible & COMPAT.LAZY_REFCOUNTS) !== 0n,
    'refcount-bits': 2 ** h.refcountOrder,
    corrupt: (h.incompatible & INCOMPAT.CORRUPT) !== 0n,
    'extended-l2': (h.incompatible & INCOMPAT.EXTL2) !== 0n,
  };
  const dataFile = h.extensions.find((e) => e.type === EXT_DATA_FILE);
  if (dataFile) data['data-file'] = dataFile.data.toString('utf8');
  if (h.incompatible & INCOMPAT.DATA_FILE) data['data-file-raw'] = (h.autoclear & AUTOCLEAR.DATA_FILE_RAW) !== 0n;
  return { type: 'qcow2', data };
}
