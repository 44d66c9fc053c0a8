// The page of `absorb serve` in a real browser (Debian's Chromium, headless, driven by
// playwright-core): generate while watching the progress events, paint a mask and inpaint,
// outpaint, vary, watch the live previews reveal a generation, cancel a running job, then the same
// on a phone's screen with touch; every PNG the page got must equal the CLI's for the same
// parameters. `make browser-test` runs it; SHOTS=DIR saves screenshots there.
//   node tests/browser/ui.mjs ABSORB_BIN MODEL_DIR [OTHER_MODEL_DIR...]   (the others: the model menu)
import { spawn, execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createRequire } from "node:module";

const require = createRequire(process.env.PLAYWRIGHT_DIR + "/");
const { chromium } = require("playwright-core");
const [bin, model, ...others] = process.argv.slice(2);
const work = mkdtempSync(join(tmpdir(), "absorb-ui-"));
const shots = process.env.SHOTS;
let failures = 0;
const check = (ok, what) => { console.log(`${ok ? "ok  " : "FAIL"} ${what}`); if (!ok) failures++; };
const cli = (...args) => execFileSync(bin, [...args, "-m", model], { cwd: work, stdio: ["ignore", "ignore", "inherit"] });
const same = (b64, file) => Buffer.from(b64, "base64").equals(readFileSync(join(work, file)));

