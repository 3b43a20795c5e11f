import { openDiskSource, sharedFileOf } from "./lib/io/disk_source.ts";
import { planDiffJob, runDiffJob, COMPARE } from "./lib/export/diff_scan.ts";
const [s, b] = [await openDiskSource("/tmp/bw/full.raw"), await openDiskSource("/tmp/bw/base.raw")];
const cs = 65536, n = s.size / cs;
for (let i = 0; i < 4; i++) {
  const { job } = planDiffJob([[0, n - 1, COMPARE]], cs, [s.size, b.size])!;
  const t = performance.now();
  const r = await runDiffJob(job, [s, b], [sharedFileOf(s)!, sharedFileOf(b)!], () => {});
  let c = 0; for (const _ of r.clusters) c++;
  console.log("diff scan", (performance.now() - t).toFixed(0), "ms", c, "changed, helper chunks", r.helperChunks);
}
