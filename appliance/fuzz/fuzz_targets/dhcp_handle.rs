//! Fuzz the rack's DHCP handling: any packet is dropped or answered, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use metalrack_appliance::config::PxeConfig;
use metalrack_appliance::pxe::dhcp::DhcpServer;

fuzz_target!(|data: &[u8]| {
    let config: PxeConfig = toml::from_str(
        "interface = \"br0\"\naddress = \"10.99.0.1\"\n[dhcp]\nmode = \"managed\"\nrange_start = \"10.99.0.100\"\nrange_end = \"10.99.0.110\"\n",
    )
    .expect("fixed config parses");
    let mut server = DhcpServer::new(&config, None);
    let _ = server.handle(data, 67, |_| false);
});
