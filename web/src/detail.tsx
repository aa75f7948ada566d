import { useEffect, useRef, useState } from "preact/hooks";
import { errorText, get, put } from "./api";
import { migrationNote } from "./logic";
import { MigrationTable, type ViewProps } from "./views";
import type { SerialTail, VmRecord, VmView } from "./types";


function EditForm({ vm, log, refresh, onDone }: { vm: VmRecord; onDone: () => void } & Omit<ViewProps, "snap">) {
  const [f, setF] = useState({
    vcpus: String(vm.spec.vcpus),
    memory_mib: String(vm.spec.memory_mib),
    cpu_profile: vm.spec.cpu_profile,
  });
  const [err, setErr] = useState<string | null>(null);
  const submit = async (e: Event) => {
    e.preventDefault();
    setErr(null);
    try {
      await put(`/v1/vms/${vm.spec.name}`, {
        vcpus: Number(f.vcpus),
        memory_mib: Number(f.memory_mib),
        cpu_profile: f.cpu_profile,
      });
      log(`changed ${vm.spec.name}: ${f.vcpus} vCPUs, ${f.memory_mib} MiB, CPU profile ${f.cpu_profile}`);
      onDone();
      refresh();
    } catch (x) {
      setErr(errorText(x));
    }
  };
  const running = vm.state !== "stopped" && vm.state !== "crashed";
  return (
    <form class="panel" onSubmit={submit} data-testid="edit-form">
      <h3>Change {vm.spec.name}</h3>
      {running && (
        <p class="warning" data-testid="edit-running">
          The VM is {vm.state}: stop it to change its vCPUs, memory or CPU profile.
        </p>
      )}
      <div class="grid">
        <label>
          vCPUs
          <input
            type="number"
            min={1}
            data-testid="edit-vcpus"
            value={f.vcpus}
            onInput={(e) => setF({ ...f, vcpus: (e.target as HTMLInputElement).value })}
          />
        </label>
        <label>
          Memory (MiB)
          <input
            type="number"
            min={1}
            data-testid="edit-memory"
            value={f.memory_mib}
            onInput={(e) => setF({ ...f, memory_mib: (e.target as HTMLInputElement).value })}
          />
        </label>
        <label>
          CPU profile (processor compatibility)
          <select
            data-testid="edit-cpu_profile"
            value={f.cpu_profile}
            onChange={(e) => setF({ ...f, cpu_profile: (e.target as HTMLSelectElement).value })}
          >
            <option value="host">host: every feature of the node it starts on</option>
            <option value="cluster">cluster: what every node offers</option>
            <option value="baseline">baseline: a fixed x86-64 level</option>
          </select>
        </label>
      </div>
      {err && (
        <p class="error" data-testid="edit-error">
          {err}
        </p>
      )}
      <div class="buttons">
        <button type="submit" data-testid="edit-submit" disabled={running}>
          Save
        </button>
        <button type="button" onClick={onDone}>
          Cancel
        </button>
      </div>
    </form>
  );
}

export function VmDetail({ name, editing, snap, log, refresh }: ViewProps & { name: string; editing: boolean }) {
  const [view, setView] = useState<VmView | null>(null);
  const [serial, setSerial] = useState<SerialTail | null>(null);
  const [err, setErr] = useState<string | null>(null);
  const pre = useRef<HTMLPreElement>(null);
  useEffect(() => {
    // A tail: keep the newest line in view.
    if (pre.current) pre.current.scrollTop = pre.current.scrollHeight;
  }, [serial?.text]);
  useEffect(() => {
    let live = true;
    const load = async () => {
      try {
        const v = await get<VmView>(`/v1/vms/${name}`);
        if (live) setView(v);
        const s = await get<SerialTail>(`/v1/vms/${name}/serial`);
        if (live) setSerial(s);
        if (live) setErr(null);
      } catch (e) {
        if (live) setErr(errorText(e));
      }
    };
    load();
    const t = setInterval(load, 2000);
    return () => {
      live = false;
      clearInterval(t);
    };
  }, [name, snap.at]);
  if (!view) return <p class={err ? "error" : "loading"}>{err ?? "loading…"}</p>;
  const vm = view.vm;
  const note = migrationNote(vm);
  const close = () => (location.hash = `#/vm/${name}`);
  return (
    <section data-testid="vm-detail">
      <h2>
        {name}{" "}
        <span class={`badge ${vm.state}`} data-testid="detail-state">
          {vm.state}
        </span>{" "}
        on <span data-testid="detail-owner">{vm.owner}</span>{" "}
        {!editing && (
          <a class="button" href={`#/vm/${name}/edit`} data-testid="detail-edit">
            Edit
          </a>
        )}
      </h2>
      {err && <p class="stale">{err}</p>}
      {note && <p data-testid="detail-migration">{note}</p>}
      {vm.last_error && <p class="error">Last error: {vm.last_error}</p>}
      {editing && <EditForm vm={vm} log={log} refresh={refresh} onDone={close} />}
      <h3>Configuration</h3>
      <table class="kv" data-testid="config">
        <tbody>
          <tr>
            <th>vCPUs</th>
            <td data-testid="cfg-vcpus">{vm.spec.vcpus}</td>
            <th>Memory</th>
            <td data-testid="cfg-memory">{vm.spec.memory_mib} MiB</td>
          </tr>
          <tr>
            <th>CPU profile</th>
            <td data-testid="cfg-profile">{vm.spec.cpu_profile}</td>
            <th>CPU features (last start)</th>
            <td>
              <small>{vm.cpu_features.join(" ") || "–"}</small>
            </td>
          </tr>
          <tr>
            <th>Kernel</th>
            <td>
              {vm.spec.kernel}
              {vm.spec.initrd ? ` + ${vm.spec.initrd}` : ""}
            </td>
            <th>Command line</th>
            <td>
              <code>{vm.spec.cmdline || "–"}</code>
            </td>
          </tr>
          <tr>
            <th>Disks</th>
            <td>{vm.spec.disks.map((d) => `${d.path}${d.read_only ? " (ro)" : ""}`).join(", ") || "–"}</td>
            <th>NICs</th>
            <td>{vm.spec.nics.map((n) => `${n.network}${n.mac ? ` ${n.mac}` : ""}`).join(", ") || "–"}</td>
          </tr>
          <tr>
            <th>Worker</th>
            <td colSpan={3}>
              {view.worker ? `pid ${view.worker.pid}, ${view.worker.state}, up ${view.worker.uptime_s.toFixed(0)} s` : "none"}
            </td>
          </tr>
        </tbody>
      </table>
      <h3>Migrations</h3>
      <MigrationTable rows={view.migrations} showVm={false} />
      <h3>
        Serial console{serial ? ` (on ${serial.node}${serial.truncated ? ", last 16 KiB" : ""})` : ""}
      </h3>
      <pre class="serial" data-testid="serial" ref={pre}>
        {serial?.text ?? ""}
      </pre>
    </section>
  );
}
