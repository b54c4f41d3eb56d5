/**
 * Throttle groups: QEMU's block/throttle-groups.c. Backends in one group share one throttle
 * state (the limits and bucket levels) and take turns through a round-robin token.
 *
 * Context: any AioContext for `intercept` (the I/O path); main loop for register/unregister
 * and configuration.
 *
 *   request ─intercept─> must wait, or this member has queued requests? ──yes──> queue[dir]
 *                              │ no                                         (FIFO, per member)
 *                              v                                                   │
 *   account, schedule next ─> go (caller dispatches)     timer[dir] fires ─> release one ┘
 *
 * Where requests wait: each member keeps two FIFO queues (reads, writes) of the caller's own
 * request objects — nothing is allocated per request. At most one timer per direction is
 * armed in a whole group (`anyTimerArmed`), on the member whose turn it is (`tokens`). When a
 * timer fires, that member's oldest request goes; after it is accounted, the next member in
 * round-robin order with queued requests gets the token and either its own timer, or (if no
 * wait is due) the releasing member's next request goes at once, as QEMU does.
 *
 * A member in a drained section (`disabled` > 0) is not limited: drained_begin releases its
 * queued requests at once, so the drain can finish (QEMU's io_limits_disabled).
 */
import { assertMainLoop } from '../block/context.js';
import { withDrained } from '../block/drain.js';
import type { BlockNode } from '../block/node.js';
import { releaseThrottled } from './io.js';
import { account, clock, computeWait, copyConfig, Dir, newConfig, type ThrottleConfig, type ThrottleState } from './throttle.js';

/** What a throttled request must expose: its size. The queues hold the caller's objects. */
export interface Throttled {
  readonly bytes: number;
}

/** A FIFO of request objects without per-push allocation in the steady state. */
class Fifo<T> {
  private items: (T | null)[] = [];
  private head = 0;
  get length(): number {
    return this.items.length - this.head;
  }
  push(x: T): void {
    this.items.push(x);
  }
  shift(): T | null {
    if (this.head >= this.items.length) return null;
    const x = this.items[this.head]!;
    this.items[this.head++] = null;
    if (this.head === this.items.length) {
      this.items.length = 0;
      this.head = 0;
    }
    return x;
  }
}

export class ThrottleGroup {
  readonly state: ThrottleState;
  readonly members: ThrottleGroupMember[] = [];
  /** Whose turn it is, per direction. */
  readonly tokens: (ThrottleGroupMember | null)[] = [null, null];
  /** Whether a timer is armed on some member, per direction. */
  readonly anyTimerArmed = [false, false];
  constructor(readonly name: string) {
    this.state = { cfg: newConfig(), previousLeak: clock.now() };
  }
}

const groups = new Map<string, ThrottleGroup>();

/** The group named `name`, if some member uses it. */
export function findThrottleGroup(name: string): ThrottleGroup | undefined {
  return groups.get(name);
}

/** One backend's membership: its queues and timers (QEMU's ThrottleGroupMember). */
export class ThrottleGroupMember {
  group: ThrottleGroup;
  /** Requests waiting, per direction (reads, writes). */
  readonly queues: [Fifo<Throttled>, Fifo<Throttled>] = [new Fifo<Throttled>(), new Fifo<Throttled>()];
  /** Drained sections in progress: while > 0 the limits are not applied. */
  disabled: number;
  readonly #timers: unknown[] = [null, null];
  /** Timer callbacks, bound once. */
  readonly #fire: (() => void)[] = [() => this.#timerCb(Dir.READ), () => this.#timerCb(Dir.WRITE)];

  /**
   * Joins the group `name` (created with no limits if new). `release` issues a request the
   * throttle let go. `disabled` starts at the backend's drain depth.
   */
  constructor(name: string, readonly release: (r: Throttled) => void, disabled: number) {
    this.disabled = disabled;
    let g = groups.get(name);
    if (!g) groups.set(name, (g = new ThrottleGroup(name)));
    this.group = g;
    g.members.push(this);
    for (let d = 0; d < 2; d++) g.tokens[d] ??= this;
  }

  /** The group's limits (shared by every member). */
  get config(): ThrottleConfig {
    return this.group.state.cfg;
  }

  /**
   * QEMU's throttle_group_co_io_limits_intercept: true if `r` was queued (the throttle will
   * release it), false if it may go now (it has been accounted). Context: any AioContext.
   */
  intercept(r: Throttled, write: boolean): boolean {
    const dir = write ? Dir.WRITE : Dir.READ;
    const token = nextToken(this, dir);
    const mustWait = scheduleTimer(token, dir);
    const q = this.queues[dir];
    if (mustWait || q.length > 0) {
      q.push(r);
      return true;
    }
    account(this.group.state, dir, r.bytes);
    scheduleNext(this, dir, false);
    return false;
  }

  /** Arms this member's timer for `dir` in `delayNs`. */
  arm(dir: Dir, delayNs: number): void {
    this.#timers[dir] = clock.schedule(this.#fire[dir]!, delayNs);
  }

  timerPending(dir: Dir): boolean {
    return this.#timers[dir] !== null;
  }

