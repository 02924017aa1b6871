-- Included at the top of the scripts that read or rewrite a job (job_queue.script() puts it there).
-- A job is jobs.py's envelope: a line of JSON (the header), a newline, then the pixels.

-- The header decoded (nil when there is none that cjson reads as an object) and the rest of the job, its
-- newline included, so that `cjson.encode(header) .. rest` is the job with a rewritten header.
local function split(raw)
  local cut = string.find(raw, '\n', 1, true)
  if not cut then
    return nil, ''
  end
  local ok, header = pcall(cjson.decode, string.sub(raw, 1, cut - 1))
  if not ok or type(header) ~= 'table' then
    return nil, ''
  end
  return header, string.sub(raw, cut)
end

