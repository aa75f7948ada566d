import { useState } from "preact/hooks";
import { errorText, del, post } from "./api";
import { fmtBytes, fmtMs } from "./logic";
import { MigrateDialog } from "./migrate";
import type { Action, Snapshot } from "./main";
import type { DrainReport, MigrationRecord, NodeView, VmRecord } from "./types";

export interface ViewProps {
  snap: Snapshot;
  log: (text: string, ok?: boolean) => void;
  refresh: () => Promise<void>;
}


function nodeState(n: NodeView): string {
  if (!n.alive) return "down";
  if (!n.schedulable) return "drained";
  return "alive";
}

export function ClusterView({ snap, log, refresh }: ViewProps) {
  const [busy, setBusy] = useState<string | null>(null);
  const [report, setReport] = useState<string | null>(null);
  const act = async (n: NodeView, what: "drain" | "undrain") => {
    setBusy(n.name);
    setReport(null);
    try {
      if (what === "drain") {
        const r = await post<DrainReport>(`/v1/nodes/${n.name}/drain`, {});
        const text = `drained ${n.name}: ${r.moved} moved, ${r.failed} failed${r.vms
          .filter((v) => !v.ok && v.error)
          .map((v) => `; ${v.vm}: ${v.error}`)
          .join("")}`;
        setReport(text);
        log(text, r.failed === 0);
      } else {
        await post(`/v1/nodes/${n.name}/undrain`, {});
        log(`undrained ${n.name}`);
      }
    } catch (e) {
      setReport(`${what} ${n.name}: ${errorText(e)}`);
      log(`${what} ${n.name}: ${errorText(e)}`, false);
    } finally {
      setBusy(null);
      refresh();
    }
  };
  return (
    <section>
      <h2>Nodes</h2>
      {report && (
        <p class="note" data-testid="drain-report">
          {report}
        </p>
      )}
      <table data-testid="nodes">
        <thead>
          <tr>
            <th>Node</th>
            <th>State</th>
            <th>CPU</th>
            <th>CPU profile offered</th>
            <th>CPU features</th>
            <th>vCPUs used / total</th>
            <th>Memory used / free</th>
            <th>VMs</th>
            <th />
          </tr>
        </thead>
        <tbody>
          {snap.nodes.map((n) => (
            <tr key={n.name} data-testid={`node-${n.name}`}>
              <td>{n.name}</td>
              <td>
                <span class={`badge ${nodeState(n)}`} data-testid="node-state">
                  {nodeState(n)}
                </span>
              </td>
              <td>
                {n.cpu_vendor} <small>{n.cpu_model}</small>
              </td>
              <td data-testid="node-cpu-limit">{n.cpu_limit ?? "host (all it has)"}</td>
              <td title={n.cpu_features.join(" ")}>{n.cpu_features.length}</td>
              <td>
                {n.cores_used} / {n.cores}
              </td>
              <td>
                {n.memory_used_mib} MiB / {Math.max(0, n.memory_mib - n.memory_used_mib)} MiB
              </td>
              <td>{n.vms}</td>
              <td>
                {n.schedulable ? (
                  <button disabled={busy !== null} data-testid="drain" onClick={() => act(n, "drain")}>
                    {busy === n.name ? "draining…" : "Drain"}
                  </button>
                ) : (
                  <button disabled={busy !== null} data-testid="undrain" onClick={() => act(n, "undrain")}>
                    Undrain
                  </button>
                )}
              </td>
            </tr>
          ))}
        </tbody>
      </table>
    </section>
  );
}

