// The web console in a real Chromium (Debian's, driven by playwright-core: no browser
// download) against a real cluster that `crates/cli/tests/console.rs` starts: four agents with
// real workers, node3 limited to the baseline CPU. Every step is done the way an administrator
// does it, through the page; the screenshots of each step go to $FERRY_ARTIFACTS.
//
// env: FERRY_URL (node1's agent), FERRY_TOKEN (an admin token), FERRY_ARTIFACTS (a directory),
// FERRY_SERVER_CERT (node1's certificate, for an https:// URL: the browser trusts its key
// alone, by SPKI pin, not every certificate).
import { chromium } from "playwright-core";
import { execFileSync } from "node:child_process";
import { createHash, X509Certificate } from "node:crypto";
import { mkdirSync, readFileSync } from "node:fs";

const url = process.env.FERRY_URL;
const token = process.env.FERRY_TOKEN;
const artifacts = process.env.FERRY_ARTIFACTS ?? "test-results";
if (!url || !token) throw new Error("FERRY_URL and FERRY_TOKEN are required");
mkdirSync(artifacts, { recursive: true });

const args = ["--no-sandbox", "--disable-dev-shm-usage"]; // root: no Chromium sandbox
if (process.env.FERRY_SERVER_CERT) {
  const cert = new X509Certificate(readFileSync(process.env.FERRY_SERVER_CERT));
  const spki = cert.publicKey.export({ type: "spki", format: "der" });
  args.push(`--ignore-certificate-errors-spki-list=${createHash("sha256").update(spki).digest("base64")}`);
}
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  args,
});
const page = await (await browser.newContext({ viewport: { width: 1360, height: 900 } })).newPage();
const problems = [];
page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
page.on("console", (m) => {
  if (m.type() === "error" && !/status of 40[0139]/.test(m.text())) problems.push(`console: ${m.text()}`);
});
page.on("dialog", (d) => d.accept());

let step = 0;
async function shot(name) {
  step++;
  const file = `${artifacts}/${String(step).padStart(2, "0")}-${name}.png`;
  await page.screenshot({ path: file, fullPage: true });
  console.log(`step ${step}: ${name} (${file})`);
}

const id = (t) => page.getByTestId(t);

/** Waits until `locator`'s text matches `re`; fails with what it showed. */
async function waitText(locator, re, timeout = 30000) {
  const t0 = Date.now();
  let last = "";
  for (;;) {
    try {
      last = (await locator.first().textContent({ timeout: 1000 })) ?? "";
      if (re.test(last)) return last;
    } catch {
      /* not there yet */
    }
    if (Date.now() - t0 > timeout) throw new Error(`waited ${timeout} ms for ${re}; last text: ${JSON.stringify(last)}`);
    await page.waitForTimeout(100);
  }
}

async function api(path) {
  const r = await fetch(url.replace(/\/$/, "") + path, { headers: { Authorization: `Bearer ${token}` } });
  if (!r.ok) throw new Error(`${path}: ${r.status} ${await r.text()}`);
  return r.json();
}

const vmRow = () => id("vm-web");
async function openVms() {
  await id("nav-vms").click();
  await id("vms").waitFor();
}
async function openMigrate() {
  await openVms();
  await waitText(vmRow().getByTestId("vm-state"), /^running$/);
  await vmRow().getByTestId("migrate").click();
  await id("targets").waitFor();
}
/** Starts a migration to `node` in the open dialog; returns its id (from the store). */
async function startMigration(node, bandwidth) {
  await id(`choose-${node}`).check();
  if (bandwidth) await id("opt-bandwidth").fill(String(bandwidth));
  await id("opt-streams").fill("1");
  await id("migrate-start").click();
  await id("progress").waitFor();
  const t0 = Date.now();
  for (;;) {
    const v = await api("/v1/vms/web");
    if (v.vm.migration) return v.vm.migration;
    const last = v.migrations[0];
    if (last && last.to === node && last.started_ms >= t0 - 60000 && last.outcome !== "running") return last.id;
    if (Date.now() - t0 > 20000) throw new Error("the migration did not start");
    await page.waitForTimeout(50);
  }
}

