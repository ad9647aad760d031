// Debian's Chromium for the browser tests (ohif/drive.mjs, page/drive.mjs), driven by
// playwright-core. As root it needs --no-sandbox; the other flags keep it from calling home or
// doing first-run work.
export const ARGS = [
  '--no-sandbox',
  '--disable-gpu',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--no-first-run',
];

// A headless persistent context on plan.chromium with plan.userDataDir.
export function launch(chromium, plan, { viewport, timeout }) {
  return chromium.launchPersistentContext(plan.userDataDir, {
    executablePath: plan.chromium,
    headless: true,
    args: ARGS,
    viewport,
    timeout,
  });
}