function CreateForm({ snap, log, refresh, onClose }: ViewProps & { onClose: () => void }) {
  const [mode, setMode] = useState<"form" | "toml">("form");
  const [f, setF] = useState({
    name: "",
    vcpus: "1",
    memory_mib: "256",
    kernel: "test-guest",
    cmdline: "",
    cpu_profile: "host",
    disks: "",
    nics: "",
    node: "",
  });
  const [toml, setToml] = useState("");
  const [err, setErr] = useState<string | null>(null);
  const field = (k: keyof typeof f, label: string, extra: Record<string, unknown> = {}) => (
    <label>
      {label}
      <input
        data-testid={`create-${k}`}
        value={f[k]}
        onInput={(e) => setF({ ...f, [k]: (e.target as HTMLInputElement).value })}
        {...extra}
      />
    </label>
  );
  const submit = async (e: Event) => {
    e.preventDefault();
    setErr(null);
    const node = f.node || undefined;
    const body =
      mode === "toml"
        ? { toml, node }
        : {
            node,
            spec: {
              name: f.name.trim(),
              vcpus: Number(f.vcpus),
              memory_mib: Number(f.memory_mib),
              kernel: f.kernel.trim(),
              cmdline: f.cmdline,
              cpu_profile: f.cpu_profile,
              disks: f.disks
                .split("\n")
                .map((s) => s.trim())
                .filter(Boolean)
                .map((path) => ({ path })),
              nics: f.nics
                .split("\n")
                .map((s) => s.trim())
                .filter(Boolean)
                .map((network) => ({ network })),
            },
          };
    try {
      const r = await post<VmRecord>("/v1/vms", body);
      log(`created ${r.spec.name} on ${r.owner}`);
      onClose();
      refresh();
    } catch (x) {
      setErr(errorText(x));
    }
  };
  return (
    <form class="panel" onSubmit={submit} data-testid="create-form">
      <h3>Create a VM</h3>
      <div class="tabs">
        <button type="button" class={mode === "form" ? "on" : ""} onClick={() => setMode("form")}>
          Form
        </button>
        <button
          type="button"
          data-testid="create-mode-toml"
          class={mode === "toml" ? "on" : ""}
          onClick={() => setMode("toml")}
        >
          TOML spec
        </button>
      </div>
      {mode === "form" ? (
        <div class="grid">
          {field("name", "Name", { required: true, pattern: "[a-z][a-z0-9\\-]{0,62}" })}
          {field("vcpus", "vCPUs", { type: "number", min: 1 })}
          {field("memory_mib", "Memory (MiB)", { type: "number", min: 1 })}
          {field("kernel", "Kernel")}
          {field("cmdline", "Command line")}
          <label>
            CPU profile
            <select
              data-testid="create-cpu_profile"
              value={f.cpu_profile}
              onChange={(e) => setF({ ...f, cpu_profile: (e.target as HTMLSelectElement).value })}
            >
              <option value="host">host</option>
              <option value="baseline">baseline</option>
              <option value="cluster">cluster</option>
            </select>
          </label>
          <label>
            Disks (one path per line)
            <textarea
              data-testid="create-disks"
              value={f.disks}
              onInput={(e) => setF({ ...f, disks: (e.target as HTMLTextAreaElement).value })}
            />
          </label>
          <label>
            NICs (one network per line)
            <textarea
              data-testid="create-nics"
              value={f.nics}
              onInput={(e) => setF({ ...f, nics: (e.target as HTMLTextAreaElement).value })}
            />
          </label>
        </div>
      ) : (
        <textarea
          class="toml"
          data-testid="create-toml"
          placeholder={'name = "web1"\nvcpus = 1\nmemory_mib = 256'}
          value={toml}
          onInput={(e) => setToml((e.target as HTMLTextAreaElement).value)}
        />
      )}
      <label>
        Node
        <select
          data-testid="create-node"
          value={f.node}
          onChange={(e) => setF({ ...f, node: (e.target as HTMLSelectElement).value })}
        >
          <option value="">this agent's node</option>
          {snap.nodes.map((n) => (
            <option key={n.name} value={n.name}>
              {n.name}
            </option>
          ))}
        </select>
      </label>
      {err && (
        <p class="error" data-testid="create-error">
          {err}
        </p>
      )}
      <div class="buttons">
        <button type="submit" data-testid="create-submit">
          Create
        </button>
        <button type="button" onClick={onClose}>
          Cancel
        </button>
      </div>
    </form>
  );
}

