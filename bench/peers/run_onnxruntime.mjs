// ONNX Runtime's CPU provider on the model and inputs mmdit_peers.py prepared.
//   node run_onnxruntime.mjs WORK_DIR ITERS THREADS
// Reads WORK_DIR/model.onnx, inputs.json and the inputs' .bin files; writes the prediction to
// WORK_DIR/ort_out.bin and prints one JSON line with the median milliseconds.
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import ort from 'onnxruntime-node';

const [work, iters = '10', threads = '2'] = process.argv.slice(2);
const session = await ort.InferenceSession.create(join(work, 'model.onnx'), {
  executionProviders: ['cpu'],
  intraOpNumThreads: Number(threads),
  interOpNumThreads: 1,
  executionMode: 'sequential',
  graphOptimizationLevel: 'all',
});
const feeds = {};
for (const { name, shape } of JSON.parse(readFileSync(join(work, 'inputs.json'), 'utf8'))) {
  const bytes = readFileSync(join(work, `${name}.bin`));
  const data = new Float32Array(bytes.buffer, bytes.byteOffset, bytes.byteLength / 4);
  feeds[name] = new ort.Tensor('float32', data, shape);
}
const warmup = 2;
const times = [];
let output;
for (let i = 0; i < warmup + Number(iters); ++i) {
  const start = performance.now();
  output = (await session.run(feeds)).prediction;
  if (i >= warmup) times.push(performance.now() - start);
}
writeFileSync(join(work, 'ort_out.bin'), Buffer.from(output.data.buffer, output.data.byteOffset, output.data.byteLength));
times.sort((a, b) => a - b);
const median = times.length % 2 ? times[(times.length - 1) / 2] : (times[times.length / 2 - 1] + times[times.length / 2]) / 2;
console.log(JSON.stringify({ peer: 'onnxruntime', version: ort.env.versions.common, threads: Number(threads), median_ms: median }));
