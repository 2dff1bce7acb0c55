-- wrk script for the brute-force flood of (f): a known consumer's key (from FILE, one per
-- line) with a random, almost surely wrong, 6-digit X-OTP and a random client address in
-- X-Forwarded-For (10.0.0.0/8; the gateway trusts XFF from 127.0.0.1), on EVERY request,
-- so the failures count against the fake addresses and these consumers, never against
-- 127.0.0.1 (where the legitimate traffic comes from, without XFF).
--
--   wrk -t1 -c256 -d10s -s bench/lua/flood.lua http://127.0.0.1:PORT/ -- FILE PATH NTHREADS [DELAY_MS [POOL]]
--
-- DELAY_MS (default 0: flat out) paces the flood: each connection pauses that long before
-- each request, so the flood runs at a chosen rate instead of at whatever the CPU allows.
-- POOL (default 65536) requests per thread are formatted in init() and cycled through,
-- so wrk spends its time sending, not formatting.

local next_id = 0
function setup(thread)
    thread:set("id", next_id)
    next_id = next_id + 1
end

local reqs, n, i = {}, 0, 0

function init(args)
    local file, path, nthreads = args[1], args[2], tonumber(args[3])
    local delay_ms, pool = tonumber(args[4] or "0"), tonumber(args[5] or "65536")
    assert(file and path and nthreads and delay_ms and pool and pool > 0,
        "usage: -- FILE PATH NTHREADS [DELAY_MS [POOL]]")
    if delay_ms > 0 then
        function delay() return delay_ms end
    end
    local keys = {}
    for line in io.lines(file) do
        local key = line:match("^(%S+)")
        if key then keys[#keys + 1] = key end
    end
    assert(#keys > 0, "no keys in " .. file)
    math.randomseed(os.time() * 1000 + id * 7919)
    for k = 1, pool do
        reqs[k] = wrk.format("GET", path, {
            ["X-Api-Key"] = keys[math.random(#keys)],
            ["X-OTP"] = string.format("%06d", math.random(0, 999999)),
            ["X-Forwarded-For"] = string.format("10.%d.%d.%d",
                math.random(0, 255), math.random(0, 255), math.random(1, 254)),
        })
    end
    n = pool
    i = (id * 7919) % n
end

function request()
    i = i % n + 1
    return reqs[i]
end
