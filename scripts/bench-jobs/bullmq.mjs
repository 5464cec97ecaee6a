// The BullMQ side of `just bench-jobs` (scripts/bench-jobs.sh runs it beside
// crates/jobs/examples/bench_jobs.rs): the same no-op jobs, the same batches
// and the same concurrency as keel, on the local Redis. Prints one JSON line.
//
// - throughput: a Worker (concurrency BENCH_CONCURRENCY, a processor that
//   does nothing) runs while the same process adds BENCH_JOBS jobs with
//   Queue.addBulk in batches of BENCH_BATCH; the clock stops when the worker
//   has reported every job completed (its 'completed' event comes after
//   BullMQ's moveToFinished script, so the job is completed in Redis).
// - idle latency: with the queue empty, BENCH_SAMPLES single jobs, one at a
//   time with BENCH_GAP_MS between them: from the start of Queue.add to the
//   start of the processor.
// - CPU: this process (process.cpuUsage) and redis-server (utime+stime of
//   /proc/PID/stat, PID from REDIS_PID or Redis's INFO) over the throughput run.
//
// Every phase has a deadline; a missed one exits non-zero.
import { readFileSync } from 'node:fs';
import { performance } from 'node:perf_hooks';
import { Queue, Worker } from 'bullmq';
import IORedis from 'ioredis';

const env = (name, fallback) => {
  const value = process.env[name] ?? fallback;
  if (!/^[0-9]+$/.test(String(value))) {
    throw new Error(`${name} must be a whole number, not ${value}`);
  }
  return Number(value);
};
const redisUrl = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379';
const total = env('BENCH_JOBS', 50000);
const batch = env('BENCH_BATCH', 1000);
const concurrency = env('BENCH_CONCURRENCY', 50);
const samples = env('BENCH_SAMPLES', 200);
const gapMs = env('BENCH_GAP_MS', 5);
const deadlineMs = env('BENCH_DEADLINE_S', 120) * 1000;
let redisPid = process.env.REDIS_PID;

const ticks = 100; // USER_HZ: /proc/PID/stat counts CPU in 1/100 s
const redisCpu = () => {
  if (!redisPid) return null;
  const fields = readFileSync(`/proc/${redisPid}/stat`, 'utf8').split(') ')[1].split(' ');
  // utime and stime are fields 14 and 15 of stat; 12 and 13 after "pid (comm) ".
  return (Number(fields[11]) + Number(fields[12])) / ticks;
};
const fail = (message) => {
  console.error(`bench-jobs (bullmq): FAIL: ${message}`);
  process.exit(1);
};
const percentile = (sorted, p) => (sorted.length ? sorted[Math.round((sorted.length - 1) * p)] : 0);

// A queue of the run's own (and a prefix of the bench's own), removed at the end.
const prefix = 'keel-bench-jobs';
const name = `noop-${process.pid}-${Date.now()}`;
// BullMQ requires maxRetriesPerRequest: null on a Worker's connection.
const connection = new IORedis(redisUrl, { maxRetriesPerRequest: null });
const queue = new Queue(name, { connection, prefix });
// The Redis is on this machine (the script checks): its pid from INFO.
if (!redisPid) {
  redisPid = /process_id:(\d+)/.exec(await connection.info('server'))?.[1];
}

let completed = 0;
let onCompleted = null;
const probes = new Map(); // sample number -> resolve(start time)
const worker = new Worker(
  name,
  async (job) => {
    if (job.name === 'probe') {
      const at = performance.now();
      probes.get(job.data.sample)?.(at);
    }
  },
  { connection, prefix, concurrency, autorun: false },
);
worker.on('completed', () => {
  completed += 1;
  if (completed === total && onCompleted) onCompleted();
});
worker.on('error', (error) => console.error(`bench-jobs (bullmq): worker error: ${error.message}`));
worker.run();
await worker.waitUntilReady();
await queue.waitUntilReady();

const within = (promise, ms, what) =>
  Promise.race([promise, new Promise((_, reject) => setTimeout(() => reject(new Error(`${what} took over ${ms} ms`)), ms))]);

// --- throughput ----------------------------------------------------------------
const allDone = new Promise((resolve) => {
  onCompleted = resolve;
});
const cpuBefore = process.cpuUsage();
const redisBefore = redisCpu();
const started = performance.now();
for (let first = 0; first < total; first += batch) {
  const jobs = [];
  for (let n = first; n < Math.min(total, first + batch); n += 1) {
    jobs.push({ name: 'noop', data: { n } });
  }
  await queue.addBulk(jobs);
}
const enqueued = performance.now();
try {
  await within(allDone, deadlineMs, `completing ${total} jobs`);
} catch (error) {
  fail(`${error.message} (${completed} completed)`);
}
const finished = performance.now();
const cpu = process.cpuUsage(cpuBefore);
const redisAfter = redisCpu();
onCompleted = null;

// --- idle latency --------------------------------------------------------------
const latencies = [];
for (let sample = 0; sample < samples; sample += 1) {
  const start = new Promise((resolve) => probes.set(sample, resolve));
  const sent = performance.now();
  await queue.add('probe', { sample });
  try {
    latencies.push((await within(start, 10000, `probe ${sample}`)) - sent);
  } catch (error) {
    fail(error.message);
  }
  probes.delete(sample);
  await new Promise((resolve) => setTimeout(resolve, gapMs));
}
latencies.sort((a, b) => a - b);

await worker.close();
await queue.obliterate({ force: true });
await queue.close();
await connection.quit();

const seconds = (finished - started) / 1000;
console.log(
  JSON.stringify({
    system: 'bullmq',
    jobs: total,
    batch,
    concurrency,
    seconds,
    rate: total / seconds,
    enqueue_seconds: (enqueued - started) / 1000,
    cpu_self_s: (cpu.user + cpu.system) / 1e6,
    cpu_store_s: redisBefore === null ? null : redisAfter - redisBefore,
    p50_ms: percentile(latencies, 0.5),
    p99_ms: percentile(latencies, 0.99),
    max_ms: latencies.at(-1) ?? 0,
    samples: latencies.length,
  }),
);
