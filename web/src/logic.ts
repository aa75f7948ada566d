// The console's logic, kept out of the components so that it is tested as pure functions
// (logic.test.ts).
import type { Phase, Progress, TargetVerdict, VmRecord } from "./types";
import { PHASES } from "./types";

/** Where each phase starts on the progress bar (percent); precopy fills 6-90 by memory. */
const PHASE_START: Record<Phase, number> = {
  connect: 0,
  handshake: 2,
  preflight: 3,
  setup: 4,
  precopy: 6,
  pause: 90,
  "final-pages": 92,
  "device-state": 95,
  ready: 97,
  commit: 98,
  resumed: 100,
};

/** An estimate of how far a migration is (percent), from its phase and live progress.
 * `memoryBytes` is the VM's memory size. Pre-copy counts memory not yet (re)sent, so a guest
 * that dirties memory makes this estimate fall: [`Meter`] keeps the bar from running back. */
export function estimate(phase: Phase, p: Progress | null, memoryBytes: number): number {
  if (phase !== "precopy" || !p || memoryBytes <= 0) return PHASE_START[phase];
  const left = Math.min(1, Math.max(0, p.remaining_bytes / memoryBytes));
  return PHASE_START.precopy + (PHASE_START.pause - PHASE_START.precopy) * (1 - left);
}

/** A progress bar that never runs backwards and never claims done before it is. */
export class Meter {
  value = 0;
  phase: Phase = "connect";
  update(phase: Phase, p: Progress | null, memoryBytes: number): number {
    // Phases only move forward; a stale event of an earlier phase does not move the bar.
    if (PHASES.indexOf(phase) >= PHASES.indexOf(this.phase)) this.phase = phase;
    const e = estimate(this.phase, p, memoryBytes);
    const cap = this.phase === "resumed" ? 100 : 99;
    this.value = Math.min(cap, Math.max(this.value, e));
    return this.value;
  }
  finish(succeeded: boolean): number {
    if (succeeded) this.value = 100;
    return this.value;
  }
}

/** Targets in the order the dialog shows them: those that can take the VM first, then by name. */
export function orderTargets(ts: TargetVerdict[]): TargetVerdict[] {
  return [...ts].sort((a, b) => Number(b.ok) - Number(a.ok) || a.node.localeCompare(b.node));
}

/** The CPU features a target lacks (empty: no CPU-feature refusal). */
export function missingFeatures(t: TargetVerdict): string[] {
  for (const b of t.blockers) if (b.kind === "cpu-features") return b.missing;
  return [];
}

/** The node the dialog preselects: the first that can take the VM, none if none can. */
export function defaultTarget(ts: TargetVerdict[]): string | null {
  return orderTargets(ts).find((t) => t.ok)?.node ?? null;
}

export function fmtBytes(n: number): string {
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) {
    n /= 1024;
    i++;
  }
  return `${n.toFixed(i === 0 ? 0 : 1)} ${u[i]}`;
}

export function fmtMs(ms: number | null | undefined): string {
  if (ms === null || ms === undefined) return "–";
  if (ms < 10) return `${ms.toFixed(2)} ms`;
  if (ms < 1000) return `${ms.toFixed(1)} ms`;
  return `${(ms / 1000).toFixed(2)} s`;
}

/** One line about a migration's state for the progress panel. */
export function describe(phase: Phase, p: Progress | null): string {
  if (!p || phase !== "precopy") return phase;
  return `precopy pass ${p.pass}: ${fmtBytes(p.remaining_bytes)} left, dirtying ${p.dirty_rate_mibs.toFixed(0)} MiB/s against ${p.bandwidth_mibs.toFixed(0)} MiB/s`;
}

/** MiB/s sent on the data streams between two progress reports. */
export function linkRate(a: Progress, b: Progress): number {
  const dt = b.elapsed_s - a.elapsed_s;
  if (dt <= 0 || b.bytes_sent < a.bytes_sent) return 0;
  return (b.bytes_sent - a.bytes_sent) / (1024 * 1024) / dt;
}

/** What the store says about a VM's migration in progress, or null when none is. */
export function migrationNote(vm: Pick<VmRecord, "migration" | "handover_to" | "owner">): string | null {
  if (!vm.migration) return null;
  const id = vm.migration;
  if (vm.handover_to) {
    return (
      `Migration ${id} from ${vm.owner} to ${vm.handover_to}: the commit is handed over to the ` +
      `migration stream; ${vm.handover_to} is recorded as the owner once the VM runs there.`
    );
  }
  return `Migration ${id} from ${vm.owner} in progress; the commit waits for the store.`;
}
