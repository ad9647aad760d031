// Opens studies in OHIF Viewer as a radiologist would and reports what the page showed.
//
//   node drive.mjs PLAN.json RESULT.json
//
// PLAN: {baseUrl, chromium, userDataDir, nodeModules, timeoutMs, budgetMs, studies: [{studyInstanceUID,
//   seriesCount, images: [{seriesInstanceUID}], segmentations: [{seriesInstanceUID}],
//   reports: [{seriesInstanceUID, screenshot?}]}]}
// RESULT: one entry per study: the errors the page and its console reported, every thumbnail's
// text, whether each image series rendered, and for each SR the measurements OHIF read from it
// and the viewport's text at every step of its next/previous arrows. Judging is the test's job
// (tests/integration/test_ohif.py); this script only looks.
import fs from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { launch } from './chromium.mjs';

const [planPath, resultPath] = process.argv.slice(2);
const plan = JSON.parse(fs.readFileSync(planPath, 'utf8'));
const { chromium } = createRequire(path.join(plan.nodeModules, 'x.js'))('playwright-core');
// Every wait is bounded by timeoutMs and by what is left of budgetMs for the whole session, so
// the script reports (if only "budget spent") before the test's outer timeout kills it.
// Each study gets an equal share of what is left when it starts, so one that hangs cannot starve
// the rest.
const deadline = Date.now() + plan.budgetMs;
let studyDeadline = deadline;
const left = () => Math.max(1000, Math.min(plan.timeoutMs, studyDeadline - Date.now()));

const context = await launch(chromium, plan, {
  viewport: { width: 1400, height: 900 },
  timeout: left(),
});
// The onboarding tour covers the study panel on a first visit; a returning user has dismissed it.
await context.addInitScript(() => {
  localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']));
});

/** The default viewport's state: its image and the text drawn over it (SR labels are SVG text). */
async function viewportState(page) {
  return page.evaluate(() => {
    // A label counts as shown only when a reader can read it: wholly inside the viewport pane
    // and not overlapping another label (each label box is one SVG text element).
    const readableTexts = (pane) => {
      const boxes = [...(pane?.querySelectorAll('svg text') ?? [])]
        .map((t) => ({ text: t.textContent, r: t.getBoundingClientRect() }));
      const p = pane?.getBoundingClientRect();
      const overlaps = (a, b) => a.left < b.right && b.left < a.right && a.top < b.bottom
        && b.top < a.bottom;
      return boxes.filter(({ r }, i) => r.width > 0 && r.left >= p.left && r.right <= p.right
        && r.top >= p.top && r.bottom <= p.bottom
        && boxes.every((other, j) => j === i || !overlaps(r, other.r))).map((b) => b.text);
    };
    const viewport = window.cornerstone?.getRenderingEngines?.()
      .flatMap((engine) => engine.getViewports())
      .find((v) => v.id === 'default');
    const pane = document.querySelector('[data-cy="viewport-pane"]');
    // Painted: the share of non-black pixels on the viewport's 2D canvas (cornerstone copies
    // each rendered frame there). An image that failed to render leaves it black.
    let painted = 0;
    const canvas = pane?.querySelector('canvas.cornerstone-canvas');
    const ctx = canvas?.width ? canvas.getContext('2d') : null;
    if (ctx) {
      const { data } = ctx.getImageData(0, 0, canvas.width, canvas.height);
      let lit = 0;
      let all = 0;
      for (let i = 0; i < data.length; i += 4 * 97) {
        all += 1;
        lit += data[i] + data[i + 1] + data[i + 2] > 30 ? 1 : 0;
      }
      painted = lit / all;
    }
    return {
      imageId: viewport?.getCurrentImageId?.() ?? null,
      painted,
      texts: readableTexts(pane),
      textsInDom: [...(pane?.querySelectorAll('svg text') ?? [])].length,
    };
  });
}

