-- wrk script for (e), the code path: each request takes the next unused "key code" pair
-- (X-Api-Key + X-OTP); when this thread's pairs are used up it stops (wrk.thread:stop()).
--
--   wrk -t1 -c64 -d10s -s bench/lua/codes.lua http://127.0.0.1:PORT/ -- FILE PATH NTHREADS
--
-- wrk calls request() once in thread 0 before the run to check the script (its result is
-- never sent); that call gets the first pair without consuming it.
--
-- wrk divides by the whole -d even when a thread stops early, so done() prints, per thread,
--   BENCH_CODES id=<thread> used=<pairs sent> first=<t> stop=<t or -> stray=<n>
-- with CLOCK_MONOTONIC seconds of the first request and of the moment the pairs ran out;
-- auth_report.py turns that into req/s. The request the exhausted connection still has to
-- return goes to /__bench_exhausted (no route: 404, not a credential failure; `stray`).

local ffi = require("ffi")
ffi.cdef [[
    typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
    int clock_gettime(int clk_id, bench_timespec *tp);
]]
local ts = ffi.new("bench_timespec")
local function now()
    ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
    return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
end

local threads, next_id = {}, 0
function setup(thread)
    thread:set("id", next_id)
    next_id = next_id + 1
    threads[#threads + 1] = thread
end

-- Globals: read back by done() through thread:get().
used, stray, t_first, t_stop = 0, 0, nil, nil
local reqs, n, exhausted_req, verified = {}, 0, nil, false

function init(args)
    local file, path, nthreads = args[1], args[2], tonumber(args[3])
    assert(file and path and nthreads, "usage: -- FILE PATH NTHREADS")
    local line_no = 0
    for line in io.lines(file) do
        local key, code = line:match("^(%S+)%s+(%S+)")
        if key then
            if line_no % nthreads == id then
                n = n + 1
                reqs[n] = wrk.format("GET", path, { ["X-Api-Key"] = key, ["X-OTP"] = code })
            end
            line_no = line_no + 1
        end
    end
    assert(n > 0, "no pairs for thread " .. id .. " in " .. file)
    exhausted_req = wrk.format("GET", "/__bench_exhausted")
end

function request()
    if id == 0 and not verified then
        verified = true -- wrk's verification call (script_verify_request)
        return reqs[1]
    end
    if used < n then
        if used == 0 then t_first = now() end
        used = used + 1
        return reqs[used]
    end
    if not t_stop then
        t_stop = now()
        wrk.thread:stop()
    end
    stray = stray + 1
    return exhausted_req
end

function done(summary, latency, requests)
    for _, t in ipairs(threads) do
        io.write(string.format("BENCH_CODES id=%d used=%d first=%s stop=%s stray=%d\n",
            t:get("id"), t:get("used") or 0, tostring(t:get("t_first") or "-"),
            tostring(t:get("t_stop") or "-"), t:get("stray") or 0))
    end
end
