//! The lease table of managed DHCP, in memory: which MAC holds which address until when.
//!
//! Choosing an address must not cost a scan of the table per candidate (that made a busy rack
//! slow down as leases piled up), so the table keeps indexes beside `by_mac`, all updated together
//! by `insert` and `remove`:
//! - `by_address`: the one MAC holding each address (bound, or offered and not yet requested);
//! - `by_deadline`: holders ordered by when their hold ends, to reclaim expired ones oldest first;
//! - `next_unused` and `recycled`: addresses at or past the cursor were never handed out since
//!   start; `recycled` holds the free ones below it. The lowest free address is the smaller of the
//!   two, in O(log n), and memory stays proportional to the leases, not to the size of the range.
//!
//! Time is wall-clock milliseconds (lease ends are persisted as such); every method that depends on
//! it has an `_at` form taking `now_ms`, so tests can move time.

use std::collections::{BTreeSet, HashMap};
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use crate::config::DhcpConfig;

/// An address offered but not requested is held for this long before it can go to another client.
pub const OFFER_HOLD_MS: i64 = 60_000;

/// A declined address (in use by someone else) is not offered again for this long.
pub const DECLINE_HOLD_MS: i64 = 600_000;

/// Declined addresses remembered at most (each ~60 bytes over two maps). Clients decline at the
/// per-client packet rate, so without a bound many MACs could grow the table without limit; past
/// it the decline that ends soonest is forgotten first.
pub const DECLINED_MAX: usize = 4096;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Lease {
    pub mac: String,
    pub address: Ipv4Addr,
    pub expires_at_ms: i64,
    /// False while only offered.
    pub bound: bool,
}

#[derive(Debug)]
struct Entry {
    lease: Lease,
    /// Until when no other MAC gets the address: the lease's end once bound, and at least the end
    /// of the offer hold after each offer. The key of this entry in `by_deadline`.
    held_until_ms: i64,
}

/// Leases of managed mode. Persistence is the caller's: `bind`, `release` and `decline` return
/// what changed so it can be journalled ([`super::lease_journal`]).
#[derive(Debug)]
pub struct Leases {
    server: Ipv4Addr,
    router: Option<Ipv4Addr>,
    /// Inclusive, as numbers; `None` when no range is configured (reservations only).
    range: Option<(u32, u32)>,
    lease_time_ms: i64,
    leases_max: usize,
    /// Reserved address → the MACs (lowercase) it is reserved for.
    reserved: HashMap<Ipv4Addr, Vec<String>>,
    /// MAC (lowercase) → its reserved address; the first reservation of a MAC wins.
    reservation_of: HashMap<String, Ipv4Addr>,
    by_mac: HashMap<String, Entry>,
    by_address: HashMap<Ipv4Addr, String>,
    by_deadline: BTreeSet<(i64, Ipv4Addr)>,
    /// The lowest address of the range not handed out since start (may be past the range's end).
    next_unused: u64,
    /// Free, usable addresses below `next_unused`.
    recycled: BTreeSet<Ipv4Addr>,
    /// Declined address → until when it is not offered; the same pairs ordered by end.
    declined: HashMap<Ipv4Addr, i64>,
    declined_by_deadline: BTreeSet<(i64, Ipv4Addr)>,
}

impl Leases {
    /// A table holding `loaded` (from the lease store), minus the ones that ended before `now_ms`.
    pub fn new(config: &DhcpConfig, server: Ipv4Addr, loaded: Vec<Lease>, now_ms: i64) -> Leases {
        let mut reserved: HashMap<Ipv4Addr, Vec<String>> = HashMap::new();
        let mut reservation_of = HashMap::new();
        for reservation in &config.reservations {
            let mac = reservation.mac.to_ascii_lowercase();
            reserved.entry(reservation.address).or_default().push(mac.clone());
            reservation_of.entry(mac).or_insert(reservation.address);
        }
        let range = match (config.range_start, config.range_end) {
            (Some(start), Some(end)) if start <= end => Some((u32::from(start), u32::from(end))),
            _ => None,
        };
        let mut leases = Leases {
            server,
            router: config.router,
            range,
            lease_time_ms: i64::from(config.lease_time_s) * 1000,
            leases_max: config.leases_max,
            reserved,
            reservation_of,
            by_mac: HashMap::new(),
            by_address: HashMap::new(),
            by_deadline: BTreeSet::new(),
            next_unused: range.map_or(0, |(start, _)| u64::from(start)),
            recycled: BTreeSet::new(),
            declined: HashMap::new(),
            declined_by_deadline: BTreeSet::new(),
        };
        let mut loaded: Vec<Lease> = loaded.into_iter().filter(|l| l.bound && l.expires_at_ms > now_ms).collect();
        // Two stored leases can name one address only if the config changed under them (a
        // reservation added over a dynamic lease); the one lasting longer stays.
        loaded.sort_by_key(|l| std::cmp::Reverse(l.expires_at_ms));
        for lease in loaded {
            if !leases.by_address.contains_key(&lease.address) && !leases.by_mac.contains_key(&lease.mac) {
                let held_until_ms = lease.expires_at_ms;
                leases.insert(lease, held_until_ms);
            }
        }
        leases
    }