/** Polls `condition` (an async function) until it is true or `ms` have passed. */
async function until(condition, ms) {
  const deadline = Date.now() + ms;
  for (;;) {
    if (await condition()) {
      return true;
    }
    if (Date.now() > deadline) {
      return false;
    }
    await new Promise((resolve) => { setTimeout(resolve, 200); });
  }
}

/** How long attached annotations may stay undrawn before the study is opened again. */
const UNDRAWN_MS = 10000;
/** How many times such a study is opened again. */
const REVISITS = 2;

/** A viewport shows a picture once at least this share of its canvas is not black. */
const PAINTED = 0.01;

/** Display set instance UIDs by Series Instance UID, from OHIF's display set service. */
async function displaySets(page) {
  return page.evaluate(() => {
    const out = {};
    for (const ds of window.services.displaySetService.getActiveDisplaySets()) {
      (out[ds.SeriesInstanceUID] ??= []).push(ds.displaySetInstanceUID);
    }
    return out;
  });
}

async function openSeries(page, dsUids, seriesInstanceUID) {
  const [dsUid] = dsUids[seriesInstanceUID] ?? [];
  if (!dsUid) {
    return false;
  }
  await page.locator(`[id="thumbnail-${dsUid}"]`).dblclick({ timeout: left() });
  return dsUid;
}

async function visitImageSeries(page, dsUids, image) {
  const entry = { seriesInstanceUID: image.seriesInstanceUID, rendered: false };
  if (!(await openSeries(page, dsUids, image.seriesInstanceUID))) {
    entry.error = 'no thumbnail';
    return entry;
  }
  entry.rendered = await until(async () => {
    const state = await viewportState(page);
    return state.imageId?.includes(`/series/${image.seriesInstanceUID}/`)
      && state.painted >= PAINTED;
  }, left());
  entry.painted = (await viewportState(page)).painted;
  return entry;
}

async function visitSegmentation(page, dsUids, seg) {
  const entry = { seriesInstanceUID: seg.seriesInstanceUID, loaded: false, segments: 0 };
  const dsUid = await openSeries(page, dsUids, seg.seriesInstanceUID);
  if (!dsUid) {
    entry.error = 'no thumbnail';
    return entry;
  }
  // Loaded: OHIF has read the SEG and handed its segments to the segmentation service, which
  // overlays them on the referenced series.
  const segments = () => page.evaluate((uid) => {
    const ds = window.services.displaySetService.getDisplaySetByUID(uid);
    const all = window.services.segmentationService.getSegmentations?.() ?? [];
    return ds?.isLoaded ? all.reduce((n, s) => n + Object.keys(s.segments ?? {}).length, 0) : 0;
  }, dsUid);
  entry.loaded = await until(async () => (await segments()) > 0, left());
  entry.segments = await segments();
  return entry;
}

/** Asks the default viewport for one render when cornerstoneTools holds annotations for it
 * (what a reader's pan or zoom gives); whether it did. */
async function requestRender(page) {
  return page.evaluate(() => {
    const v = window.cornerstone.getRenderingEngines().flatMap((e) => e.getViewports())
      .find((vp) => vp.id === 'default');
    const annotations = window.cornerstoneTools?.annotation?.state?.getAllAnnotations?.();
    if (!v || !annotations?.length) {
      return false;
    }
    v.render();
    return true;
  });
}