// The service on a free port.
// With other bundles: all of them, the first the default (the page's model menu is tested on them).
const server = spawn(bin, ["serve", "-m", model, ...others.flatMap((o) => ["-m", o]), "--listen", "127.0.0.1:0"],
  { stdio: ["ignore", "ignore", "pipe"] });
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
  // And every live preview of the first image (its data URL), as the page shows it.
  await page.addInitScript(() => {
    window.seen = []; window.previews = [];
    new MutationObserver((changes) => {
      const t = document.getElementById("ptext");
      if (t) window.seen.push(t.textContent);
      for (const c of changes) {
        const live = document.querySelector("#results figure.live img");
        if (c.type === "attributes" && c.target === live && live.src) window.previews.push(live.src);
      }
    }).observe(document, { subtree: true, childList: true, characterData: true, attributes: true, attributeFilter: ["src"] });
  });
  // The share of an image's pixels that are the masked tokens' grey (128, 128, 128).
  const greyShare = (src) => page.evaluate(async (src) => {
    const im = new Image(); im.src = src; await im.decode();
    const c = document.createElement("canvas"); c.width = im.width; c.height = im.height;
    const x = c.getContext("2d"); x.drawImage(im, 0, 0);
    const d = x.getImageData(0, 0, c.width, c.height).data;
    let grey = 0;
    for (let i = 0; i < d.length; i += 4) if (d[i] === 128 && d[i + 1] === 128 && d[i + 2] === 128) grey++;
    return grey / (d.length / 4);
  }, src);
  const finals = "#results figure:not(.live) img";
  // The bodies the page posts, to run the CLI on exactly the same input.
  const posted = [], created = [];
  page.on("request", (r) => { if (r.method() === "POST") posted.push({ url: r.url(), body: r.postData() }); });
  page.on("response", async (r) => { if (r.request().method() === "POST" && r.status() === 202) created.push((await r.json()).id); });

  const r = await page.goto(base + "/");
  check(r.status() === 200 && (await page.title()) === "absorb", "GET / serves the page");
  await page.waitForFunction(() => document.getElementById("model").textContent.includes("bundle"));

  // 0. A class-conditional bundle's classes are offered (the digits: 0-9, or any).
  const classes = await page.$$eval("#class option", (os) => os.map((o) => o.value));
  const manifest = JSON.parse(readFileSync(join(model, "model.json"), "utf8"));
  check(JSON.stringify(classes) === JSON.stringify(["", ...(manifest.classes || [])]) && (await page.isVisible("#class")) === !!manifest.classes,
    `the class menu lists the bundle's classes (${classes.length - 1})`);
  // The sampler menu lists the samplers this build has (from /v1/model), the bundle's chosen.
  const samplers = await page.$$eval("#sampler option", (os) => os.map((o) => o.value));
  const served = (await (await fetch(base + "/v1/model")).json()).samplers.map((s) => s.name);
  check(samplers.length >= 3 && JSON.stringify(samplers) === JSON.stringify(served) &&
    (await page.inputValue("#sampler")) === (manifest.sampling.sampler || served[0]),
    `the sampler menu lists the build's samplers (${samplers.join(", ")}), the bundle's selected`);

  // 1. Generate, watching the reverse process.
  await page.fill("#seed", "5"); await page.fill("#count", "3"); await page.fill("#steps", "5"); await page.fill("#temp", "0.9");
  await page.click("#go");
  await page.waitForFunction((sel) => document.querySelectorAll(sel).length === 3, finals, { timeout: 60000 });
  check((await page.textContent("#ptext")).startsWith("done: "), "the progress line ends done");
  const pngs = await page.$$eval(finals, (imgs) => imgs.map((i) => i.src.split(",")[1]));
  cli("generate", "--seed", "5", "--count", "3", "--steps", "5", "-t", "0.9", "-o", "many/");
  check(pngs.every((p, i) => same(p, `many/5-${String(i).padStart(6, "0")}.png`)), "the 3 generated PNGs = the CLI's");
  if (manifest.classes) {
    // The same seed with a class chosen: the CLI's --class.
    await page.selectOption("#class", manifest.classes[3]);
    await page.click("#go");
    await page.waitForFunction((sel) => document.querySelectorAll(sel).length === 3 && document.getElementById("ptext").textContent.startsWith("done: ")
      && !document.getElementById("go").disabled, finals, { timeout: 60000 });
    const asked = await page.$$eval(finals, (imgs) => imgs.map((i) => i.src.split(",")[1]));
    cli("generate", "--seed", "5", "--count", "3", "--steps", "5", "-t", "0.9", "--class", manifest.classes[3], "-o", "class/");
    check(asked.every((p, i) => same(p, `class/5-${String(i).padStart(6, "0")}.png`)), "with a class chosen, the 3 PNGs = the CLI's --class");
    // Guidance, a class-conditional bundle's field: the CLI's --guidance.
    check(await page.isVisible("#guidance"), "a class-conditional bundle shows the guidance field");
    await page.fill("#guidance", "2");
    await page.click("#go");
    await page.waitForFunction((sel) => document.querySelectorAll(sel).length === 3 && document.getElementById("ptext").textContent.startsWith("done: ")
      && !document.getElementById("go").disabled, finals, { timeout: 60000 });
    const guided = await page.$$eval(finals, (imgs) => imgs.map((i) => i.src.split(",")[1]));
    cli("generate", "--seed", "5", "--count", "3", "--steps", "5", "-t", "0.9", "--class", manifest.classes[3], "--guidance", "2", "-o", "guided/");
    check(JSON.parse(posted.at(-1).body).guidance === 2 && guided.every((p, i) => same(p, `guided/5-${String(i).padStart(6, "0")}.png`))
      && !guided.every((p, i) => same(p, `class/5-${String(i).padStart(6, "0")}.png`)), "guidance 2 = the CLI's --guidance 2, not the unguided PNGs");
    await page.fill("#guidance", "");
    await page.selectOption("#class", "");
    // Back to the first results, which the steps below edit.
    await page.click("#go");
    await page.waitForFunction((sel) => document.querySelectorAll(sel).length === 3 && !document.getElementById("go").disabled, finals, { timeout: 60000 });
    const again = await page.$$eval(finals, (imgs) => imgs.map((i) => i.src.split(",")[1]));
    check(again.every((p, i) => same(p, `many/5-${String(i).padStart(6, "0")}.png`)), "no class again: the first PNGs");
  }
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
  await page.waitForFunction(() => document.getElementById("after").dataset.final, null, { timeout: 60000 });
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
  await page.waitForFunction(() => { const a = document.getElementById("after"); return a.dataset.final && a.complete && a.naturalWidth > document.getElementById("img").width; }, null, { timeout: 60000 });
  const wide = await page.$eval("#after", (i) => i.src.split(",")[1]);
  const px = await page.evaluate(() => document.getElementById("img").width / 8 * 4);
  cli("outpaint", "--image", "many/5-000000.png", "--extend", `right=${px}`, "--seed", "5", "--steps", "5", "-o", "wide.png");
  check(same(wide, "wide.png"), "outpainting = the CLI's outpaint");

  // 3b. Vary the same image at strength 0.3 with the slider.
  await page.fill("#strength", "0.3");
  check((await page.textContent("#strengthout")) === "0.3", "the strength slider shows its value");
  posted.length = 0;
  await page.click("#vary");
  await page.waitForFunction((w) => { const a = document.getElementById("after"); return a.dataset.final && a.src.split(",")[1] !== w; }, wide, { timeout: 60000 });
  const varyBody = JSON.parse(posted.find((p) => p.url.includes("type=vary")).body);
  const varied = await page.$eval("#after", (i) => i.src.split(",")[1]);
  cli("vary", "--image", "many/5-000000.png", "--strength", "0.3", "--seed", "5", "--steps", "5", "-o", "varied.png");
  check(varyBody.strength === 0.3 && same(varied, "varied.png"), "a variation at strength 0.3 = the CLI's vary");

  // 3c. The model menu: each other bundle, its own classes, its images the CLI's; then back.
  const otherManifests = others.map((dir) => JSON.parse(readFileSync(join(dir, "model.json"), "utf8")));
  if (others.length) {
    const names = await page.$$eval("#modelsel option", (os) => os.map((o) => o.value));
    check((await page.isVisible("#modelsel"))
      && JSON.stringify(names) === JSON.stringify([manifest.name, ...otherManifests.map((o) => o.name)]),
      `the model menu lists every bundle (${names.join(", ")})`);
  }
  for (const [i, other] of otherManifests.entries()) {
    const second = others[i];
    await page.selectOption("#modelsel", other.name);
    await page.waitForFunction((n) => document.getElementById("model").textContent.includes(`"${n}"`), other.name);
    const theirClasses = await page.$$eval("#class option", (os) => os.map((o) => o.value));
    check((await page.isVisible("#guidance")) === !!other.classes, `the guidance field is shown only for a class-conditional bundle ("${other.name}")`);
    check((await page.isVisible("#class")) === !!other.classes
      && JSON.stringify(theirClasses) === JSON.stringify(["", ...(other.classes || [])]),
      `the class menu follows the bundle (${theirClasses.length - 1} classes${other.classes ? ": " + other.classes.slice(0, 3).join(", ") + ", ..." : ""})`);
    if (other.classes) await page.selectOption("#class", other.classes.at(-1));
    await page.fill("#count", "1");
    await page.click("#go");
    await page.waitForFunction((sel) => document.querySelectorAll(sel).length === 1 && !document.getElementById("go").disabled, finals, { timeout: 60000 });
    const theirs = await page.$eval(finals, (i) => i.src.split(",")[1]);
    const body = JSON.parse(posted.filter((p) => p.url.includes("type=generate")).pop().body);
    const theirClass = other.classes ? ["--class", other.classes.at(-1)] : [];
    execFileSync(bin, ["generate", "-m", second, "--seed", "5", "--steps", "5", "-t", "0.9", "--sampler", body.sampler, ...theirClass, "-o", "other.png"],
      { cwd: work, stdio: ["ignore", "ignore", "inherit"] });
    check(body.model === other.name && same(theirs, "other.png"), `a generation with "${other.name}" chosen = the CLI's with that bundle`);
    if (other.classes) await page.selectOption("#class", "");
    await page.selectOption("#modelsel", manifest.name);
    await page.waitForFunction((n) => document.getElementById("model").textContent.includes(`"${n}"`), manifest.name);
    await page.fill("#count", "3");
  }

  // 4. Watch a longer generation reveal itself (one event per transformer call, a decoded
  // preview every few), then cancel it: it ends as cancelled, and the worker stops.
  await page.fill("#count", "16"); await page.fill("#steps", "64"); await page.fill("#grid", "");
  await page.evaluate(() => { window.seen = []; window.previews = []; });
  await page.click("#go");
  const distinct = "new Set(window.seen.filter((t) => t.startsWith('running: transformer call'))).size";
  await page.waitForFunction(`${distinct} >= 3 && window.previews.length >= 3`, null, { timeout: 60000 }).catch(() => {});
  if (shots) await page.screenshot({ path: join(shots, "ui-reveal.png"), fullPage: true });
  const shown = await page.evaluate(distinct);
  check(shown >= 3, `progress shown live, call by call (${shown} distinct transformer calls before cancelling)`);
  const previews = await page.evaluate(() => window.previews.slice());
  const shares = [];
  for (const src of previews) shares.push(await greyShare(src));
  // Never more grey, and less at the end: previews are paced by time, and the paper's sampler
  // may reveal none of the first image's tokens between two of them.
  check(previews.length >= 3 && shares[0] > 0.5 && shares.every((g, i) => i === 0 || g <= shares[i - 1])
    && shares.at(-1) < shares[0],
    `the image reveals itself: ${previews.length} live previews, grey share ${shares.map((g) => g.toFixed(2)).join(" >= ")}`);
  await page.click("#cancel");
  await page.waitForFunction(() => document.getElementById("error").textContent === "cancelled", null, { timeout: 10000 });
  const status = await (await page.request.get(`${base}/v1/jobs/${created.at(-1)}`)).json();
  check(status.state === "cancelled" && status.step < 64, `the job's state is cancelled, after ${status.step} of 64 calls`);
  const metrics = await (await page.request.get(base + "/metrics")).text();
  check(/absorb_jobs_cancelled_total 1\b/.test(metrics), "cancellation counted on /metrics");
  check(await page.locator("#go").isEnabled(), "the page is usable again after cancelling");
  check(consoleErrors.length === 0, `no script errors on the page (${consoleErrors.join("; ")})`);

  // 5. A phone: nothing wider than the screen; generate, pick a result, paint with a finger,
  // regenerate the painted region.
  const phone = await browser.newContext({ viewport: { width: 390, height: 844 }, deviceScaleFactor: 2, isMobile: true, hasTouch: true });
  const mobile = await phone.newPage();
  mobile.on("pageerror", (e) => consoleErrors.push(String(e)));
  await mobile.goto(base + "/");
  await mobile.waitForFunction(() => document.getElementById("model").textContent.includes("bundle"));
  const overflow = await mobile.evaluate(() => {
    const wide = [...document.querySelectorAll("input, select, button, canvas, section")]
      .filter((e) => { const r = e.getBoundingClientRect(); return r.left < 0 || r.right > window.innerWidth + 0.5; })
      .map((e) => e.id || e.tagName);
    return { scroll: document.documentElement.scrollWidth - window.innerWidth, wide };
  });
  check(overflow.scroll <= 0 && overflow.wide.length === 0, `on a 390 px phone nothing is wider than the screen (${JSON.stringify(overflow)})`);
  await mobile.fill("#seed", "8"); await mobile.fill("#count", "2"); await mobile.fill("#steps", "6");
  await mobile.tap("#go");
  await mobile.waitForFunction((sel) => document.querySelectorAll(sel).length === 2, finals, { timeout: 60000 });
  await mobile.tap("#results img >> nth=0");
  await mobile.waitForFunction(() => document.getElementById("img").width > 0);
  await mobile.locator("#stage").scrollIntoViewIfNeeded();
  const stage = await mobile.locator("#mask").boundingBox();
  await mobile.fill("#brush", "12");
  for (const [fx, fy] of [[0.3, 0.3], [0.5, 0.5], [0.7, 0.6]]) await mobile.touchscreen.tap(stage.x + stage.width * fx, stage.y + stage.height * fy);
  await mobile.tap("#inpaint");
  await mobile.waitForFunction(() => document.getElementById("after").dataset.final || document.getElementById("error").textContent, null, { timeout: 60000 });
  const phoneError = await mobile.textContent("#error");
  const phoneAfter = await mobile.$eval("#after", (i) => i.src.split(",")[1] || "");
  const phoneBefore = await mobile.$eval(finals, (i) => i.src.split(",")[1]);
  check(!phoneError && phoneAfter && phoneAfter !== phoneBefore, `on the phone, tapping paints a mask and the region is regenerated (${phoneError || "ok"})`);
  if (shots) await mobile.screenshot({ path: join(shots, "ui-phone.png"), fullPage: true });
  check(consoleErrors.length === 0, `no script errors on the phone (${consoleErrors.join("; ")})`);
} finally {
  await browser.close();
  server.kill("SIGTERM");
}
console.log(failures === 0 ? "browser test passed" : `browser test: ${failures} checks failed`);
process.exit(failures === 0 ? 0 : 1);
