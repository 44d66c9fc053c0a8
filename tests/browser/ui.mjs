// The page of `absorb serve` in a real browser (Debian's Chromium, headless, driven by
// playwright-core): generate while watching the progress events, paint a mask and inpaint,
// outpaint, cancel a running job; every PNG the page got must equal the CLI's for the same
// parameters. `make browser-test` runs it; SHOTS=DIR saves screenshots there.
//   node tests/browser/ui.mjs ABSORB_BIN MODEL_DIR
import { spawn, execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createRequire } from "node:module";

const require = createRequire(process.env.PLAYWRIGHT_DIR + "/");
const { chromium } = require("playwright-core");
const [bin, model] = process.argv.slice(2);
const work = mkdtempSync(join(tmpdir(), "absorb-ui-"));
const shots = process.env.SHOTS;
let failures = 0;
const check = (ok, what) => { console.log(`${ok ? "ok  " : "FAIL"} ${what}`); if (!ok) failures++; };
const cli = (...args) => execFileSync(bin, [...args, "-m", model], { cwd: work, stdio: ["ignore", "ignore", "inherit"] });
const same = (b64, file) => Buffer.from(b64, "base64").equals(readFileSync(join(work, file)));

// The service on a free port.
const server = spawn(bin, ["serve", "-m", model, "--listen", "127.0.0.1:0"], { stdio: ["ignore", "ignore", "pipe"] });
const base = await new Promise((resolve, reject) => {
  let err = "";
  server.stderr.on("data", (d) => {
    err += d;
    const m = err.match(/listening on (\S+)\n/);
    if (m) resolve(`http://${m[1]}`);
  });
  server.on("exit", (code) => reject(new Error(`absorb serve exited ${code}: ${err}`)));
});

