-- graphql.lua at a fixed total rate (wrk2 is not in Debian; this is the closest wrk does).
--
-- wrk -s paced.lua <url> -- <mode> <orgs file> <nonce> <requests per second> <threads>
--
-- Each thread keeps its own schedule of send times (rate / threads per second) and delay()
-- holds each request until its slot. When the server falls behind, the connections are all
-- busy and requests go out late: that lateness is counted ("late" sends over 1 ms past their
-- slot, "max_lag_ms") because wrk's latency starts at the actual send (coordinated omission).
-- With enough idle connections and a small lag, the latency shown is the latency at the rate.

local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(dir .. "graphql.lua")

local ffi = require("ffi")
ffi.cdef([[
  typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
  int clock_gettime(int clock, bench_timespec *ts);
]])
local ts = ffi.new("bench_timespec")
local CLOCK_MONOTONIC = 1

local function now_ms()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, ts)
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end

local graphql_init = init

function init(args)
  graphql_init(args)
  local rate = tonumber(args[4])
  nthreads = tonumber(args[5] or "1")
  interval_ms = 1000 * nthreads / rate
  late, max_lag_ms = 0, 0
end

function delay()
  local now = now_ms()
  if next_slot == nil then
    -- Threads start their schedules staggered, so the total rate is even.
    next_slot = now + interval_ms * (tid - 1) / nthreads
  else
    next_slot = next_slot + interval_ms
  end
  local wait = next_slot - now
  if wait < -1 then
    late = late + 1
    max_lag_ms = math.max(max_lag_ms, -wait)
  end
  if wait <= 0 then
    return 0
  end
  return math.floor(wait + 0.5)
end
