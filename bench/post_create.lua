-- wrk script: POST /v1/runs with a fixed body; prints one JSON line of results.
-- Usage: wrk -t2 -c64 -d10s -s bench/post_create.lua http://127.0.0.1:PORT/v1/runs
-- BENCH_BODY overrides the body. With BENCH_KEY_PREFIX set, every request carries its
-- own Idempotency-Key: "<prefix>-<thread>-<n>" (support.wrk sets both).
wrk.method = "POST"
wrk.body = os.getenv("BENCH_BODY") or '{"task":"sleep","input":{"seconds":0}}'
wrk.headers["Content-Type"] = "application/json"

local prefix = os.getenv("BENCH_KEY_PREFIX")
local threads = 0

function setup(thread)
  threads = threads + 1
  thread:set("thread_number", threads)
end

if prefix then
  local sent = 0
  local headers = { ["Content-Type"] = "application/json" }
  function request()
    sent = sent + 1
    headers["Idempotency-Key"] = string.format("%s-%d-%d", prefix, thread_number, sent)
    return wrk.format(nil, nil, headers)
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_RESULT {"requests":%d,"duration_us":%d,"bytes":%d,"non_2xx_3xx":%d,' ..
    '"connect_errors":%d,"read_errors":%d,"write_errors":%d,"timeouts":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d}\n',
    summary.requests, summary.duration, summary.bytes, e.status,
    e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
