//! The fleet's in-process Ethernet switch: one port per simulated machine and one uplink (the
//! rack's tap). Frames go by destination MAC: to the port that owns it, broadcast and multicast
//! to every other port and the uplink, anything else to the uplink. Each port's queue is bounded
//! ([`PORT_QUEUE_FRAMES_MAX`]); a frame that finds its queue full is dropped and counted, as a
//! real switch does, and TCP or the protocol's own retries recover.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use smoltcp::phy::{self, DeviceCapabilities, Medium};

/// Frames one port holds before dropping: a TCP receive window of 1 MiB is ~730 full frames in
/// flight, so 1024 leaves room for ARP and a retransmission; at most ~1.5 MiB per port (×100
/// machines: 150 MiB in the worst case, when every machine stops reading at once).
pub const PORT_QUEUE_FRAMES_MAX: usize = 1024;

/// Shortest and longest Ethernet frame the switch passes (header included, no FCS): shorter is
/// not Ethernet; longer than a 9000-byte jumbo MTU is not ours.
const FRAME_BYTES_MIN: usize = 14;
const FRAME_BYTES_MAX: usize = 9000 + 14;

/// Where frames for the outside go (the tap; a collecting buffer in tests).
pub trait Uplink: Send + Sync {
    fn send(&self, frame: &[u8]);
}

/// One machine's port: its queue of frames to receive.
pub struct Port {
    mac: [u8; 6],
    queue: Mutex<VecDeque<Vec<u8>>>,
    ready: Condvar,
    drops: AtomicU64,
}

impl std::fmt::Debug for Port {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Port").field("mac", &self.mac).finish_non_exhaustive()
    }
}

impl Port {
    fn queue(&self) -> std::sync::MutexGuard<'_, VecDeque<Vec<u8>>> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn push(&self, frame: &[u8]) {
        let mut queue = self.queue();
        if queue.len() >= PORT_QUEUE_FRAMES_MAX {
            self.drops.fetch_add(1, Ordering::Relaxed);
            return;
        }
        queue.push_back(frame.to_vec());
        assert!(queue.len() <= PORT_QUEUE_FRAMES_MAX);
        drop(queue);
        self.ready.notify_one();
    }

    /// The next frame, if one is queued.
    pub fn pop(&self) -> Option<Vec<u8>> {
        self.queue().pop_front()
    }

    /// Waits up to `timeout` for a frame, returning early when `interrupted()` turns true (it
    /// is checked after every [`Port::wake`]).
    pub fn wait(&self, timeout: Duration, interrupted: impl Fn() -> bool) {
        let deadline = Instant::now() + timeout;
        let mut queue = self.queue();
        while queue.is_empty() && !interrupted() {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            queue = self.ready.wait_timeout(queue, deadline - now).unwrap_or_else(PoisonError::into_inner).0;
        }
    }

    /// Wakes a waiter so it looks at its interruption condition.
    pub fn wake(&self) {
        let _queue = self.queue();
        self.ready.notify_all();
    }

    /// Frames dropped because the queue was full.
    pub fn drops(&self) -> u64 {
        self.drops.load(Ordering::Relaxed)
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }
}

/// The switch: ports by MAC and the uplink.
pub struct Switch {
    ports: Vec<Arc<Port>>,
    by_mac: HashMap<[u8; 6], usize>,
    uplink: Box<dyn Uplink>,
    to_uplink: AtomicU64,
    from_uplink: AtomicU64,
    /// Frames from the uplink for no port of ours (the bridge floods unknown unicast).
    unknown: AtomicU64,
    malformed: AtomicU64,
}

impl std::fmt::Debug for Switch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Switch").field("ports", &self.ports.len()).finish_non_exhaustive()
    }
}

/// Counters of the switch, for reports and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SwitchCounters {
    pub frames_to_uplink: u64,
    pub frames_from_uplink: u64,
    pub frames_unknown_destination: u64,
    pub frames_malformed: u64,
    pub frames_dropped_queue_full: u64,
}

fn is_group(mac: &[u8]) -> bool {
    // The I/G bit: broadcast and multicast alike.
    mac[0] & 1 == 1
}

