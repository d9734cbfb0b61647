"""Lua scripts, each one atomic transition in Redis."""

from __future__ import annotations

#: Push back the lease's expiry if `ARGV[1]` still holds it: 1, else 0 (it expired, or another took it).
RENEW_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

#: Give the lease up if `ARGV[1]` holds it (an orderly stop: a follower takes over at once).
RELEASE_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""

#: Take at most `ARGV[2]` participants whose heartbeat deadline is before `ARGV[1]` out of the set, and
#: return them: a heartbeat written in between is either before (the participant stays) or after (it is
#: gone already, and the leader drops the stray deadline as one of nobody).
POP_EXPIRED = """
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
if #expired > 0 then
    redis.call('ZREM', KEYS[1], unpack(expired))
end
return expired
"""
