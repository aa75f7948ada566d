// The agent API's bodies, as the contract crate (crates/contract/src/{api,cluster,migration}.rs)
// serializes them. `crates/agent/tests/console.rs` checks these names against real answers.

export type VmState = "stopped" | "running" | "migrating" | "crashed";
export type Outcome = "running" | "succeeded" | "failed" | "cancelled";
export type Phase =
  | "connect"
  | "handshake"
  | "preflight"
  | "setup"
  | "precopy"
  | "pause"
  | "final-pages"
  | "device-state"
  | "ready"
  | "commit"
  | "resumed";

export const PHASES: Phase[] = [
  "connect",
  "handshake",
  "preflight",
  "setup",
  "precopy",
  "pause",
  "final-pages",
  "device-state",
  "ready",
  "commit",
  "resumed",
];

export interface NodeView {
  name: string;
  address: string;
  alive: boolean;
  schedulable: boolean;
  cpu_vendor: string;
  cpu_model: string;
  cpu_features: string[];
  cpu_limit: string | null;
  cores: number;
  memory_mib: number;
  cores_used: number;
  memory_used_mib: number;
  vms: number;
  storage: string[];
  networks: string[];
}

export interface DiskSpec {
  path: string;
  read_only?: boolean;
}
export interface NicSpec {
  network: string;
  mac?: string | null;
}
export interface VmSpec {
  name: string;
  vcpus: number;
  memory_mib: number;
  kernel: string;
  initrd?: string;
  cmdline: string;
  cpu_profile: string;
  disks: DiskSpec[];
  nics: NicSpec[];
}

export interface VmRecord {
  spec: VmSpec;
  owner: string;
  state: VmState;
  cpu_features: string[];
  migration: string | null;
  /** Set (the destination) while the migration's stream decides its commit. */
  handover_to?: string;
  last_error: string | null;
  updated_ms: number;
}

export interface MigrationParams {
  max_downtime_ms: number;
  streams: number;
  compression: "none" | "lz4" | "zstd";
  max_bandwidth_mibs: number | null;
  timeout_s: number | null;
}

export interface DowntimeBreakdown {
  final_memory_ms: number;
  state_ms: number;
  commit_ms: number;
  decision_ms: number;
  resume_ms: number;
}

export interface Summary {
  total_ms: number;
  downtime_ms: number;
  downtime: DowntimeBreakdown;
  passes: number;
  bytes_sent: number;
  pages_sent: number;
  data_pages: number;
  zero_pages: number;
  max_throttle_pct: number;
  streams: number;
  pass0_mibs: number;
}

export interface MigrationRecord {
  id: string;
  vm: string;
  from: string;
  to: string;
  started_ms: number;
  finished_ms: number | null;
  outcome: Outcome;
  phase: Phase;
  reason: string | null;
  summary: Summary | null;
  params: MigrationParams;
  settled_by: string | null;
}

export interface Progress {
  phase: Phase;
  pass: number;
  bytes_sent: number;
  pages_sent: number;
  zero_pages: number;
  remaining_pages: number;
  remaining_bytes: number;
  dirty_rate_mibs: number;
  bandwidth_mibs: number;
  expected_downtime_ms: number;
  throttle_pct: number;
  elapsed_s: number;
}

export interface WorkerStatus {
  pid: number;
  uptime_s: number;
  state: string;
}

export interface VmView {
  vm: VmRecord;
  version: number;
  worker: WorkerStatus | null;
  migrations: MigrationRecord[];
}

export type Blocker =
  | { kind: "same-node" }
  | { kind: "not-running"; state: VmState }
  | { kind: "down" }
  | { kind: "drained" }
  | { kind: "cpu-vendor"; here: string; there: string }
  | { kind: "cpu-features"; missing: string[] }
  | { kind: "cores"; free: number; need: number }
  | { kind: "memory"; free_mib: number; need_mib: number }
  | { kind: "storage"; path: string }
  | { kind: "network"; network: string };

export interface TargetVerdict {
  node: string;
  ok: boolean;
  blockers: Blocker[];
  reasons: string[];
  remedies: string[];
  warnings: string[];
}

export interface Targets {
  vm: string;
  from: string;
  targets: TargetVerdict[];
}

export interface MigrationStarted {
  migration: MigrationRecord;
  agent: string;
  dry_run: boolean;
}

export interface MigrationView {
  migration: MigrationRecord;
  progress: Progress | null;
  done: boolean;
}

export type MigrationEvent =
  | { event: "progress"; phase: Phase; progress: Progress }
  | { event: "done"; migration: MigrationRecord }
  | { event: "error"; error: string };

export interface SerialTail {
  vm: string;
  node: string;
  text: string;
  truncated: boolean;
}

export interface DrainItem {
  vm: string;
  ok: boolean;
  to: string | null;
  migration: string | null;
  note: string | null;
  error: string | null;
  summary: Summary | null;
}

export interface DrainReport {
  node: string;
  moved: number;
  failed: number;
  max_concurrent: number;
  concurrency_limit: number;
  vms: DrainItem[];
}
