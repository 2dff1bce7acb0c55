-- wrk script for (b), (c), (d) and the legitimate traffic of (f): per-request headers from
-- a file, one line per consumer, whitespace-separated columns, one header per column.
--
--   wrk -t1 -c64 -d10s -s bench/lua/lines.lua http://127.0.0.1:PORT/ -- \
--       FILE PATH MODE NTHREADS DELAY_MS HEADER1 [HEADER2 ...]
--
--   FILE      e.g. tokens.txt ("key token" per line)
--   PATH      request path, e.g. /stepup
--   MODE      rr (round-robin over the lines) or random (a random line per request)
--   NTHREADS  wrk's -t: thread i takes lines i, i + NTHREADS, ... (each line one thread)
--   DELAY_MS  0, or a pause per connection before each request (paces the load)
--   HEADERn   the header each column goes into, e.g. X-Api-Key X-Step-Up-Token
--
-- Every request is formatted once in init(), so wrk spends no time building them.

local next_id = 0
function setup(thread)
    thread:set("id", next_id)
    next_id = next_id + 1
end

local reqs, n, i, random_mode = {}, 0, 0, false

function init(args)
    local file, path, mode, nthreads, delay_ms = args[1], args[2], args[3], tonumber(args[4]), tonumber(args[5])
    local headers = {}
    for k = 6, #args do headers[#headers + 1] = args[k] end
    assert(file and path and (mode == "rr" or mode == "random") and nthreads and delay_ms and #headers > 0,
        "usage: -- FILE PATH rr|random NTHREADS DELAY_MS HEADER1 [HEADER2 ...]")
    random_mode = mode == "random"
    local line_no = 0
    for line in io.lines(file) do
        if line:match("%S") then
            if line_no % nthreads == id then
                local h, col = {}, 0
                for field in line:gmatch("%S+") do
                    col = col + 1
                    if headers[col] then h[headers[col]] = field end
                end
                assert(col >= #headers, "too few columns in " .. file .. ": " .. line_no + 1)
                n = n + 1
                reqs[n] = wrk.format("GET", path, h)
            end
            line_no = line_no + 1
        end
    end
    assert(n > 0, "no lines for thread " .. id .. " in " .. file)
    math.randomseed(os.time() * 1000 + id)
    i = (id * 7919) % n   -- threads start at different places
    if delay_ms > 0 then
        function delay() return delay_ms end
    end
end

function request()
    if random_mode then
        return reqs[math.random(n)]
    end
    i = i % n + 1
    return reqs[i]
end