    /// Entries in the table: bound leases and pending offers, including ended ones not yet reclaimed.
    pub fn len(&self) -> usize {
        self.by_mac.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_mac.is_empty()
    }

    pub fn get(&self, mac: &str) -> Option<&Lease> {
        self.by_mac.get(mac).map(|entry| &entry.lease)
    }

    /// The address to offer `mac`: its reservation, its lease, the one it asks for, or the
    /// lowest free one in the range. `None` when the pool or the lease table is full.
    pub fn offer(&mut self, mac: &str, requested: Option<Ipv4Addr>) -> Option<Ipv4Addr> {
        self.offer_at(mac, requested, crate::status::now_ms())
    }

    pub fn offer_at(&mut self, mac: &str, requested: Option<Ipv4Addr>, now_ms: i64) -> Option<Ipv4Addr> {
        let address = self.choose(mac, requested, now_ms, true)?;
        self.hold(mac, address, now_ms);
        Some(address)
    }

    /// Binds `address` to `mac` if it is the one this server would give it; returns the lease to
    /// persist before acknowledging it.
    pub fn bind(&mut self, mac: &str, address: Ipv4Addr) -> Option<Lease> {
        self.bind_at(mac, address, crate::status::now_ms())
    }

    pub fn bind_at(&mut self, mac: &str, address: Ipv4Addr, now_ms: i64) -> Option<Lease> {
        self.expire_declines(now_ms);
        match self.by_mac.get(mac) {
            Some(entry) if entry.lease.address != address => return None,
            Some(_) => {}
            // INIT-REBOOT after a rack restart lost an offer: accept the address if an offer
            // would have given it, without allocating another one when it would not.
            None => {
                if self.choose(mac, Some(address), now_ms, false) != Some(address) {
                    return None;
                }
                self.hold(mac, address, now_ms);
            }
        }
        if self.in_use(address, mac, now_ms) {
            return None;
        }
        let expires_at_ms = now_ms + self.lease_time_ms;
        let held_until_ms = self.by_mac.get(mac)?.held_until_ms.max(expires_at_ms);
        self.set_held_until(mac, held_until_ms);
        let entry = self.by_mac.get_mut(mac)?;
        entry.lease.bound = true;
        entry.lease.expires_at_ms = expires_at_ms;
        Some(entry.lease.clone())
    }

    /// Forgets `mac`'s lease or offer; returns it.
    pub fn release(&mut self, mac: &str) -> Option<Lease> {
        self.remove(mac)
    }

    /// `mac` found `address` in use by someone else: it is not offered to anyone for
    /// [`DECLINE_HOLD_MS`], and `mac`'s lease or offer is forgotten (returned).
    pub fn decline(&mut self, mac: &str, address: Ipv4Addr) -> Option<Lease> {
        self.decline_at(mac, address, crate::status::now_ms())
    }

    pub fn decline_at(&mut self, mac: &str, address: Ipv4Addr, now_ms: i64) -> Option<Lease> {
        self.expire_declines(now_ms);
        if let Some(until) = self.declined.remove(&address) {
            self.declined_by_deadline.remove(&(until, address));
        }
        while self.declined.len() >= DECLINED_MAX {
            let Some((_, oldest)) = self.declined_by_deadline.pop_first() else { break };
            self.declined.remove(&oldest);
            if !self.by_address.contains_key(&oldest) {
                self.return_to_free(oldest);
            }
        }
        let until = now_ms + DECLINE_HOLD_MS;
        self.declined.insert(address, until);
        self.declined_by_deadline.insert((until, address));
        self.recycled.remove(&address);
        self.remove(mac)
    }