export function VmsView(props: ViewProps) {
  const { snap, log, refresh } = props;
  const [creating, setCreating] = useState(false);
  const [migrating, setMigrating] = useState<VmRecord | null>(null);
  const [err, setErr] = useState<string | null>(null);
  const [busy, setBusy] = useState<string | null>(null);
  const op = async (vm: VmRecord, what: "start" | "stop" | "delete") => {
    setErr(null);
    setBusy(vm.spec.name);
    try {
      if (what === "delete") {
        if (!confirm(`Delete VM ${vm.spec.name}?`)) return;
        await del(`/v1/vms/${vm.spec.name}`);
      } else await post(`/v1/vms/${vm.spec.name}/${what}`, {});
      log(`${what} ${vm.spec.name}`);
    } catch (e) {
      setErr(`${what} ${vm.spec.name}: ${errorText(e)}`);
      log(`${what} ${vm.spec.name}: ${errorText(e)}`, false);
    } finally {
      setBusy(null);
      refresh();
    }
  };
  return (
    <section>
      <h2>
        Virtual machines{" "}
        <button data-testid="create" onClick={() => setCreating(true)}>
          Create VM
        </button>
      </h2>
      {creating && <CreateForm {...props} onClose={() => setCreating(false)} />}
      {err && (
        <p class="error" data-testid="vm-error">
          {err}
        </p>
      )}
      <table data-testid="vms">
        <thead>
          <tr>
            <th>Name</th>
            <th>State</th>
            <th>Owner node</th>
            <th>vCPUs</th>
            <th>Memory</th>
            <th>CPU profile</th>
            <th>Disks</th>
            <th>NICs</th>
            <th />
          </tr>
        </thead>
        <tbody>
          {snap.vms.map((v) => (
            <tr key={v.spec.name} data-testid={`vm-${v.spec.name}`}>
              <td>
                <a href={`#/vm/${v.spec.name}`}>{v.spec.name}</a>
              </td>
              <td>
                <span class={`badge ${v.state}`} data-testid="vm-state">
                  {v.state}
                </span>
              </td>
              <td data-testid="vm-owner">{v.owner}</td>
              <td>{v.spec.vcpus}</td>
              <td>{v.spec.memory_mib} MiB</td>
              <td data-testid="vm-profile">{v.spec.cpu_profile}</td>
              <td>{v.spec.disks.map((d) => d.path).join(", ") || "–"}</td>
              <td>{v.spec.nics.map((n) => n.network).join(", ") || "–"}</td>
              <td class="actions">
                {v.state === "running" ? (
                  <>
                    <button data-testid="migrate" onClick={() => setMigrating(v)}>
                      Live migrate…
                    </button>
                    <button data-testid="stop" disabled={busy === v.spec.name} onClick={() => op(v, "stop")}>
                      Stop
                    </button>
                  </>
                ) : v.state === "migrating" ? (
                  <span>migrating…</span>
                ) : (
                  <>
                    <button data-testid="start" disabled={busy === v.spec.name} onClick={() => op(v, "start")}>
                      Start
                    </button>
                    <a class="button" data-testid="edit" href={`#/vm/${v.spec.name}/edit`}>
                      Edit
                    </a>
                    <button data-testid="delete" disabled={busy === v.spec.name} onClick={() => op(v, "delete")}>
                      Delete
                    </button>
                  </>
                )}
              </td>
            </tr>
          ))}
        </tbody>
      </table>
      {migrating && (
        <MigrateDialog
          vm={migrating}
          log={log}
          refresh={refresh}
          onClose={() => {
            setMigrating(null);
            refresh();
          }}
        />
      )}
    </section>
  );
}

export function MigrationTable({ rows, showVm }: { rows: MigrationRecord[]; showVm: boolean }) {
  return (
    <table data-testid="history">
      <thead>
        <tr>
          <th>Started</th>
          {showVm && <th>VM</th>}
          <th>From → to</th>
          <th>Outcome</th>
          <th>Phase</th>
          <th>Total</th>
          <th>Downtime</th>
          <th>Downtime by phase</th>
          <th>Passes</th>
          <th>Sent</th>
          <th>Reason</th>
        </tr>
      </thead>
      <tbody>
        {rows.map((m) => {
          const s = m.summary;
          return (
            <tr key={m.id} data-testid={`migration-${m.id}`}>
              <td>{new Date(m.started_ms).toLocaleTimeString()}</td>
              {showVm && <td>{m.vm}</td>}
              <td>
                {m.from} → {m.to}
              </td>
              <td>
                <span class={`badge ${m.outcome}`} data-testid="outcome">
                  {m.outcome}
                </span>
              </td>
              <td>{m.phase}</td>
              <td>{s ? fmtMs(s.total_ms) : m.finished_ms ? fmtMs(m.finished_ms - m.started_ms) : "…"}</td>
              <td data-testid="downtime">{s ? fmtMs(s.downtime_ms) : "–"}</td>
              <td>
                {s
                  ? `memory ${fmtMs(s.downtime.final_memory_ms)}, state ${fmtMs(s.downtime.state_ms)}, commit ${fmtMs(s.downtime.commit_ms)}`
                  : "–"}
              </td>
              <td>{s ? s.passes : "–"}</td>
              <td>{s ? fmtBytes(s.bytes_sent) : "–"}</td>
              <td class="reason" data-testid="reason">
                {m.reason ?? ""}
              </td>
            </tr>
          );
        })}
      </tbody>
    </table>
  );
}

export function ActivityView({ snap, actions }: { snap: Snapshot; actions: Action[] }) {
  return (
    <section>
      <h2>Activity</h2>
      <h3>Migrations (the store's records, newest first)</h3>
      <MigrationTable rows={snap.migrations.slice(0, 50)} showVm={true} />
      <h3>This session's actions</h3>
      <ul class="events" data-testid="actions">
        {actions.map((a) => (
          <li key={a.at + a.text} class={a.ok ? "" : "error"}>
            {new Date(a.at).toLocaleTimeString()} {a.text}
          </li>
        ))}
      </ul>
    </section>
  );
}
