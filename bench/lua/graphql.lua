-- wrk script for orgwallet's GraphQL workloads (and the /healthz floor).
--
-- wrk -s graphql.lua <url> -- <mode> <orgs file> <nonce>
--
-- Every request is a POST with VARIABLES (the query text never changes, so Strawberry's
-- parser and validation caches hit). Consumptions carry a unique idempotency key:
-- <nonce>-<thread>-<counter>. The organization of each request is drawn at random from the
-- orgs file (one "<global id> <api key>" per line), per thread.
--
-- Each response is classified (ok, user error, GraphQL error, HTTP error); done() prints one
-- line "BENCH_JSON {...}" with the counts and wrk's latency distribution, for bench/wrk.py.
--
-- Mode "prime" (args: prime <orgs file> <nonce> <walks>) is not measured: each thread reads
-- the balance of every organization in turn, <walks> times, starting at its own offset, then
-- prints "BENCH_THREAD_DONE" and stops, so that every server process has seen every API key
-- (what a server that has been up for a while knows) before the measured runs.

local Q = {
  consume = 'mutation Consume($org: ID!, $amount: BigInt!, $key: String!) { consumeTokens(input: {organizationId: $org, amount: $amount, idempotencyKey: $key}) { __typename ... on TokensConsumed { entry { id balanceAfter } wallet { balance } } ... on UserError { code } } }',
  balance = 'query Balance($org: ID!) { organization(id: $org) { wallet { balance reserved } } }',
  history = 'query History($org: ID!) { organization(id: $org) { wallet { ledger(first: 100) { edges { cursor node { id kind amount balanceAfter reason idempotencyKey createdAt } } pageInfo { hasNextPage endCursor } } } } }',
  typename = 'query Floor { __typename }',
}

-- What an answer of each mode must contain to count as ok.
local EXPECT = {
  consume = '"__typename":"TokensConsumed"',
  hot = '"__typename":"TokensConsumed"',
  insufficient = '"code":"INSUFFICIENT_TOKENS"',
  balance = '"balance":',
  history = '"hasNextPage":',
  typename = '"__typename":"Query"',
  healthz = '"ok"',
  prime = '"balance":',
}

local threads = {}

function setup(thread)
  table.insert(threads, thread)
  thread:set("tid", #threads)
end

function init(args)
  mode = args[1]
  local file = args[2]
  nonce = args[3] or "x"
  orgs = {}
  if file and file ~= "-" then
    for line in io.lines(file) do
      local gid, key = line:match("^(%S+)%s+(%S+)$")
      if gid then
        orgs[#orgs + 1] = { gid, "Bearer " .. key }
      end
    end
  end
  expect = EXPECT[mode]
  if not expect then
    error("unknown mode " .. tostring(mode))
  end
  math.randomseed(os.time() * 1000 + tid * 7919)
  counter = 0
  ok, user_errors, graphql_errors, http_errors = 0, 0, 0, 0
  sample = ""
  if mode == "prime" then
    prime_total = #orgs * tonumber(args[4] or "1")
    prime_offset = math.floor((tid - 1) * #orgs / 2)
    answered = 0
  end
end

local function body_of(query, variables)
  return '{"query":"' .. query .. '","variables":' .. variables .. "}"
end

function request()
  if mode == "healthz" then
    return wrk.format("GET", "/healthz")
  end
  local headers = { ["Content-Type"] = "application/json" }
  if mode == "typename" then
    return wrk.format("POST", "/graphql", headers, body_of(Q.typename, "{}"))
  end
  local org
  if mode == "prime" then
    org = orgs[(counter + prime_offset) % #orgs + 1]
    counter = counter + 1
  else
    org = orgs[math.random(#orgs)]
  end
  headers["Authorization"] = org[2]
  local body
  if mode == "prime" then
    body = body_of(Q.balance, string.format('{"org":"%s"}', org[1]))
  elseif mode == "consume" or mode == "hot" or mode == "insufficient" then
    counter = counter + 1
    -- 2^53-1 tokens: more than any wallet holds, so the ledger answers INSUFFICIENT_TOKENS.
    local amount = (mode == "insufficient") and "9007199254740991" or "1"
    body = body_of(Q.consume, string.format('{"org":"%s","amount":%s,"key":"%s-%d-%d"}', org[1], amount, nonce, tid, counter))
  else
    body = body_of(Q[mode], string.format('{"org":"%s"}', org[1]))
  end
  return wrk.format("POST", "/graphql", headers, body)
end

function response(status, headers, body)
  if mode == "prime" then
    answered = answered + 1
    if answered == prime_total then
      io.write("BENCH_THREAD_DONE\n")
      io.flush()
      wrk.thread:stop()
    end
  end
  if status ~= 200 then
    http_errors = http_errors + 1
  elseif body:find(expect, 1, true) then
    ok = ok + 1
    return
  elseif body:find('"errors":', 1, true) then
    graphql_errors = graphql_errors + 1
  else
    user_errors = user_errors + 1
  end
  if sample == "" then
    sample = status .. " " .. body:sub(1, 400)
  end
end

local function json_string(s)
  return '"' .. s:gsub('[%c"\\]', function(c)
    return string.format("\\u%04x", c:byte())
  end) .. '"'
end

function done(summary, latency, requests)
  local t = { ok = 0, user_errors = 0, graphql_errors = 0, http_errors = 0, late = 0, max_lag_ms = 0 }
  local first_sample = ""
  for _, thread in ipairs(threads) do
    for name, _ in pairs(t) do
      local v = thread:get(name) or 0
      if name == "max_lag_ms" then
        t[name] = math.max(t[name], v)
      else
        t[name] = t[name] + v
      end
    end
    local s = thread:get("sample")
    if first_sample == "" and s and s ~= "" then
      first_sample = s
    end
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"duration_us":%d,"requests":%d,"bytes":%d,' ..
      '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
      '"ok":%d,"user_errors":%d,"graphql_errors":%d,"http_errors":%d,"late":%d,"max_lag_ms":%.3f,' ..
      '"latency_us":{"min":%d,"mean":%.1f,"max":%d,"p50":%d,"p90":%d,"p99":%d,"p999":%d},"sample":%s}\n',
    summary.duration, summary.requests, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    t.ok, t.user_errors, t.graphql_errors, t.http_errors, t.late, t.max_lag_ms,
    latency.min, latency.mean, latency.max,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9),
    json_string(first_sample)
  ))
end
