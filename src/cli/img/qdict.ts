/**
 * QEMU prints `--output=json` objects in the iteration order of its QDict hash table, not
 * in the order fields were added: 512 buckets indexed by a TDB-style hash of the key,
 * each bucket a list with the newest entry first. Scripts and tests compare key order
 * (it is what people see), so Spindle reproduces it.
 */

const BUCKETS = 512;

function bucket(key: string): number {
  const bytes = Buffer.from(key, 'utf8');
  let v = Math.imul(0x238f13af, bytes.length) >>> 0;
  for (let i = 0; i < bytes.length; i++) v = (v + (bytes[i]! << ((i * 5) % 24))) >>> 0;
  return ((Math.imul(1103515243, v) + 12345) >>> 0) % BUCKETS;
}

/** A copy of `v` whose objects (at every depth) list their keys in QDict order. */
export function qdictOrder<T>(v: T): T {
  if (Array.isArray(v)) return v.map(qdictOrder) as T;
  if (typeof v !== 'object' || v === null) return v;
  const keys = Object.keys(v);
  const order = keys.map((k, i) => ({ k, i, b: bucket(k) }));
  // Same bucket: the later insertion comes first (list head insertion).
  order.sort((x, y) => x.b - y.b || y.i - x.i);
  const out: Record<string, unknown> = {};
  for (const { k } of order) out[k] = qdictOrder((v as Record<string, unknown>)[k]);
  return out as T;
}