try {
  // Sign in: the page asks for the credential; a wrong one is refused.
  await page.goto(url);
  await id("token").fill("ferry_wrong");
  await id("login").click();
  await waitText(id("login-error"), /unknown token/);
  await shot("login-refused");
  await id("token").fill(token);
  await id("login").click();
  await id("nodes").waitFor();
  for (const n of ["node1", "node2", "node3", "node4"]) await waitText(id(`node-${n}`).getByTestId("node-state"), /^alive$/);

  // Drain node4 (no VMs): it shows drained.
  await id("node-node4").getByTestId("drain").click();
  await waitText(id("drain-report"), /drained node4: 0 moved, 0 failed/);
  await waitText(id("node-node4").getByTestId("node-state"), /^drained$/);
  await waitText(id("node-node3").getByTestId("node-cpu-limit"), /^baseline$/);
  await shot("cluster-node4-drained");

  // A VM from a pasted TOML spec, then deleted; a bad spec is refused with the reason.
  await openVms();
  await id("create").click();
  await id("create-mode-toml").click();
  await id("create-toml").fill('name = "Bad/Name"\nmemory_mib = 64\n');
  await id("create-submit").click();
  await waitText(id("create-error"), /invalid VM name/);
  await id("create-toml").fill('name = "scratch"\nmemory_mib = 64\ncpu_profile = "baseline"\n');
  await id("create-submit").click();
  await waitText(id("vm-scratch").getByTestId("vm-profile"), /^baseline$/);
  await id("vm-scratch").getByTestId("delete").click();
  await id("vm-scratch").waitFor({ state: "detached" });

  // Create a VM in the form and start it.
  await id("create").click();
  await id("create-name").fill("web");
  await id("create-vcpus").fill("1");
  await id("create-memory_mib").fill("128");
  await id("create-cmdline").fill("ferry.workload=verify ferry.wss_mib=16 ferry.hb_ms=100");
  await id("create-node").selectOption("node1");
  await shot("create-form");
  await id("create-submit").click();
  await waitText(vmRow().getByTestId("vm-state"), /^stopped$/);
  await vmRow().getByTestId("start").click();
  await waitText(vmRow().getByTestId("vm-state"), /^running$/);
  await waitText(vmRow().getByTestId("vm-owner"), /^node1$/);
  await shot("vm-running-on-node1");

  // Live migrate: every other node's verdict before anything moves.
  await openMigrate();
  await waitText(id("target-node2").getByTestId("verdict"), /^ok/);
  await waitText(id("target-node3").getByTestId("verdict"), /cannot take this VM/);
  await waitText(id("target-node3").getByTestId("missing"), /\S/);
  await waitText(id("target-node3").getByTestId("cpu-remedy"), /processor compatibility.*cluster.*baseline/);
  await waitText(id("target-node4").getByTestId("reasons"), /node node4 is drained/);
  if (!(await id("choose-node3").isDisabled()) || !(await id("choose-node4").isDisabled()))
    throw new Error("a blocked node can be chosen");
  await shot("migrate-dialog-verdicts");
  const m1 = await startMigration("node2");
  await waitText(id("result").getByTestId("outcome"), /^succeeded$/, 120000);
  await waitText(id("store-owner"), /^node2 \(running\)$/);
  await waitText(id("pct"), /^100%$/);
  await shot("migrated-to-node2");
  await id("migrate-close").click();
  await waitText(vmRow().getByTestId("vm-owner"), /^node2$/);
  // The history row has the downtime.
  await page.goto(`${url}#/vm/web`);
  await waitText(id(`migration-${m1}`).getByTestId("outcome"), /^succeeded$/);
  await waitText(id(`migration-${m1}`).getByTestId("downtime"), /\d ms$/);
  await waitText(id("serial"), /verify ok/);
  await shot("vm-detail-history");

  // The CPU refusal's remedy: its link leads to the edit form, which says to stop first.
  await openMigrate();
  await id("target-node3").getByTestId("edit-link").click();
  await id("edit-form").waitFor();
  await id("edit-running").waitFor();
  if (!(await id("edit-submit").isDisabled())) throw new Error("a running VM's edit can be saved");
  await openVms();
  await vmRow().getByTestId("stop").click();
  await waitText(vmRow().getByTestId("vm-state"), /^stopped$/);
  await vmRow().getByTestId("edit").click();
  await id("edit-form").waitFor();
  await id("edit-cpu_profile").selectOption("cluster");
  await shot("edit-cpu-profile");
  await id("edit-submit").click();
  await waitText(id("cfg-profile"), /^cluster$/);
  await openVms();
  await waitText(vmRow().getByTestId("vm-profile"), /^cluster$/);
  await vmRow().getByTestId("start").click();
  await waitText(vmRow().getByTestId("vm-state"), /^running$/);

  // Now the baseline node can take it.
  await openMigrate();
  await waitText(id("target-node3").getByTestId("verdict"), /^ok/);
  const m2 = await startMigration("node3");
  await waitText(id("result").getByTestId("outcome"), /^succeeded$/, 120000);
  await waitText(id("store-owner"), /^node3 \(running\)$/);
  await shot("migrated-to-baseline-node3");
  await id("migrate-close").click();
  await waitText(vmRow().getByTestId("vm-owner"), /^node3$/);

  // Cancel mid-way (a bandwidth cap makes the copy take seconds): cancelled, still on node3.
  await openMigrate();
  const m3 = await startMigration("node1", 4);
  await waitText(id("phase"), /^precopy$/, 30000);
  // The page measures the rate the cap allows (4 MiB/s) and charts it.
  await id("rate-chart").waitFor({ timeout: 15000 });
  await waitText(id("send-rate"), /^[1-9][0-9.]* MiB\/s$/, 15000);
  await shot("progress-throttled");
  await id("cancel").click();
  await waitText(id("result").getByTestId("outcome"), /^cancelled$/, 60000);
  await waitText(id("store-owner"), /^node3 \(running\)$/);
  await shot("cancelled");
  await id("migrate-close").click();

  // Kill the destination's worker mid-migration: failed, with the reason, VM on node3.
  await openMigrate();
  const m4 = await startMigration("node1", 4);
  await waitText(id("phase"), /^precopy$/, 30000);
  execFileSync("pkill", ["-KILL", "-f", `ferry-vmm receive .*--migration-id ${m4}`]);
  await waitText(id("result").getByTestId("outcome"), /^failed$/, 60000);
  await waitText(id("failure-reason"), /\S/);
  await waitText(id("store-owner"), /^node3 \(running\)$/);
  await shot("destination-killed");
  await id("migrate-close").click();
  await waitText(vmRow().getByTestId("vm-owner"), /^node3$/);
  await waitText(vmRow().getByTestId("vm-state"), /^running$/);

  // Drain node3: its VM leaves.
  await id("nav-cluster").click();
  await id("node-node3").getByTestId("drain").click();
  await waitText(id("drain-report"), /drained node3: 1 moved, 0 failed/, 120000);
  await waitText(id("node-node3").getByTestId("node-state"), /^drained$/);
  await shot("node3-drained");
  await openVms();
  await waitText(vmRow().getByTestId("vm-owner"), /^node[12]$/);
  await id("nav-activity").click();
  for (const m of [m1, m2, m3, m4]) await id(`migration-${m}`).waitFor();
  await waitText(id(`migration-${m3}`).getByTestId("outcome"), /^cancelled$/);
  await waitText(id(`migration-${m4}`).getByTestId("outcome"), /^failed$/);
  await shot("activity");
  if (problems.length) throw new Error(`the page reported errors:\n${problems.join("\n")}`);
  console.log(`CONSOLE-E2E ok ${JSON.stringify({ migrations: [m1, m2, m3, m4] })}`);
} catch (e) {
  await shot("failure").catch(() => {});
  console.error(`CONSOLE-E2E failed at step ${step + 1}: ${e.stack ?? e}`);
  if (problems.length) console.error(problems.join("\n"));
  process.exitCode = 1;
} finally {
  await browser.close();
}
