//! Free ports and local addresses, for services that pick their port at
//! start-up and announce it.
//!
//! A port found free may be taken by someone else before it is bound again;
//! bind it soon.

use std::net::{Ipv4Addr, Ipv6Addr, TcpListener};

use crate::error::{Error, Result};

/// A free TCP port on the loopback interface.
///
/// ```
/// let port = pubsub_registry::net::free_port()?;
/// assert!(port > 0);
/// # Ok::<(), pubsub_registry::Error>(())
/// ```
pub fn free_port() -> Result<u16> {
    bound_port((Ipv4Addr::LOCALHOST, 0))
}

/// The first free TCP port in `from..=to` on the loopback interface.
pub fn free_port_in_range(from: u16, to: u16) -> Result<u16> {
    if from > to {
        return Err(Error::NoFreePort(format!("empty range {from}..={to}")));
    }
    (from..=to)
        .find_map(|p| bound_port((Ipv4Addr::LOCALHOST, p)).ok())
        .ok_or_else(|| Error::NoFreePort(format!("every port in {from}..={to} is taken")))
}

/// `127.0.0.1:<free port>`.
pub fn local_free_addr() -> Result<String> {
    Ok(format!("127.0.0.1:{}", free_port()?))
}

/// `[::1]:<free port>`, the port checked free on `::1`.
pub fn local_free_ipv6_addr() -> Result<String> {
    Ok(format!("[::1]:{}", bound_port((Ipv6Addr::LOCALHOST, 0))?))
}

/// `127.0.0.1:<first free port in from..=to>`.
pub fn free_local_addr_in_range(from: u16, to: u16) -> Result<String> {
    Ok(format!("127.0.0.1:{}", free_port_in_range(from, to)?))
}

/// The port at the end of an address (`host:port`, `[v6]:port`).
///
/// ```
/// assert_eq!(pubsub_registry::net::port("127.0.0.1:8080"), Some(8080));
/// assert_eq!(pubsub_registry::net::port("localhost"), None);
/// ```
pub fn port(address: &str) -> Option<u16> {
    address.rsplit_once(':')?.1.parse().ok()
}

fn bound_port(addr: impl std::net::ToSocketAddrs) -> Result<u16> {
    let listener = TcpListener::bind(addr).map_err(|e| Error::NoFreePort(e.to_string()))?;
    let port = listener
        .local_addr()
        .map_err(|e| Error::NoFreePort(e.to_string()))?
        .port();
    Ok(port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_skips_taken_ports() {
        let taken = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let p = taken.local_addr().unwrap().port();
        // The taken port is skipped; the next free one (if any) is returned.
        if let Ok(found) = free_port_in_range(p, p.saturating_add(20)) {
            assert_ne!(found, p);
            assert!(found > p && found <= p.saturating_add(20));
        }
        assert!(matches!(
            free_port_in_range(p, p),
            Err(Error::NoFreePort(_))
        ));
        assert!(matches!(
            free_port_in_range(5, 4),
            Err(Error::NoFreePort(_))
        ));
    }

    #[test]
    fn addresses() {
        let a = local_free_addr().unwrap();
        assert!(a.starts_with("127.0.0.1:"));
        assert!(port(&a).unwrap() > 0);
        if let Ok(v6) = local_free_ipv6_addr() {
            assert!(v6.starts_with("[::1]:"));
            assert!(port(&v6).is_some());
        }
        assert_eq!(port("[::1]:9"), Some(9));
    }
}
