// The migrate dialog rendered in jsdom, against a fetch that answers like an agent: blocked
// nodes cannot be chosen, the CPU refusal names the features and the remedy, the usable node
// is preselected.
import { render } from "preact";
import { afterEach, expect, it, vi } from "vitest";

// jsdom has no matchMedia, which the chart library asks for when it loads.
vi.hoisted(() => {
  (globalThis as { matchMedia?: unknown }).matchMedia = () => ({
    matches: false,
    addEventListener() {},
    removeEventListener() {},
    addListener() {},
    removeListener() {},
  });
});
import { MigrateDialog } from "./migrate";
import type { Targets, VmRecord } from "./types";

const targets: Targets = {
  vm: "web",
  from: "node1",
  targets: [
    {
      node: "node3",
      ok: false,
      blockers: [{ kind: "cpu-features", missing: ["avx2", "bmi2"] }],
      reasons: ["node node3 lacks CPU features the VM uses: avx2, bmi2"],
      remedies: ["stop the VM, set its cpu_profile to `cluster` or `baseline`, and start it again"],
      warnings: [],
    },
    {
      node: "node4",
      ok: false,
      blockers: [{ kind: "drained" }],
      reasons: ["node node4 is drained"],
      remedies: ["undrain the node (ferry node undrain NODE)"],
      warnings: [],
    },
    { node: "node2", ok: true, blockers: [], reasons: [], remedies: [], warnings: [] },
  ],
};

const vm: VmRecord = {
  spec: { name: "web", vcpus: 1, memory_mib: 128, kernel: "test-guest", cmdline: "", cpu_profile: "host", disks: [], nics: [] },
  owner: "node1",
  state: "running",
  cpu_features: [],
  migration: null,
  last_error: null,
  updated_ms: 0,
};

afterEach(() => vi.unstubAllGlobals());

it("shows each node's verdict and lets only usable nodes be chosen", async () => {
  const fetch = vi.fn(async () => new Response(JSON.stringify(targets), { status: 200 }));
  vi.stubGlobal("fetch", fetch);
  const root = document.createElement("div");
  document.body.appendChild(root);
  render(<MigrateDialog vm={vm} log={() => {}} refresh={async () => {}} onClose={() => {}} />, root);
  for (let i = 0; i < 50 && !root.querySelector('[data-testid="targets"]'); i++)
    await new Promise((r) => setTimeout(r, 10));
  expect(fetch).toHaveBeenCalledWith("/v1/vms/web/targets", expect.anything());
  const radio = (n: string) => root.querySelector(`[data-testid="choose-${n}"]`) as HTMLInputElement;
  expect(radio("node2").disabled).toBe(false);
  expect(radio("node2").checked).toBe(true);
  expect(radio("node3").disabled).toBe(true);
  expect(radio("node4").disabled).toBe(true);
  const items = [...root.querySelectorAll('[data-testid^="target-"]')].map((e) => e.getAttribute("data-testid"));
  expect(items).toEqual(["target-node2", "target-node3", "target-node4"]);
  expect(root.querySelector('[data-testid="missing"]')!.textContent).toBe("avx2 bmi2");
  expect(root.querySelector('[data-testid="cpu-remedy"]')!.textContent).toMatch(/processor compatibility/);
  expect(root.querySelector('[data-testid="target-node4"]')!.textContent).toMatch(/undrain the node/);
  expect((root.querySelector('[data-testid="migrate-start"]') as HTMLButtonElement).textContent).toBe(
    "Live migrate to node2",
  );
});