impl Switch {
    /// A switch with one port per MAC (distinct: the caller checks).
    pub fn new(macs: &[[u8; 6]], uplink: Box<dyn Uplink>) -> Switch {
        let ports: Vec<Arc<Port>> = macs
            .iter()
            .map(|mac| {
                Arc::new(Port {
                    mac: *mac,
                    queue: Mutex::new(VecDeque::new()),
                    ready: Condvar::new(),
                    drops: AtomicU64::new(0),
                })
            })
            .collect();
        let by_mac = macs.iter().enumerate().map(|(index, mac)| (*mac, index)).collect();
        Switch {
            ports,
            by_mac,
            uplink,
            to_uplink: AtomicU64::new(0),
            from_uplink: AtomicU64::new(0),
            unknown: AtomicU64::new(0),
            malformed: AtomicU64::new(0),
        }
    }

    pub fn port(&self, index: usize) -> Arc<Port> {
        self.ports[index].clone()
    }

    fn well_formed(&self, frame: &[u8]) -> bool {
        let ok = (FRAME_BYTES_MIN..=FRAME_BYTES_MAX).contains(&frame.len());
        if !ok {
            self.malformed.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    /// A frame a machine sent.
    pub fn from_port(&self, index: usize, frame: &[u8]) {
        if !self.well_formed(frame) {
            return;
        }
        let destination: [u8; 6] = frame[..6].try_into().expect("checked length");
        if is_group(&destination) {
            for (other, port) in self.ports.iter().enumerate() {
                if other != index {
                    port.push(frame);
                }
            }
        } else if let Some(&port) = self.by_mac.get(&destination) {
            self.ports[port].push(frame);
            return;
        }
        self.to_uplink.fetch_add(1, Ordering::Relaxed);
        self.uplink.send(frame);
    }

    /// A frame that came in from the uplink.
    pub fn from_uplink(&self, frame: &[u8]) {
        if !self.well_formed(frame) {
            return;
        }
        self.from_uplink.fetch_add(1, Ordering::Relaxed);
        let destination: [u8; 6] = frame[..6].try_into().expect("checked length");
        if is_group(&destination) {
            for port in &self.ports {
                port.push(frame);
            }
        } else if let Some(&port) = self.by_mac.get(&destination) {
            self.ports[port].push(frame);
        } else {
            self.unknown.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn counters(&self) -> SwitchCounters {
        SwitchCounters {
            frames_to_uplink: self.to_uplink.load(Ordering::Relaxed),
            frames_from_uplink: self.from_uplink.load(Ordering::Relaxed),
            frames_unknown_destination: self.unknown.load(Ordering::Relaxed),
            frames_malformed: self.malformed.load(Ordering::Relaxed),
            frames_dropped_queue_full: self.ports.iter().map(|port| port.drops()).sum(),
        }
    }
}

/// A port as smoltcp sees it: a [`phy::Device`] that receives from the port's queue and sends
/// through the switch.
pub struct PortDevice {
    switch: Arc<Switch>,
    index: usize,
    port: Arc<Port>,
    mtu: usize,
}

impl PortDevice {
    /// `mtu`: the IP MTU (1500 for standard Ethernet).
    pub fn new(switch: Arc<Switch>, index: usize, mtu: usize) -> PortDevice {
        let port = switch.port(index);
        PortDevice { switch, index, port, mtu }
    }
}

pub struct PortRx(Vec<u8>);

pub struct PortTx<'a> {
    switch: &'a Switch,
    index: usize,
}

impl phy::RxToken for PortRx {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for PortTx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut frame = vec![0u8; len];
        let result = f(&mut frame);
        self.switch.from_port(self.index, &frame);
        result
    }
}

impl phy::Device for PortDevice {
    type RxToken<'a> = PortRx;
    type TxToken<'a> = PortTx<'a>;

    fn receive(&mut self, _timestamp: smoltcp::time::Instant) -> Option<(PortRx, PortTx<'_>)> {
        let frame = self.port.pop()?;
        Some((PortRx(frame), PortTx { switch: &self.switch, index: self.index }))
    }

    fn transmit(&mut self, _timestamp: smoltcp::time::Instant) -> Option<PortTx<'_>> {
        Some(PortTx { switch: &self.switch, index: self.index })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut capabilities = DeviceCapabilities::default();
        capabilities.medium = Medium::Ethernet;
        // smoltcp's MTU for Ethernet counts the header.
        capabilities.max_transmission_unit = self.mtu + 14;
        capabilities
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Collect(Mutex<Vec<Vec<u8>>>);

    impl Uplink for Arc<Collect> {
        fn send(&self, frame: &[u8]) {
            self.0.lock().unwrap().push(frame.to_vec());
        }
    }

    fn frame(destination: [u8; 6], source: [u8; 6], tag: u8) -> Vec<u8> {
        let mut frame = destination.to_vec();
        frame.extend_from_slice(&source);
        frame.extend_from_slice(&[0x08, 0x00, tag]);
        frame
    }

    const A: [u8; 6] = [0x52, 0x54, 0, 0, 0, 1];
    const B: [u8; 6] = [0x52, 0x54, 0, 0, 0, 2];
    const OUTSIDE: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0x99];
    const BROADCAST: [u8; 6] = [0xff; 6];

    fn switch() -> (Switch, Arc<Collect>) {
        let uplink = Arc::new(Collect::default());
        (Switch::new(&[A, B], Box::new(uplink.clone())), uplink)
    }

    #[test]
    fn unicast_from_the_uplink_reaches_only_its_port_and_unknown_is_counted() {
        let (switch, _) = switch();
        switch.from_uplink(&frame(B, OUTSIDE, 1));
        switch.from_uplink(&frame([0x52, 0, 0, 0, 0, 7], OUTSIDE, 2));
        assert_eq!(switch.port(0).pop(), None);
        assert_eq!(switch.port(1).pop(), Some(frame(B, OUTSIDE, 1)));
        assert_eq!(switch.counters().frames_unknown_destination, 1);
    }

    #[test]
    fn broadcast_from_a_port_reaches_the_other_ports_and_the_uplink_but_not_itself() {
        let (switch, uplink) = switch();
        switch.from_port(0, &frame(BROADCAST, A, 3));
        assert_eq!(switch.port(0).pop(), None);
        assert_eq!(switch.port(1).pop(), Some(frame(BROADCAST, A, 3)));
        assert_eq!(uplink.0.lock().unwrap().as_slice(), &[frame(BROADCAST, A, 3)]);
        // Broadcast from outside reaches every port.
        switch.from_uplink(&frame(BROADCAST, OUTSIDE, 4));
        assert!(switch.port(0).pop().is_some() && switch.port(1).pop().is_some());
    }

    #[test]
    fn unicast_between_ports_stays_inside_and_outside_goes_to_the_uplink() {
        let (switch, uplink) = switch();
        switch.from_port(0, &frame(B, A, 5));
        switch.from_port(0, &frame(OUTSIDE, A, 6));
        assert_eq!(switch.port(1).pop(), Some(frame(B, A, 5)));
        assert_eq!(uplink.0.lock().unwrap().as_slice(), &[frame(OUTSIDE, A, 6)]);
    }

    #[test]
    fn a_full_port_queue_drops_and_counts_and_short_frames_are_refused() {
        let (switch, _) = switch();
        for _ in 0..PORT_QUEUE_FRAMES_MAX + 5 {
            switch.from_uplink(&frame(A, OUTSIDE, 0));
        }
        assert_eq!(switch.port(0).drops(), 5);
        assert_eq!(switch.counters().frames_dropped_queue_full, 5);
        switch.from_uplink(&[0u8; 10]);
        assert_eq!(switch.counters().frames_malformed, 1);
    }

    #[test]
    fn a_waiting_port_wakes_on_a_frame_or_an_interruption_before_its_timeout() {
        let (switch, _) = switch();
        let switch = Arc::new(switch);
        let port = switch.port(0);
        let sender = switch.clone();
        let started = Instant::now();
        let thread = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            sender.from_uplink(&frame(A, OUTSIDE, 8));
        });
        port.wait(Duration::from_secs(10), || false);
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(port.pop().is_some());
        thread.join().unwrap();
        let started = Instant::now();
        port.wait(Duration::from_secs(10), || true);
        assert!(started.elapsed() < Duration::from_secs(1));
    }
}
