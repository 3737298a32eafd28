-- wrk script delivering a prepared burst of signed Stripe events, each exactly once.
--
-- wrk -t T -c T -s webhook.lua <url> -- <events file> <T>
--
-- The events file holds, per event: a line with the Stripe-Signature header, a line with
-- the body's length in bytes, then the body. Thread t (one connection each) sends events
-- t, t+T, t+2T, ... in order, so neighbours in the file are delivered concurrently; when its
-- share is answered the thread stops and prints "BENCH_THREAD_DONE" (wrk itself waits out its
-- -d duration: bench/wrk.py interrupts it when every thread is done). The burst's time is
-- from the first send to the last answer, on the monotonic clock. done() prints
-- "BENCH_JSON {...}".

local ffi = require("ffi")
ffi.cdef([[
  typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
  int clock_gettime(int clock, bench_timespec *ts);
]])
local ts = ffi.new("bench_timespec")

local function now_us()
  ffi.C.clock_gettime(1, ts)
  return tonumber(ts.tv_sec) * 1000000 + math.floor(tonumber(ts.tv_nsec) / 1000)
end

local threads = {}

function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end

function init(args)
  local f = assert(io.open(args[1], "rb"))
  local all = {}
  while true do
    local signature = f:read("*l")
    if not signature or signature == "" then
      break
    end
    local length = tonumber(f:read("*l"))
    all[#all + 1] = { signature, f:read(length) }
  end
  f:close()
  local nthreads = tonumber(args[2]) or 1
  mine = {}
  for i = tid, #all, nthreads do
    mine[#mine + 1] = all[i]
  end
  answered = 0
  first_send_us, last_answer_us = 0, 0
  status_2xx, status_4xx, status_5xx, other = 0, 0, 0, 0
  sample = ""
end

-- One connection per thread: requests and answers alternate, so the next event is the one
-- after the answered ones. request() itself moves nothing on: wrk calls it once more than it
-- sends (on the first thread, to check the script), and that call must not use up an event.
function request()
  if answered >= #mine then
    return wrk.format("GET", "/healthz")
  end
  if answered == 0 then
    first_send_us = now_us()
  end
  local event = mine[answered + 1]
  return wrk.format("POST", "/webhooks/stripe",
    { ["Content-Type"] = "application/json", ["Stripe-Signature"] = event[1] }, event[2])
end

function response(status, headers, body)
  if answered >= #mine then
    return
  end
  answered = answered + 1
  if status >= 200 and status < 300 then
    status_2xx = status_2xx + 1
  else
    if status >= 400 and status < 500 then
      status_4xx = status_4xx + 1
    elseif status >= 500 then
      status_5xx = status_5xx + 1
    else
      other = other + 1
    end
    if sample == "" then
      sample = status .. " " .. body:sub(1, 300)
    end
  end
  if answered >= #mine then
    last_answer_us = now_us()
    io.write("BENCH_THREAD_DONE\n")
    io.flush()
    wrk.thread:stop()
  end
end

local function json_string(s)
  return '"' .. s:gsub('[%c"\\]', function(c)
    return string.format("\\u%04x", c:byte())
  end) .. '"'
end

function done(summary, latency, requests)
  local t = { answered = 0, status_2xx = 0, status_4xx = 0, status_5xx = 0, other = 0 }
  local first_sample = ""
  local first, last = nil, 0
  for _, thread in ipairs(threads) do
    local f, l = thread:get("first_send_us") or 0, thread:get("last_answer_us") or 0
    if f > 0 and (first == nil or f < first) then
      first = f
    end
    last = math.max(last, l)
    for name, _ in pairs(t) do
      t[name] = t[name] + (thread:get(name) or 0)
    end
    local s = thread:get("sample")
    if first_sample == "" and s and s ~= "" then
      first_sample = s
    end
  end
  io.write(string.format(
    'BENCH_JSON {"duration_us":%d,"burst_us":%d,"requests":%d,"answered":%d,"status_2xx":%d,"status_4xx":%d,' ..
      '"status_5xx":%d,"other":%d,"latency_us":{"p50":%d,"p99":%d,"max":%d},"sample":%s}\n',
    summary.duration, (first and last > first) and (last - first) or 0, summary.requests, t.answered, t.status_2xx, t.status_4xx, t.status_5xx, t.other,
    latency:percentile(50), latency:percentile(99), latency.max, json_string(first_sample)
  ))
end
