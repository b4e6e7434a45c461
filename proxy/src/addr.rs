//! The unit every per-client limit counts in: an IPv4 address, or an IPv6
//! /64 (one host usually owns a whole /64, so rotating addresses inside it
//! must not reset a count). A v4-mapped IPv6 address counts as its IPv4.
//!
//! At the bottom of the proxy's layers: imports nothing of the crate.

use std::net::{IpAddr, Ipv6Addr};

/// The address a per-client count is kept under.
pub fn bucket(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn v4_as_is_v6_per_64_mapped_as_v4() {
        assert_eq!(bucket(ip("10.0.0.1")), ip("10.0.0.1"));
        assert_eq!(bucket(ip("2001:db8:1:2::ffff")), ip("2001:db8:1:2::"));
        assert_eq!(
            bucket(ip("2001:db8:1:2:aa::1")),
            bucket(ip("2001:db8:1:2::2"))
        );
        assert_ne!(bucket(ip("2001:db8:1:3::1")), bucket(ip("2001:db8:1:2::1")));
        assert_eq!(bucket(ip("::ffff:10.1.1.1")), ip("10.1.1.1"));
    }
}
