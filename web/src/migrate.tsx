import { useEffect, useRef, useState } from "preact/hooks";
import uPlot from "uplot";
import "uplot/dist/uPlot.min.css";
import { errorText, followMigration, get, post } from "./api";
import { defaultTarget, describe, fmtBytes, fmtMs, linkRate, Meter, missingFeatures, orderTargets } from "./logic";
import type { MigrationRecord, MigrationStarted, Phase, Progress, Targets, VmRecord } from "./types";


interface Props {
  vm: VmRecord;
  log: (text: string, ok?: boolean) => void;
  refresh: () => Promise<void>;
  onClose: () => void;
}

/** "Live migrate to another node": every other node's verdict first, then the move live. */
export function MigrateDialog({ vm, log, refresh, onClose }: Props) {
  const [targets, setTargets] = useState<Targets | null>(null);
  const [err, setErr] = useState<string | null>(null);
  const [to, setTo] = useState<string | null>(null);
  const [opt, setOpt] = useState({ max_downtime_ms: "50", streams: "4", compression: "none", bw: "" });
  const [started, setStarted] = useState<MigrationRecord | null>(null);
  const name = vm.spec.name;

  useEffect(() => {
    get<Targets>(`/v1/vms/${name}/targets`)
      .then((t) => {
        setTargets(t);
        setTo(defaultTarget(t.targets));
      })
      .catch((e) => setErr(errorText(e)));
  }, [name]);

  const start = async () => {
    if (!to) return;
    setErr(null);
    const params: Record<string, unknown> = {
      max_downtime_ms: Number(opt.max_downtime_ms),
      streams: Number(opt.streams),
      compression: opt.compression,
    };
    if (opt.bw) params.max_bandwidth_mibs = Number(opt.bw);
    try {
      const r = await post<MigrationStarted>(`/v1/vms/${name}/migrate`, { to, params });
      log(`migration ${r.migration.id}: ${name} ${r.migration.from} → ${to} started`);
      setStarted(r.migration);
    } catch (e) {
      setErr(errorText(e));
      log(`migrate ${name} to ${to}: ${errorText(e)}`, false);
    }
  };

  return (
    <div class="modal" role="dialog" aria-label={`Live migrate ${name}`} data-testid="migrate-dialog">
      <div class="box">
        <h3>
          Live migrate {name} from {vm.owner}
        </h3>
        {started ? (
          <ProgressPanel
            record={started}
            memoryBytes={vm.spec.memory_mib * 1024 * 1024}
            log={log}
            refresh={refresh}
          />
        ) : (
          <>
            {!targets && !err && <p>checking every node…</p>}
            {targets && targets.targets.length === 0 && <p>There is no other node.</p>}
            {targets && (
              <ul class="targets" data-testid="targets">
                {orderTargets(targets.targets).map((t) => {
                  const missing = missingFeatures(t);
                  return (
                    <li key={t.node} class={t.ok ? "ok" : "blocked"} data-testid={`target-${t.node}`}>
                      <label>
                        <input
                          type="radio"
                          name="target"
                          data-testid={`choose-${t.node}`}
                          disabled={!t.ok}
                          checked={to === t.node}
                          onChange={() => setTo(t.node)}
                        />
                        <strong>{t.node}</strong>{" "}
                        <span class={`badge ${t.ok ? "succeeded" : "failed"}`} data-testid="verdict">
                          {t.ok ? (t.warnings.length ? "ok, with warnings" : "ok") : "cannot take this VM"}
                        </span>
                      </label>
                      {t.reasons.length > 0 && (
                        <ul class="reasons" data-testid="reasons">
                          {t.reasons.map((r, i) => (
                            <li key={r}>
                              {r}
                              {t.remedies[i] && t.blockers[i]?.kind !== "cpu-features" && (
                                <div class="remedy">Remedy: {t.remedies[i]}</div>
                              )}
                            </li>
                          ))}
                        </ul>
                      )}
                      {missing.length > 0 && (
                        <p class="remedy" data-testid="cpu-remedy">
                          Missing CPU features: <code data-testid="missing">{missing.join(" ")}</code>. To move
                          this VM there, shut it down, set its processor compatibility (CPU profile) to{" "}
                          <code>cluster</code> or <code>baseline</code>, and start it again:{" "}
                          <a href={`#/vm/${name}/edit`} data-testid="edit-link" onClick={onClose}>
                            edit {name}
                          </a>
                          .
                        </p>
                      )}
                      {t.warnings.map((w) => (
                        <p class="warning" key={w}>
                          {w}
                        </p>
                      ))}
                    </li>
                  );
                })}
              </ul>
            )}
            <fieldset class="grid">
              <legend>Options</legend>
              <label>
                Max downtime (ms)
                <input
                  type="number"
                  min={1}
                  data-testid="opt-downtime"
                  value={opt.max_downtime_ms}
                  onInput={(e) => setOpt({ ...opt, max_downtime_ms: (e.target as HTMLInputElement).value })}
                />
              </label>
              <label>
                Streams
                <input
                  type="number"
                  min={1}
                  max={16}
                  data-testid="opt-streams"
                  value={opt.streams}
                  onInput={(e) => setOpt({ ...opt, streams: (e.target as HTMLInputElement).value })}
                />
              </label>
              <label>
                Compression
                <select
                  data-testid="opt-compression"
                  value={opt.compression}
                  onChange={(e) => setOpt({ ...opt, compression: (e.target as HTMLSelectElement).value })}
                >
                  <option value="none">none</option>
                  <option value="lz4">lz4</option>
                  <option value="zstd">zstd</option>
                </select>
              </label>
              <label>
                Bandwidth cap (MiB/s, empty: none)
                <input
                  type="number"
                  min={1}
                  data-testid="opt-bandwidth"
                  value={opt.bw}
                  onInput={(e) => setOpt({ ...opt, bw: (e.target as HTMLInputElement).value })}
                />
              </label>
            </fieldset>
          </>
        )}
        {err && (
          <p class="error" data-testid="migrate-error">
            {err}
          </p>
        )}
        <div class="buttons">
          {!started && (
            <button data-testid="migrate-start" disabled={!to} onClick={start}>
              Live migrate{to ? ` to ${to}` : ""}
            </button>
          )}
          <button data-testid="migrate-close" onClick={onClose}>
            Close
          </button>
        </div>
      </div>
    </div>
  );
}

