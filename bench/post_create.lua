-- wrk script: POST /v1/runs with a fixed body; prints one JSON line of results.
-- Usage: wrk -t2 -c64 -d10s -s bench/post_create.lua http://127.0.0.1:PORT/v1/runs
wrk.method = "POST"
-- BENCH_BODY (set by create_throughput.py --seconds) overrides the body.
wrk.body = os.getenv("BENCH_BODY") or '{"task":"sleep","input":{"seconds":0}}'
wrk.headers["Content-Type"] = "application/json"

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
