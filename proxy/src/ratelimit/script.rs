//! The Lua script Redis runs for every count: one round trip adds `n` to an
//! org's window key and returns the count and the key's remaining TTL.

/// The counter script. `KEYS[1]` the window's key, `ARGV[1]` its expiry in
/// ms, `ARGV[2]` how many units to add (1 when absent). Returns
/// `{count, pttl}`. The expiry is set when the key is created, and re-set if
/// a key somehow has none, so no counter outlives its window by more than
/// the grace second.
pub const SCRIPT: &str = "\
local n = tonumber(ARGV[2]) or 1
local c = redis.call('INCRBY', KEYS[1], n)
if c == n then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
local t = redis.call('PTTL', KEYS[1])
if t < 0 then redis.call('PEXPIRE', KEYS[1], ARGV[1]); t = tonumber(ARGV[1]) end
return {c, t}
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_hash_is_stable_sha1() {
        let sha = redis::Script::new(SCRIPT).get_hash().to_string();
        assert_eq!(sha.len(), 40);
        assert!(sha.bytes().all(|b| b.is_ascii_hexdigit()));
    }
}