async function visitReport(page, dsUids, report, errors) {
  const entry = { seriesInstanceUID: report.seriesInstanceUID, steps: [], measurements: null };
  const dsUid = await openSeries(page, dsUids, report.seriesInstanceUID);
  if (!dsUid) {
    entry.error = 'no thumbnail';
    return entry;
  }
  try {
    // Loaded: OHIF has parsed the content tree into measurements (or failed, which the error
    // listeners record). Then each measurement is drawn once its image is in the viewport.
    await page.waitForFunction((uid) => {
      const ds = window.services.displaySetService.getDisplaySetByUID(uid);
      return ds?.isLoaded === true;
    }, dsUid, { timeout: left() });
    entry.measurements = await page.evaluate((uid) => {
      const ds = window.services.displaySetService.getDisplaySetByUID(uid);
      return ds.measurements.map((m) => ({
        trackingIdentifier: m.TrackingIdentifier ?? null,
        labels: (m.labels ?? []).map((l) => [l.label, l.value]),
        graphicType: m.coords?.[0]?.GraphicType ?? null,
        valueType: m.coords?.[0]?.ValueType ?? null,
        loaded: m.loaded === true,
        imageId: m.imageId ?? null,
      }));
    }, dsUid);
    // OHIF attaches measurements to images after `isLoaded` (and crashes there on content it
    // cannot place): wait until every one is attached or an error has been reported.
    const before = errors.length;
    const loaded = () => page.evaluate((uid) => {
      const ds = window.services.displaySetService.getDisplaySetByUID(uid);
      return ds.measurements.map((m) => [m.loaded === true, m.imageId ?? null]);
    }, dsUid);
    await until(async () => errors.length > before
      || (await loaded()).every(([isLoaded]) => isLoaded), left());
    for (const [i, [isLoaded, imageId]] of (await loaded()).entries()) {
      Object.assign(entry.measurements[i], { loaded: isLoaded, imageId });
    }
    const drawn = entry.measurements.filter((m) => m.loaded && m.imageId).length;
    if (drawn > 0) {
      // OHIF sometimes paints the image before the SR's annotations are in the tool state and
      // draws them only on the viewport's next render; any pan, zoom or resize by the reader
      // gives one. In Chromium 156 a pointer moving over the image no longer does, so the
      // driver asks the viewport for that one render (recorded) when the annotations are in
      // cornerstoneTools' state and still not drawn after a moment. Seen on most visits when
      // several studies are opened in one browser, on none when a study is opened alone.
      const texts = async () => (await viewportState(page)).textsInDom > 0;
      if (!(await until(texts, Math.min(left(), 2000)))) {
        entry.renderRequested = await requestRender(page);
      }
      entry.undrawn = !(await until(texts, Math.min(left(), UNDRAWN_MS)));
    }
    entry.steps.push(await viewportState(page));
    if (report.screenshot) {
      await page.screenshot({ path: report.screenshot });
    }
    // Step through every measurement with the viewport's "next" arrow, once round and back to
    // the first. OHIF's SR viewport starts at measurement 0 and a step shows measurement
    // i + 1's image (extension-cornerstone ViewportActionArrows → setViewReference).
    const arrow = page.locator('[data-cy="viewport-action-arrows-right"]');
    const all = entry.measurements;
    if (drawn > 0) {
      for (let i = 0; i < all.length; i += 1) {
        await arrow.click({ timeout: left() });
        const index = (i + 1) % all.length;
        // Reached: the viewport shows the measurement's image and, when it has a label, that
        // label. The labels of the image before stay in the SVG until the next render, so
        // "some text" alone can be the previous image's (seen on a loaded machine).
        const want = { imageId: all[index].imageId, label: all[index].labels[0]?.[0] ?? '' };
        const shows = (ms) => page.waitForFunction(({ imageId, label }) => {
          const v = window.cornerstone.getRenderingEngines().flatMap((e) => e.getViewports())
            .find((vp) => vp.id === 'default');
          const texts = [...document.querySelectorAll('[data-cy="viewport-pane"] svg text')]
            .map((t) => t.textContent);
          return v?.getCurrentImageId?.() === imageId && texts.length > 0
            && (!label || texts.some((t) => t.includes(label)));
        }, want, { timeout: ms }).then(() => true, () => false);
        let reached = await shows(Math.min(left(), 2000));
        const step = { measurement: index };
        if (!reached) {
          // As on opening the report: the one render a reader's pan or zoom would give.
          step.renderRequested = await requestRender(page);
          reached = await shows(Math.min(left(), UNDRAWN_MS));
        }
        entry.steps.push({ ...(await viewportState(page)), ...step, reached });
        if (!reached) {
          break;
        }
      }
    }
  } catch (err) {
    entry.error = String(err.message).split('\n')[0];
    if (report.screenshot) {
      await page.screenshot({ path: report.screenshot });
    }
  }
  return entry;
}