    /// Whether another client has `address` at `now_ms`, or it is not to be handed out.
    fn in_use(&self, address: Ipv4Addr, mac: &str, now_ms: i64) -> bool {
        address == self.server
            || Some(address) == self.router
            || self.reserved.get(&address).is_some_and(|macs| macs.iter().any(|m| !m.eq_ignore_ascii_case(mac)))
            || self.declined.get(&address).is_some_and(|until| *until > now_ms)
            || self.by_address.get(&address).is_some_and(|holder| {
                holder != mac && self.by_mac.get(holder).is_some_and(|entry| entry.held_until_ms > now_ms)
            })
    }

    fn in_range(&self, address: Ipv4Addr) -> bool {
        self.range.is_some_and(|(start, end)| (start..=end).contains(&u32::from(address)))
    }

    /// Never handed out dynamically, whoever holds it.
    fn excluded(&self, address: Ipv4Addr) -> bool {
        address == self.server || Some(address) == self.router || self.reserved.contains_key(&address)
    }

    /// The address `mac` would get, or `None` (pool or table full; or, without `allocate`, the
    /// requested address is not the one it would get). Makes room in a full table by dropping
    /// ended entries, but holds nothing.
    fn choose(&mut self, mac: &str, requested: Option<Ipv4Addr>, now_ms: i64, allocate: bool) -> Option<Ipv4Addr> {
        self.expire_declines(now_ms);
        if !self.by_mac.contains_key(mac) && self.by_mac.len() >= self.leases_max {
            // Only ended entries make room: dropping live offers would let a burst of new MACs
            // cancel each other's offers so that none of them binds.
            while self.by_mac.len() >= self.leases_max {
                let (deadline, address) = *self.by_deadline.first()?;
                if deadline > now_ms {
                    return None;
                }
                let holder = self.by_address.get(&address)?.clone();
                self.remove(&holder);
            }
        }
        if let Some(address) = self.reservation_of.get(&mac.to_ascii_lowercase()) {
            return Some(*address);
        }
        if let Some(entry) = self.by_mac.get(mac) {
            if !self.in_use(entry.lease.address, mac, now_ms) {
                return Some(entry.lease.address);
            }
        }
        if let Some(address) = requested.filter(|a| self.in_range(*a) && !self.in_use(*a, mac, now_ms)) {
            return Some(address);
        }
        if allocate {
            self.allocate(now_ms)
        } else {
            None
        }
    }

    /// The lowest free address of the range, or, when every address has been handed out, the
    /// one whose holder's time ran out longest ago. Amortized O(log n): each address is passed by
    /// the cursor once, and each reclaimed entry is removed once.
    fn allocate(&mut self, now_ms: i64) -> Option<Ipv4Addr> {
        let (_, end) = self.range?;
        loop {
            if let Some(address) = self.recycled.pop_first() {
                return Some(address);
            }
            while self.next_unused <= u64::from(end) {
                let address = Ipv4Addr::from(self.next_unused as u32);
                self.next_unused += 1;
                // Skipped addresses that are held or declined go to `recycled` when they come free.
                if !self.excluded(address)
                    && !self.declined.contains_key(&address)
                    && !self.by_address.contains_key(&address)
                {
                    return Some(address);
                }
            }
            let (deadline, address) = *self.by_deadline.first()?;
            if deadline > now_ms {
                return None;
            }
            // Removing it puts its address in `recycled` if it may be handed out.
            let holder = self.by_address.get(&address)?.clone();
            self.remove(&holder);
        }
    }

    /// Makes `address` `mac`'s offer, held for [`OFFER_HOLD_MS`]. A previous holder of the
    /// address (whose time ran out, or over whom a reservation wins) loses it.
    fn hold(&mut self, mac: &str, address: Ipv4Addr, now_ms: i64) {
        if let Some(holder) = self.by_address.get(&address).filter(|holder| *holder != mac).cloned() {
            self.remove(&holder);
        }
        let offer_until_ms = now_ms + OFFER_HOLD_MS;
        let lease = match self.by_mac.get(mac) {
            Some(entry) if entry.lease.address == address => {
                let held_until_ms = entry.held_until_ms.max(offer_until_ms);
                self.set_held_until(mac, held_until_ms);
                return;
            }
            // Moving to another address: the lease keeps its state, as it always has.
            Some(_) => self.remove(mac).map(|lease| Lease { address, ..lease }),
            None => None,
        };
        let lease = lease.unwrap_or(Lease { mac: mac.to_owned(), address, expires_at_ms: 0, bound: false });
        let held_until_ms = if lease.bound { lease.expires_at_ms.max(offer_until_ms) } else { offer_until_ms };
        self.insert(lease, held_until_ms);
    }

