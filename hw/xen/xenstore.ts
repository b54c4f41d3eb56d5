/**
 * A simulated xenstore: a tree of slash-separated paths holding string values, with
 * read/write/mkdir/rm/directory and watches. A watch on P fires for a change of P or of
 * anything below it; events are queued and delivered one at a time after the change that
 * caused them (a watch callback may change the store again without re-entering itself).
 * Permissions and transactions are not modelled.
 */
import { HwError } from '../core/error.js';

/** XenbusState, the frontend/backend state machine values. */
export const XenbusState = {
  Unknown: 0,
  Initialising: 1,
  InitWait: 2,
  Initialised: 3,
  Connected: 4,
  Closing: 5,
  Closed: 6,
  Reconfiguring: 7,
  Reconfigured: 8,
} as const;
export type XenbusStateValue = (typeof XenbusState)[keyof typeof XenbusState];

export type WatchCallback = (path: string, token: string) => void;

interface XsNode {
  value: string;
  children: Map<string, XsNode>;
}

interface Watch {
  path: string;
  token: string;
  cb: WatchCallback;
  live: boolean;
}

/** Splits and checks a path: absolute, no empty parts, printable. */
function parts(path: string): string[] {
  if (typeof path !== 'string' || !path.startsWith('/') || path.length > 3072 || /[\0-\x1f]/.test(path)) {
    throw new HwError('EINVAL', `xenstore: invalid path '${String(path)}'`);
  }
  const p = path.split('/').filter(Boolean);
  if (path !== '/' && p.length !== path.split('/').length - 1 - (path.endsWith('/') ? 1 : 0)) {
    throw new HwError('EINVAL', `xenstore: invalid path '${path}' (empty component)`);
  }
  return p;
}

function join(p: string[]): string {
  return `/${p.join('/')}`;
}

export class XenStore {
  private readonly root: XsNode = { value: '', children: new Map() };
  private readonly watches: Watch[] = [];
  private readonly events: { w: Watch; path: string }[] = [];
  private delivering = false;
  /** Errors thrown by watch callbacks (kept for tests and debugging; never rethrown). */
  readonly watchErrors: unknown[] = [];

  private lookup(path: string): XsNode | undefined {
    let n: XsNode | undefined = this.root;
    for (const c of parts(path)) {
      n = n.children.get(c);
      if (!n) return undefined;
    }
    return n;
  }

  exists(path: string): boolean {
    return this.lookup(path) !== undefined;
  }

  /** The value at `path`, or undefined if there is no such node. */
  read(path: string): string | undefined {
    return this.lookup(path)?.value;
  }

  /** Writes `value`, creating missing parents (with empty values). */
  write(path: string, value: string): void {
    let n = this.root;
    for (const c of parts(path)) {
      let next = n.children.get(c);
      if (!next) {
        next = { value: '', children: new Map() };
        n.children.set(c, next);
      }
      n = next;
    }
    n.value = String(value);
    this.changed(path);
  }

  /** Creates the node (and parents) if missing; an existing node keeps its value. */
  mkdir(path: string): void {
    if (this.exists(path)) return;
    this.write(path, '');
  }

  /** Removes the node and everything under it; false if it was not there. */
  rm(path: string): boolean {
    const p = parts(path);
    if (p.length === 0) throw new HwError('EINVAL', 'xenstore: cannot remove the root');
    const parent = this.lookup(join(p.slice(0, -1)));
    if (!parent?.children.delete(p[p.length - 1]!)) return false;
    this.changed(path, true);
    return true;
  }

  /** Names of the children of `path` (undefined if no such node), in creation order. */
  directory(path: string): string[] | undefined {
    const n = this.lookup(path);
    return n ? [...n.children.keys()] : undefined;
  }

  /** Reads an unsigned integer key; undefined if missing or not a number. */
  readInt(path: string): number | undefined {
    const v = this.read(path);
    if (v === undefined || !/^\s*\d+\s*$/.test(v)) return undefined;
    return Number(v);
  }

  /** Registers a watch; it fires once at once (as Xen's does), then on each change at or below `path`. Returns the unwatch. */
  watch(path: string, token: string, cb: WatchCallback): () => void {
    parts(path);
    const w: Watch = { path: path.replace(/\/+$/, '') || '/', token, cb, live: true };
    this.watches.push(w);
    this.events.push({ w, path: w.path });
    this.deliver();
    return () => {
      w.live = false;
      const i = this.watches.indexOf(w);
      if (i >= 0) this.watches.splice(i, 1);
    };
  }

  /** Queues the watches at or above `path` (and, for a removal, those below it: they went too). */
  private changed(path: string, removed = false): void {
    const p = path.replace(/\/+$/, '') || '/';
    for (const w of this.watches) {
      if (w.path === '/' || p === w.path || p.startsWith(`${w.path}/`)) this.events.push({ w, path: p });
      else if (removed && w.path.startsWith(`${p}/`)) this.events.push({ w, path: w.path });
    }
    this.deliver();
  }

  private deliver(): void {
    if (this.delivering) return;
    this.delivering = true;
    try {
      for (let e = this.events.shift(); e; e = this.events.shift()) {
        if (!e.w.live) continue;
        try {
          e.w.cb(e.path, e.w.token);
        } catch (err) {
          // A watcher's bug must not break the writer (often a guest's port access).
          this.watchErrors.push(err);
        }
      }
    } finally {
      this.delivering = false;
    }
  }
}