const browser = await chromium.launch({ executablePath: process.env.CHROMIUM || "/usr/bin/chromium", args: ["--no-sandbox"] });
try {
  const page = await browser.newPage({ viewport: { width: 1000, height: 1100 } });
  const consoleErrors = [];
  page.on("pageerror", (e) => consoleErrors.push(String(e)));
  // Every progress text the page shows, as it shows it.
  await page.addInitScript(() => {
    window.seen = [];
    new MutationObserver(() => {
      const t = document.getElementById("ptext");
      if (t) window.seen.push(t.textContent);
    }).observe(document, { subtree: true, childList: true, characterData: true });
  });
  // The bodies the page posts, to run the CLI on exactly the same input.
  const posted = [], created = [];
  page.on("request", (r) => { if (r.method() === "POST") posted.push({ url: r.url(), body: r.postData() }); });
  page.on("response", async (r) => { if (r.request().method() === "POST" && r.status() === 202) created.push((await r.json()).id); });

  const r = await page.goto(base + "/");
  check(r.status() === 200 && (await page.title()) === "absorb", "GET / serves the page");
  await page.waitForFunction(() => document.getElementById("model").textContent.includes("bundle"));

  // 1. Generate, watching the reverse process.
  await page.fill("#seed", "5"); await page.fill("#count", "3"); await page.fill("#steps", "5"); await page.fill("#temp", "0.9");
  await page.click("#go");
  await page.waitForFunction(() => document.querySelectorAll("#results img").length === 3, null, { timeout: 60000 });
  check((await page.textContent("#ptext")).startsWith("done: "), "the progress line ends done");
  const pngs = await page.$$eval("#results img", (imgs) => imgs.map((i) => i.src.split(",")[1]));
  cli("generate", "--seed", "5", "--count", "3", "--steps", "5", "-t", "0.9", "-o", "many/");
  check(pngs.every((p, i) => same(p, `many/5-${String(i).padStart(6, "0")}.png`)), "the 3 generated PNGs = the CLI's");
  const dl = await page.$eval("#results a", (a) => a.href);
  const fetched = Buffer.from(await (await page.request.get(dl)).body());
  check(fetched.equals(readFileSync(join(work, "many/5-000000.png"))), "the download link gives the same PNG");
  if (shots) await page.screenshot({ path: join(shots, "ui-generate.png"), fullPage: true });

  // 2. Paint a mask on the first result and inpaint.
  await page.click("#results img >> nth=0");
  await page.waitForFunction(() => document.getElementById("img").width > 0);
  const box = await page.locator("#mask").boundingBox();
  await page.fill("#brush", "10");
  await page.mouse.move(box.x + box.width * 0.6, box.y + box.height * 0.2);
  await page.mouse.down();
  for (let k = 0; k <= 10; k++) await page.mouse.move(box.x + box.width * (0.6 + 0.03 * k), box.y + box.height * (0.2 + 0.06 * k));
  await page.mouse.up();
  posted.length = 0;
  await page.click("#inpaint");
  await page.waitForFunction(() => document.getElementById("after").src.startsWith("data:"), null, { timeout: 60000 });
  const inpaintBody = JSON.parse(posted.find((p) => p.url.includes("type=inpaint")).body);
  writeFileSync(join(work, "mask.png"), Buffer.from(inpaintBody.mask, "base64"));
  cli("inpaint", "--image", "many/5-000000.png", "--mask", "mask.png", "--seed", "5", "--steps", "5", "-o", "inpainted.png");
  const after = await page.$eval("#after", (i) => i.src.split(",")[1]);
  check(same(after, "inpainted.png"), "painting a mask and inpainting = the CLI's inpaint with that mask");
  check(!same(after, "many/5-000000.png"), "the painted region was regenerated");
  if (shots) await page.screenshot({ path: join(shots, "ui-inpaint.png"), fullPage: true });

  // 3. Outpaint 4 tokens to the right.
  await page.fill("#xr", "4");
  await page.click("#outpaint");
  await page.waitForFunction(() => document.getElementById("after").naturalWidth > document.getElementById("img").width, null, { timeout: 60000 });
  const wide = await page.$eval("#after", (i) => i.src.split(",")[1]);
  const px = await page.evaluate(() => document.getElementById("img").width / 8 * 4);
  cli("outpaint", "--image", "many/5-000000.png", "--extend", `right=${px}`, "--seed", "5", "--steps", "5", "-o", "wide.png");
  check(same(wide, "wide.png"), "outpainting = the CLI's outpaint");

  // 4. Watch a longer generation reveal itself (one event per transformer call), then cancel it:
  // it ends as cancelled, and the worker stops.
  await page.fill("#count", "16"); await page.fill("#steps", "64"); await page.fill("#grid", "");
  await page.evaluate(() => { window.seen = []; });
  await page.click("#go");
  const distinct = "new Set(window.seen.filter((t) => t.startsWith('running: transformer call'))).size";
  await page.waitForFunction(`${distinct} >= 3`, null, { timeout: 60000 }).catch(() => {});
  const shown = await page.evaluate(distinct);
  check(shown >= 3, `progress shown live, call by call (${shown} distinct transformer calls before cancelling)`);
  await page.click("#cancel");
  await page.waitForFunction(() => document.getElementById("error").textContent === "cancelled", null, { timeout: 10000 });
  const status = await (await page.request.get(`${base}/v1/jobs/${created.at(-1)}`)).json();
  check(status.state === "cancelled" && status.step < 64, `the job's state is cancelled, after ${status.step} of 64 calls`);
  const metrics = await (await page.request.get(base + "/metrics")).text();
  check(/absorb_jobs_cancelled_total 1\b/.test(metrics), "cancellation counted on /metrics");
  check(await page.locator("#go").isEnabled(), "the page is usable again after cancelling");
  check(consoleErrors.length === 0, `no script errors on the page (${consoleErrors.join("; ")})`);
} finally {
  await browser.close();
  server.kill("SIGTERM");
}
console.log(failures === 0 ? "browser test passed" : `browser test: ${failures} checks failed`);
process.exit(failures === 0 ? 0 : 1);