    /// Adds an entry; neither its MAC nor its address may be in the table.
    fn insert(&mut self, lease: Lease, held_until_ms: i64) {
        assert!(!self.by_address.contains_key(&lease.address), "one holder per address");
        self.recycled.remove(&lease.address);
        self.by_address.insert(lease.address, lease.mac.clone());
        self.by_deadline.insert((held_until_ms, lease.address));
        let previous = self.by_mac.insert(lease.mac.clone(), Entry { lease, held_until_ms });
        assert!(previous.is_none(), "one entry per MAC");
    }

    fn remove(&mut self, mac: &str) -> Option<Lease> {
        let entry = self.by_mac.remove(mac)?;
        let address = entry.lease.address;
        self.by_address.remove(&address);
        self.by_deadline.remove(&(entry.held_until_ms, address));
        self.return_to_free(address);
        Some(entry.lease)
    }

    fn set_held_until(&mut self, mac: &str, held_until_ms: i64) {
        if let Some(entry) = self.by_mac.get_mut(mac) {
            self.by_deadline.remove(&(entry.held_until_ms, entry.lease.address));
            self.by_deadline.insert((held_until_ms, entry.lease.address));
            entry.held_until_ms = held_until_ms;
        }
    }

    /// `address` has no holder any more: make it allocatable if it may be handed out. Addresses
    /// at or past the cursor need nothing: the cursor reaches them.
    fn return_to_free(&mut self, address: Ipv4Addr) {
        if self.in_range(address)
            && !self.excluded(address)
            && !self.declined.contains_key(&address)
            && u64::from(u32::from(address)) < self.next_unused
        {
            self.recycled.insert(address);
        }
    }

    fn expire_declines(&mut self, now_ms: i64) {
        while let Some(&(until, address)) = self.declined_by_deadline.first() {
            if until > now_ms {
                break;
            }
            self.declined_by_deadline.remove(&(until, address));
            self.declined.remove(&address);
            if !self.by_address.contains_key(&address) {
                self.return_to_free(address);
            }
        }
    }