function RateChart({ series }: { series: [number[], number[], number[]] }) {
  const el = useRef<HTMLDivElement>(null);
  const plot = useRef<uPlot | null>(null);
  useEffect(() => {
    if (!el.current) return;
    plot.current = new uPlot(
      {
        width: 520,
        height: 180,
        scales: { x: { time: false } },
        axes: [{ label: "s" }, { label: "MiB/s" }],
        series: [
          {},
          { label: "sent (MiB/s)", stroke: "#1d4e89", width: 2 },
          { label: "dirtied (MiB/s)", stroke: "#c0392b", width: 2 },
        ],
      },
      series,
      el.current,
    );
    return () => plot.current?.destroy();
  }, []);
  useEffect(() => {
    plot.current?.setData(series);
  }, [series]);
  return <div ref={el} data-testid="rate-chart" />;
}

/** A migration as it runs: phase-aware progress that never runs backwards, the dirty rate
 * against the link, cancel; at the end the measured numbers and, after a failure, where the
 * store says the VM is. */
export function ProgressPanel({
  record,
  memoryBytes,
  log,
  refresh,
}: {
  record: MigrationRecord;
  memoryBytes: number;
  log: (text: string, ok?: boolean) => void;
  refresh: () => Promise<void>;
}) {
  const meter = useRef(new Meter());
  const [pct, setPct] = useState(0);
  const [phase, setPhase] = useState<Phase>(record.phase);
  const [p, setP] = useState<Progress | null>(null);
  const [series, setSeries] = useState<[number[], number[], number[]]>([[], [], []]);
  const [done, setDone] = useState<MigrationRecord | null>(null);
  const [owner, setOwner] = useState<string | null>(null);
  const [err, setErr] = useState<string | null>(null);
  const [cancelling, setCancelling] = useState(false);
  const last = useRef<Progress | null>(null);

  useEffect(() => {
    const ctl = new AbortController();
    followMigration(
      record.id,
      (ev) => {
        if (ev.event === "progress") {
          setPhase(ev.phase);
          const pr = ev.progress.elapsed_s > 0 ? ev.progress : null;
          if (pr) {
            setP(pr);
            // The link rate as this page measures it (bytes sent between two events): the
            // engine's own figure comes only at the end of each pass.
            const prev = last.current;
            last.current = pr;
            if (prev && pr.elapsed_s > prev.elapsed_s) {
              const rate = linkRate(prev, pr);
              setSeries((s) => [
                [...s[0], pr.elapsed_s],
                [...s[1], rate],
                [...s[2], pr.dirty_rate_mibs],
              ]);
            }
          }
          setPct(meter.current.update(ev.phase, pr, memoryBytes));
        } else if (ev.event === "done") {
          const m = ev.migration;
          setDone(m);
          setPhase(m.phase);
          setPct(meter.current.finish(m.outcome === "succeeded"));
          log(
            `migration ${m.id}: ${m.outcome}${m.summary ? `, downtime ${fmtMs(m.summary.downtime_ms)}` : ""}${m.reason ? `: ${m.reason}` : ""}`,
            m.outcome === "succeeded",
          );
          // The owner shown is the store's, read after the end.
          get<{ vm: VmRecord }>(`/v1/vms/${m.vm}`)
            .then((v) => setOwner(`${v.vm.owner} (${v.vm.state})`))
            .catch((e) => setOwner(`unknown: ${errorText(e)}`));
          refresh();
        } else setErr(ev.error);
      },
      ctl.signal,
    ).catch((e) => {
      if (!ctl.signal.aborted) setErr(errorText(e));
    });
    return () => ctl.abort();
  }, [record.id]);

  const cancel = async () => {
    setCancelling(true);
    try {
      await post(`/v1/migrations/${record.id}/cancel`, {});
      log(`migration ${record.id}: cancel requested`);
    } catch (e) {
      setErr(errorText(e));
      setCancelling(false);
    }
  };

  const s = done?.summary;
  return (
    <div class="progress" data-testid="progress">
      <div class="bar" role="progressbar" aria-valuenow={Math.round(pct)} aria-valuemin={0} aria-valuemax={100}>
        <div class={`fill ${done ? done.outcome : ""}`} style={{ width: `${pct}%` }} />
      </div>
      <p>
        <span data-testid="pct">{Math.round(pct)}%</span> · phase <strong data-testid="phase">{phase}</strong>
        {!done && p && <> · {describe(phase, p)}</>}
      </p>
      {!done && p && (
        <table class="kv">
          <tbody>
            <tr>
              <th>Pass</th>
              <td data-testid="pass">{p.pass}</td>
              <th>Pages sent / remaining</th>
              <td>
                {p.pages_sent} / {p.remaining_pages}
              </td>
            </tr>
            <tr>
              <th>Sent</th>
              <td>{fmtBytes(p.bytes_sent)}</td>
              <th>Expected downtime</th>
              <td>{fmtMs(p.expected_downtime_ms)}</td>
            </tr>
            <tr>
              <th>Sending now (measured here)</th>
              <td data-testid="send-rate">
                {series[1].length ? `${series[1][series[1].length - 1].toFixed(1)} MiB/s` : "–"}
              </td>
              <th>Last pass: dirty rate / link</th>
              <td>
                {p.dirty_rate_mibs.toFixed(0)} / {p.bandwidth_mibs.toFixed(0)} MiB/s
              </td>
            </tr>
            <tr>
              <th>Throttle</th>
              <td>{p.throttle_pct}%</td>
            </tr>
          </tbody>
        </table>
      )}
      {series[0].length >= 2 ? (
        <RateChart series={series} />
      ) : (
        !done && <p class="hint">The rates appear after the first reports.</p>
      )}
      {done ? (
        <div class={`result ${done.outcome}`} data-testid="result">
          <p>
            <strong data-testid="outcome">{done.outcome}</strong>
            {s && (
              <>
                {" "}
                · downtime <span data-testid="result-downtime">{fmtMs(s.downtime_ms)}</span> · total{" "}
                {fmtMs(s.total_ms)} · {s.passes} passes · {fmtBytes(s.bytes_sent)}
              </>
            )}
          </p>
          {done.outcome !== "succeeded" && (
            <p data-testid="failure">
              Stopped in phase <strong>{done.phase}</strong>: <span data-testid="failure-reason">{done.reason}</span>
            </p>
          )}
          <p>
            The store says the VM is on: <strong data-testid="store-owner">{owner ?? "…"}</strong>
          </p>
        </div>
      ) : (
        <button data-testid="cancel" disabled={cancelling} onClick={cancel}>
          {cancelling ? "cancelling…" : "Cancel migration"}
        </button>
      )}
      {err && (
        <p class="error" data-testid="progress-error">
          {err}
        </p>
      )}
    </div>
  );
}
