import { describe as group, expect, it } from "vitest";
import { defaultTarget, estimate, linkRate, Meter, migrationNote, missingFeatures, orderTargets } from "./logic";
import { splitEvents } from "./api";
import type { Progress, TargetVerdict } from "./types";

const MiB = 1024 * 1024;
function prog(remaining: number, pass = 0): Progress {
  return {
    phase: "precopy",
    pass,
    bytes_sent: 0,
    pages_sent: 0,
    zero_pages: 0,
    remaining_pages: remaining / 4096,
    remaining_bytes: remaining,
    dirty_rate_mibs: 0,
    bandwidth_mibs: 0,
    expected_downtime_ms: 0,
    throttle_pct: 0,
    elapsed_s: 0,
  };
}

group("progress", () => {
  it("fills pre-copy by memory left", () => {
    expect(estimate("precopy", prog(256 * MiB), 256 * MiB)).toBe(6);
    expect(estimate("precopy", prog(128 * MiB), 256 * MiB)).toBe(48);
    expect(estimate("precopy", prog(0), 256 * MiB)).toBe(90);
    expect(estimate("pause", null, 256 * MiB)).toBe(90);
  });

  it("never runs backwards when dirty pages grow or a stale event arrives", () => {
    const m = new Meter();
    const seen = [
      m.update("setup", null, 256 * MiB),
      m.update("precopy", prog(64 * MiB, 0), 256 * MiB),
      m.update("precopy", prog(200 * MiB, 1), 256 * MiB), // the guest dirtied a lot
      m.update("setup", null, 256 * MiB), // a late event of an earlier phase
      m.update("precopy", prog(32 * MiB, 2), 256 * MiB),
      m.update("device-state", null, 256 * MiB),
    ];
    for (let i = 1; i < seen.length; i++) expect(seen[i]).toBeGreaterThanOrEqual(seen[i - 1]);
    expect(seen[2]).toBe(seen[1]);
    expect(seen[3]).toBe(seen[1]);
  });

  it("reaches 100 only when done", () => {
    const m = new Meter();
    expect(m.update("commit", null, MiB)).toBeLessThan(100);
    expect(m.finish(false)).toBeLessThan(100);
    expect(m.finish(true)).toBe(100);
  });
});

group("verdicts", () => {
  const v = (node: string, ok: boolean, missing: string[] = []): TargetVerdict => ({
    node,
    ok,
    blockers: missing.length ? [{ kind: "cpu-features", missing }] : ok ? [] : [{ kind: "drained" }],
    reasons: [],
    remedies: [],
    warnings: [],
  });

  it("puts usable targets first and preselects one", () => {
    const ts = [v("c", false), v("b", true), v("a", false, ["avx512f"])];
    expect(orderTargets(ts).map((t) => t.node)).toEqual(["b", "a", "c"]);
    expect(defaultTarget(ts)).toBe("b");
    expect(defaultTarget([v("a", false)])).toBeNull();
  });

  it("names the missing CPU features", () => {
    expect(missingFeatures(v("a", false, ["avx2", "bmi2"]))).toEqual(["avx2", "bmi2"]);
    expect(missingFeatures(v("b", false))).toEqual([]);
  });
});

group("server-sent events", () => {
  it("splits complete events and keeps the rest", () => {
    const { events, rest } = splitEvents('data: {"a":1}\n\n: keep-alive\n\ndata: {"b"');
    expect(events).toEqual(['{"a":1}']);
    expect(rest).toBe('data: {"b"');
  });
});

group("link rate", () => {
  it("is bytes sent over time between two reports, never negative", () => {
    const a = { ...prog(0), bytes_sent: 0, elapsed_s: 1 };
    const b = { ...prog(0), bytes_sent: 8 * MiB, elapsed_s: 1.5 };
    expect(linkRate(a, b)).toBe(16);
    expect(linkRate(b, a)).toBe(0);
  });
});

group("migrationNote", () => {
  it("is null without a migration", () => {
    expect(migrationNote({ migration: null, owner: "node1" })).toBeNull();
  });
  it("names the destination a handed-over commit belongs to", () => {
    const n = migrationNote({ migration: "vm-1", owner: "node1", handover_to: "node2" });
    expect(n).toContain("handed over");
    expect(n).toContain("from node1 to node2");
  });
  it("says the store decides otherwise", () => {
    const n = migrationNote({ migration: "vm-1", owner: "node1" });
    expect(n).toContain("waits for the store");
    expect(n).not.toContain("handed over");
  });
});