  #timerCb(dir: Dir): void {
    this.#timers[dir] = null;
    this.group.anyTimerArmed[dir] = false;
    restartQueue(this, dir);
  }

  /**
   * throttle_group_restart_tgm: a pending timer fires now, else the oldest request of each
   * direction goes (after a configuration change, and when a drained section begins).
   */
  restart(): void {
    for (const dir of [Dir.READ, Dir.WRITE]) {
      const t = this.#timers[dir];
      if (t !== null) {
        clock.cancel(t);
        this.#timerCb(dir);
      } else restartQueue(this, dir);
    }
  }

  /** blk_root_drained_begin's part: the limits stop applying and the queues empty at once. */
  drainedBegin(): void {
    if (this.disabled++ === 0) this.restart();
  }
  drainedEnd(): void {
    this.disabled--;
  }

  /** Requests waiting in both directions. */
  get pending(): number {
    return this.queues[0].length + this.queues[1].length;
  }

  /**
   * Leaves the group (the group goes with its last member). The queues must be empty (the
   * caller drained the backend first, as QEMU does). Context: main loop.
   */
  unregister(): void {
    const g = this.group;
        // Anything still queued goes unthrottled rather than being lost.
    this.disabled++;
    this.restart();
    this.disabled--;
    const i = g.members.indexOf(this);
    for (let d = 0; d < 2; d++) {
      if (g.tokens[d] === this) g.tokens[d] = g.members.length > 1 ? g.members[(i + 1) % g.members.length]! : null;
      const t = this.#timers[d];
      if (t !== null) {
        clock.cancel(t);
        this.#timers[d] = null;
        g.anyTimerArmed[d] = false;
      }
    }
    g.members.splice(i, 1);
    if (g.members.length === 0 && groups.get(g.name) === g) groups.delete(g.name);
  }
}

type Member = ThrottleGroupMember;

function nextMember(m: Member): Member {
  const ms = m.group.members;
  return ms[(ms.indexOf(m) + 1) % ms.length]!;
}

/** next_throttle_token: the next member in round-robin order with requests queued, else `m`. */
function nextToken(m: Member, dir: Dir): Member {
  if (m.disabled > 0 && m.queues[dir].length > 0) return m;
  const g = m.group;
  const start = g.tokens[dir] ?? m;
  let token = nextMember(start);
  while (token !== start && token.queues[dir].length === 0) token = nextMember(token);
  if (token === start && token.queues[dir].length === 0) token = m;
  return token;
}

/** throttle_group_schedule_timer: whether `m`'s request must wait; arms its timer if so. */
function scheduleTimer(m: Member, dir: Dir): boolean {
  if (m.disabled > 0) return false;
  const g = m.group;
  if (g.anyTimerArmed[dir]) return true;
  const wait = computeWait(g.state, dir, clock.now());
  if (wait === 0) return false;
  if (!m.timerPending(dir)) m.arm(dir, wait);
  g.tokens[dir] = m;
  g.anyTimerArmed[dir] = true;
  return true;
}

/**
 * schedule_next_request: after a request of `m` went, the next member with queued requests
 * either gets a timer, or (no wait due) requests go at once: `m`'s own first when a released
 * request is scheduling (QEMU's "preference to requests from the current tgm"), returned as
 * true so the caller releases it; else the token's timer fires at once.
 */
function scheduleNext(m: Member, dir: Dir, releasing: boolean): boolean {
  const g = m.group;
  const token = nextToken(m, dir);
  if (token.queues[dir].length === 0) return false;
  if (scheduleTimer(token, dir)) return false;
  if (releasing && m.queues[dir].length > 0) {
    g.tokens[dir] = m;
    return true;
  }
  token.arm(dir, 0);
  g.anyTimerArmed[dir] = true;
  g.tokens[dir] = token;
  return false;
}

/**
 * throttle_group_restart_queue: `m`'s oldest request goes (accounted, not checked again:
 * its wait is over), then the next is scheduled; a loop where QEMU's coroutines chain.
 */
function restartQueue(m: Member, dir: Dir): void {
  const q = m.queues[dir];
  let r = q.shift();
  if (r === null) {
    scheduleNext(m, dir, false);
    return;
  }
  while (r !== null) {
    account(m.group.state, dir, r.bytes);
    const more = scheduleNext(m, dir, true);
    m.release(r);
    r = more ? q.shift() : null;
  }
}

/**
 * throttle_group_config: new limits for the member's whole group (levels start empty), then
 * the member's queues restart. Context: main loop.
 */
export function configureGroup(m: ThrottleGroupMember, cfg: ThrottleConfig): void {
  const st = m.group.state;
  st.cfg = copyConfig(cfg);
  st.previousLeak = clock.now();
  m.restart();
}

// ---- The backend's side (QEMU's blk_io_limits_*): main loop. ----

/** What the glue below needs of a backend (BlockBackend has it). */
export interface ThrottleHost {
  throttle: ThrottleGroupMember | null;
  readonly quiesce: number;
  readonly root: { readonly node: BlockNode } | null;
}

/** blk_io_limits_enable: the backend joins `group`. Context: main loop. */
export function ioLimitsEnable(be: ThrottleHost, group: string): void {
  assertMainLoop('blk_io_limits_enable');
  if (be.throttle) throw new Error('I/O limits already enabled');
  be.throttle = new ThrottleGroupMember(group, releaseThrottled, be.quiesce);
}

/**
 * blk_io_limits_disable: drained (so every throttled request has gone to the medium), the
 * backend leaves its group. Context: main loop.
 */
export async function ioLimitsDisable(be: ThrottleHost): Promise<void> {
  assertMainLoop('blk_io_limits_disable');
  const m = be.throttle;
  if (!m) return;
  const leave = (): void => {
    if (be.throttle !== m) return;
    m.unregister();
    be.throttle = null;
  };
  if (be.root) await withDrained([be.root.node], leave);
  else leave();
}

/** blk_io_limits_update_group: moves a throttled backend to `group`. Context: main loop. */
export async function ioLimitsUpdateGroup(be: ThrottleHost, group: string): Promise<void> {
  if (!be.throttle || be.throttle.group.name === group) return;
  await ioLimitsDisable(be);
  ioLimitsEnable(be, group);
}