    /// Checks that the indexes agree with `by_mac` (tests call it after every step).
    #[cfg(test)]
    fn assert_consistent(&self) {
        assert_eq!(self.by_mac.len(), self.by_address.len());
        assert_eq!(self.by_mac.len(), self.by_deadline.len());
        assert_eq!(self.declined.len(), self.declined_by_deadline.len());
        for (mac, entry) in &self.by_mac {
            assert_eq!(&entry.lease.mac, mac);
            assert_eq!(self.by_address.get(&entry.lease.address), Some(mac));
            assert!(self.by_deadline.contains(&(entry.held_until_ms, entry.lease.address)));
            assert!(!self.recycled.contains(&entry.lease.address));
        }
        for address in &self.recycled {
            assert!(self.in_range(*address) && !self.excluded(*address) && !self.declined.contains_key(address));
            assert!(u64::from(u32::from(*address)) < self.next_unused);
        }
        for (address, until) in &self.declined {
            assert!(self.declined_by_deadline.contains(&(*until, *address)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PxeConfig;

    const T0: i64 = 1_700_000_000_000;
    const LEASE_MS: i64 = 3_600_000;

    fn config(range_end: u8, leases_max: usize) -> DhcpConfig {
        let text = format!(
            r#"
            interface = "br0"
            address = "10.99.0.1"
            [dhcp]
            mode = "managed"
            range_start = "10.99.0.1"
            range_end = "10.99.0.{range_end}"
            router = "10.99.0.2"
            leases_max = {leases_max}
            reservations = [{{ mac = "52:54:00:00:00:99", address = "10.99.0.3" }}]
            "#
        );
        toml::from_str::<PxeConfig>(&text).unwrap().dhcp
    }

    fn table(range_end: u8, leases_max: usize) -> Leases {
        Leases::new(&config(range_end, leases_max), Ipv4Addr::new(10, 99, 0, 1), Vec::new(), T0)
    }

    fn mac(i: u32) -> String {
        format!("02:00:00:00:{:02x}:{:02x}", i >> 8, i & 0xff)
    }

    fn address(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 99, 0, last)
    }

    #[test]
    fn lowest_free_address_skipping_server_router_and_reservations() {
        let mut leases = table(10, 100);
        // .1 is the server, .2 the router, .3 reserved.
        assert_eq!(leases.offer_at(&mac(1), None, T0), Some(address(4)));
        assert_eq!(leases.offer_at(&mac(2), None, T0), Some(address(5)));
        // The requested address when free, the reservation whatever is asked.
        assert_eq!(leases.offer_at(&mac(3), Some(address(9)), T0), Some(address(9)));
        assert_eq!(leases.offer_at(&mac(4), Some(address(9)), T0), Some(address(6)));
        assert_eq!(leases.offer_at("52:54:00:00:00:99", Some(address(8)), T0), Some(address(3)));
        // A released address is the lowest free one again.
        leases.release(&mac(1));
        assert_eq!(leases.offer_at(&mac(5), None, T0), Some(address(4)));
        leases.assert_consistent();
    }

    #[test]
    fn expired_leases_and_offers_are_reclaimed_oldest_first() {
        let mut leases = table(6, 100); // .4 .. .6 usable
        assert_eq!(leases.offer_at(&mac(1), None, T0), Some(address(4)));
        assert!(leases.bind_at(&mac(1), address(4), T0).is_some());
        assert_eq!(leases.offer_at(&mac(2), None, T0), Some(address(5)));
        assert_eq!(leases.offer_at(&mac(3), None, T0 + 2), Some(address(6)));
        assert!(leases.bind_at(&mac(3), address(6), T0 + 2).is_some());
        assert_eq!(leases.offer_at(&mac(4), None, T0 + 3), None, "pool full");
        // The offer nobody requested ends first.
        assert_eq!(leases.offer_at(&mac(4), None, T0 + OFFER_HOLD_MS), Some(address(5)));
        assert!(leases.get(&mac(2)).is_none());
        assert!(leases.bind_at(&mac(4), address(5), T0 + OFFER_HOLD_MS).is_some());
        // Both leases have ended: a returning client whose lease ended keeps its address as long
        // as nobody needed it, and a new one gets the address whose lease ended first.
        let later = T0 + LEASE_MS + 2;
        assert_eq!(leases.offer_at(&mac(3), None, later), Some(address(6)));
        assert_eq!(leases.offer_at(&mac(5), None, later), Some(address(4)));
        assert!(leases.get(&mac(1)).is_none());
        assert_eq!(leases.offer_at(&mac(6), None, later), None);
        // A renewal keeps the lease out of reach past its first end.
        assert!(leases.bind_at(&mac(4), address(5), later).is_some());
        assert_eq!(leases.offer_at(&mac(6), None, later + OFFER_HOLD_MS), Some(address(4)));
        assert_eq!(leases.offer_at(&mac(7), None, later + OFFER_HOLD_MS), Some(address(6)));
        assert_eq!(leases.offer_at(&mac(8), None, later + OFFER_HOLD_MS), None);
        leases.assert_consistent();
    }

    #[test]
    fn lease_limit_is_enforced_and_freed_by_ended_entries() {
        let mut leases = table(100, 3);
        for i in 0..3 {
            let a = leases.offer_at(&mac(i), None, T0).unwrap();
            assert!(leases.bind_at(&mac(i), a, T0).is_some());
        }
        assert_eq!(leases.offer_at(&mac(3), None, T0 + 1), None, "table full");
        // A client already in the table still gets answers.
        assert!(leases.offer_at(&mac(0), None, T0 + 1).is_some());
        assert!(leases.offer_at(&mac(3), None, T0 + LEASE_MS + OFFER_HOLD_MS).is_some());
        assert_eq!(leases.len(), 3);
        leases.assert_consistent();
    }

    #[test]
    fn declined_addresses_wait_out_the_hold() {
        let mut leases = table(5, 100); // .4 and .5 usable
        let a = leases.offer_at(&mac(1), None, T0).unwrap();
        assert_eq!(a, address(4));
        assert!(leases.decline_at(&mac(1), a, T0).is_some());
        assert_eq!(leases.offer_at(&mac(1), None, T0), Some(address(5)));
        assert_eq!(leases.offer_at(&mac(2), Some(a), T0), None);
        assert!(leases.bind_at(&mac(2), a, T0).is_none(), "INIT-REBOOT onto a declined address");
        assert_eq!(leases.offer_at(&mac(2), None, T0 + DECLINE_HOLD_MS), Some(a));
        leases.assert_consistent();
    }

    #[test]
    fn loaded_leases_are_held_and_ended_ones_dropped() {
        let loaded = vec![
            Lease { mac: mac(1), address: address(4), expires_at_ms: T0 + 10, bound: true },
            Lease { mac: mac(2), address: address(5), expires_at_ms: T0 - 10, bound: true },
            // The same address twice (config changed): the longer lease stays.
            Lease { mac: mac(3), address: address(6), expires_at_ms: T0 + 10, bound: true },
            Lease { mac: mac(4), address: address(6), expires_at_ms: T0 + 20, bound: true },
        ];
        let mut leases = Leases::new(&config(10, 100), Ipv4Addr::new(10, 99, 0, 1), loaded, T0);
        assert_eq!(leases.len(), 2);
        assert_eq!(leases.get(&mac(4)).unwrap().address, address(6));
        assert_eq!(leases.offer_at(&mac(9), None, T0), Some(address(5)));
        assert_eq!(leases.offer_at(&mac(10), None, T0), Some(address(7)));
        leases.assert_consistent();
    }

    #[derive(Debug, Clone)]
    enum Step {
        Offer(u32, Option<u8>),
        Bind(u32, u8),
        Release(u32),
        Decline(u32, u8),
        Wait(i64),
    }

    fn step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        prop_oneof![
            4 => (0u32..24, proptest::option::of(0u8..14)).prop_map(|(m, r)| Step::Offer(m, r)),
            4 => (0u32..24, 0u8..14).prop_map(|(m, a)| Step::Bind(m, a)),
            1 => (0u32..24).prop_map(Step::Release),
            1 => (0u32..24, 0u8..14).prop_map(|(m, a)| Step::Decline(m, a)),
            2 => (0i64..2 * OFFER_HOLD_MS).prop_map(Step::Wait),
        ]
    }

    proptest::proptest! {
        /// Against a brute-force check of the whole range: an offered address is never one
        /// another client holds, reserved, declined, the server's or the router's; and no offer
        /// is refused while a free address exists and the table has room.
        #[test]
        fn allocation_stays_correct_as_leases_come_and_go(steps in proptest::collection::vec(step(), 1..120)) {
            let mut config = config(12, 10);
            config.lease_time_s = 90;
            let mut leases = Leases::new(&config, Ipv4Addr::new(10, 99, 0, 1), Vec::new(), T0);
            let mut now = T0;
            for step in steps {
                match step {
                    Step::Offer(m, requested) => {
                        let mac = mac(m);
                        let free_exists = (4..=12).map(address).any(|a| !leases.in_use(a, &mac, now));
                        let room = leases.by_mac.contains_key(&mac)
                            || leases.len() < 10
                            || leases.by_deadline.first().is_some_and(|(deadline, _)| *deadline <= now);
                        let offered = leases.offer_at(&mac, requested.map(address), now);
                        match offered {
                            Some(a) => {
                                proptest::prop_assert!(!leases.in_use(a, &mac, now), "{a} offered while in use");
                                proptest::prop_assert!(leases.in_range(a) && !leases.excluded(a));
                            }
                            None => proptest::prop_assert!(!(free_exists && room), "refused with a free address"),
                        }
                    }
                    Step::Bind(m, a) => {
                        let mac = mac(m);
                        let taken = leases.in_use(address(a), &mac, now);
                        if leases.bind_at(&mac, address(a), now).is_some() {
                            proptest::prop_assert!(!taken, "bound {} while in use", address(a));
                        }
                    }
                    Step::Release(m) => {
                        leases.release(&mac(m));
                    }
                    Step::Decline(m, a) => {
                        leases.decline_at(&mac(m), address(a), now);
                    }
                    Step::Wait(ms) => now += ms,
                }
                leases.assert_consistent();
                let mut holders = HashMap::new();
                for entry in leases.by_mac.values().filter(|e| e.held_until_ms > now) {
                    proptest::prop_assert!(holders.insert(entry.lease.address, &entry.lease.mac).is_none());
                }
            }
        }
    }
}