async function visitStudy(study) {
  const page = await context.newPage();
  const started = Date.now();
  const result = { studyInstanceUID: study.studyInstanceUID, errors: [], http: [] };
  page.on('pageerror', (err) => result.errors.push(`pageerror: ${err.stack ?? err}`));
  page.on('console', (msg) => {
    // OHIF's React error boundary logs what it caught at debug level.
    if (msg.type() === 'error' || msg.text().includes('Error Boundary')) {
      result.errors.push(`console.${msg.type()}: ${msg.text()}`);
    }
  });
  page.on('response', (rsp) => {
    if (rsp.status() >= 400) {
      result.http.push(`${rsp.status()} ${rsp.url()}`);
    }
  });
  try {
    const url = `${plan.baseUrl}/viewer?StudyInstanceUIDs=${study.studyInstanceUID}`;
    await page.goto(url, { timeout: left() });
    await page.waitForFunction((n) => document.querySelectorAll('[id^="thumbnail-"]').length >= n,
      study.seriesCount, { timeout: left() });
    result.thumbnails = await page.$$eval('[id^="thumbnail-"]',
      (els) => els.map((e) => e.innerText.replace(/\s*\n\s*/g, ' | ')));
    // A reader waits for the first image before double-clicking anything; switching while it
    // loads aborts the load, which OHIF reports as an IMAGE_LOAD_ERROR of its own.
    result.firstImage = await until(async () => (await viewportState(page)).painted >= PAINTED,
      left());
    const dsUids = await displaySets(page);
    // The reports first, as a reader opens them on the study's first image; then each other
    // series.
    result.reports = [];
    for (const report of study.reports) {
      result.reports.push(await visitReport(page, dsUids, report, result.errors));
    }
    result.segmentations = [];
    for (const seg of study.segmentations) {
      result.segmentations.push(await visitSegmentation(page, dsUids, seg));
    }
    result.images = [];
    for (const image of study.images) {
      result.images.push(await visitImageSeries(page, dsUids, image));
    }
    // Error notifications OHIF showed the user (its toasts), in case no listener caught them.
    result.toasts = await page.$$eval('[data-sonner-toast]', (els) => els.map((e) => e.innerText));
  } catch (err) {
    result.fatal = String(err.message).split('\n')[0];
  } finally {
    result.seconds = (Date.now() - started) / 1000;
    await page.close();
  }
  return result;
}

const results = [];
try {
  for (const [i, study] of plan.studies.entries()) {
    studyDeadline = Date.now() + (deadline - Date.now()) / (plan.studies.length - i);
    let result = Date.now() < deadline ? await visitStudy(study)
      : { studyInstanceUID: study.studyInstanceUID, errors: [], http: [],
        fatal: `browser budget of ${plan.budgetMs} ms spent` };
    // The viewer's own render race (see visitReport), not our content: the measurements were
    // read and attached. At most two more visits, each in a fresh page, recorded in the result.
    const reopened = [];
    while ((result.reports ?? []).some((r) => r.undrawn) && reopened.length < REVISITS
      && Date.now() < deadline) {
      reopened.push(result.reports.filter((r) => r.undrawn).map((r) => r.seriesInstanceUID));
      studyDeadline = Date.now() + (deadline - Date.now()) / (plan.studies.length - i);
      result = { ...(await visitStudy(study)), reopenedAfterUndrawn: [...reopened] };
    }
    results.push(result);
    fs.writeFileSync(resultPath, JSON.stringify(results, null, 1));
  }
} finally {
  await context.close();
}
