-- wrk script for scripts/bench.py: sends one fixed request over and over and prints a
-- one-line JSON summary (prefixed "BENCH ") that bench.py parses.
--   BENCH_METHOD  request method (default POST)
--   BENCH_BODY    request body (default none); sent with Content-Type: application/json
local method = os.getenv("BENCH_METHOD") or "POST"
local body = os.getenv("BENCH_BODY")

wrk.method = method
if body ~= nil and body ~= "" then
  wrk.body = body
  wrk.headers["Content-Type"] = "application/json"
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests": %d, "duration_us": %d, "non2xx": %d, "connect_errors": %d, '
    .. '"read_errors": %d, "write_errors": %d, "timeouts": %d, "p50_us": %d, "p99_us": %d}\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
