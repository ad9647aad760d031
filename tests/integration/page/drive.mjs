// Loads the dicom-ai status page in headless Chromium and reports what it showed.
//
//   node drive.mjs PLAN.json RESULT.json
//
// PLAN: {url, chromium, userDataDir, nodeModules, timeoutMs, screenshot}
// RESULT: {status, title, text (the rendered text), html (the DOM as serialized), images:
//   [{src, alt, complete, naturalWidth, naturalHeight}], errors (page errors, console errors),
//   failed (responses >= 400), foreign (requests to any other origin), screenshot}
// Judging is the test's job (tests/integration/test_status_page.py); this script only looks.
// playwright-core is the one installed for tests/integration/ohif (same package-lock.json).
import fs from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { launch } from '../ohif/chromium.mjs';

const [planPath, resultPath] = process.argv.slice(2);
const plan = JSON.parse(fs.readFileSync(planPath, 'utf8'));
const { chromium } = createRequire(path.join(plan.nodeModules, 'x.js'))('playwright-core');

const context = await launch(chromium, plan, {
  viewport: { width: 1200, height: 900 },
  timeout: plan.timeoutMs,
});
const result = { errors: [], failed: [], foreign: [] };
try {
  const page = await context.newPage();
  const origin = new URL(plan.url).origin;
  page.on('pageerror', (err) => result.errors.push(`pageerror: ${err.message}`));
  page.on('console', (msg) => {
    if (msg.type() === 'error') {
      result.errors.push(`console.error: ${msg.text()}`);
    }
  });
  page.on('request', (req) => {
    if (new URL(req.url()).origin !== origin) {
      result.foreign.push(req.url());
    }
  });
  page.on('response', (rsp) => {
    if (rsp.status() >= 400) {
      result.failed.push(`${rsp.status()} ${new URL(rsp.url()).pathname}`);
    }
  });
  const response = await page.goto(plan.url, { waitUntil: 'load', timeout: plan.timeoutMs });
  result.status = response.status();
  // Lazy images below the fold load once scrolled to; a reader scrolls, so does this.
  await page.evaluate(() => window.scrollTo(0, document.body.scrollHeight));
  await page.waitForFunction(() => [...document.images].every((img) => img.complete),
    null, { timeout: plan.timeoutMs });
  await page.evaluate(() => window.scrollTo(0, 0));
  result.title = await page.title();
  result.text = await page.evaluate(() => document.body.innerText);
  result.html = await page.content();
  result.images = await page.$$eval('img', (imgs) => imgs.map((img) => ({
    src: new URL(img.src).pathname,
    alt: img.alt,
    complete: img.complete,
    naturalWidth: img.naturalWidth,
    naturalHeight: img.naturalHeight,
  })));
  if (plan.screenshot) {
    await page.screenshot({ path: plan.screenshot, fullPage: true });
    result.screenshot = plan.screenshot;
  }
} catch (err) {
  result.fatal = String(err.message).split('\n')[0];
} finally {
  fs.writeFileSync(resultPath, JSON.stringify(result, null, 1));
  await context.close();
}
