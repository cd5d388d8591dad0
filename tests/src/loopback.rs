//! Other hosts on loopback: Linux routes all of 127.0.0.0/8 to `lo`, so a socket bound to
//! 127.0.0.N before it connects looks to the region like another host, with its own share of
//! every per-source limit (connections, login throttle, registration challenges).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use metalrack_api::tls_pin::{client_config, RegionTrust};
use tokio::net::{TcpSocket, TcpStream};

/// The `n`th loopback address after 127.0.0.1 (which plain clients use): 127.0.0.2, 127.0.0.3,
/// ... on into 127.0.1.x, so a test can play thousands of hosts.
pub fn source(n: u32) -> IpAddr {
    let first = u32::from(Ipv4Addr::new(127, 0, 0, 2));
    IpAddr::V4(Ipv4Addr::from(first + n))
}

/// An HTTP client whose connections come from `source`; redirects are left to the caller.
/// Over HTTPS it takes whatever certificate the region shows: these clients stand for other
/// hosts in tests of the region's limits, not of trust (`tests/tls.rs` tests that).
pub fn client_from(source: IpAddr) -> reqwest::Client {
    // The wire contract's verifier trusting nothing yet: any certificate, signature still checked.
    reqwest::Client::builder()
        .use_preconfigured_tls(client_config(RegionTrust::NothingYet))
        .local_address(source)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("a client with a local address builds")
}

/// A TCP connection to `to` from `source`, for clients that write raw bytes.
pub async fn connect_from(source: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(to).await
}
