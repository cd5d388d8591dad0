//! Rack controllers: registration (challenge and HMAC proofs both ways, covering the region's
//! TLS certificate), credentials bound to the secret
//! generation, heartbeats, the online/offline/stale rule, and each rack's sync policy and "sync
//! now" requests.

pub mod history;
pub mod store;

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use metalrack_api::images::{RackSnapshot, SyncPolicy};
use metalrack_api::{
    region_proof, validate_rack_name, verify_registration_proof, HeartbeatRequest, HeartbeatResponse, RackPage,
    RackState, RackView, RegisterRequest, RegisterResponse, CERTIFICATE_SHA256_LEN_BYTES, NONCE_LEN_BYTES,
    RACK_PAGE_DEFAULT, RACK_PAGE_MAX, REGISTRATION_PROOF_VERSION,
};
use tokio::sync::Mutex;

use crate::config::HEARTBEAT_FLUSH_INTERVAL;
use crate::db::StoreError;
use crate::secret::{current_generation, SecretFileError};
use crate::state::{FailureKind, Shared};
use crate::util::{constant_time_eq, now_ms, random_hex, sha256_hex};

pub use history::HealthSample;
pub use store::{RackLiveness, RackRow};

/// Registration challenges outstanding at once; a flood of challenge requests cannot grow memory
/// beyond ~100 KiB.
pub const CHALLENGES_PENDING_MAX: usize = 1024;

/// Challenges outstanding for one source address: a single host cannot take every slot and
/// lock registration out for others. A rack needs one; a few racks behind one NAT a few.
pub const CHALLENGES_PER_SOURCE_MAX: usize = 16;

/// How long a rack has to answer a challenge.
pub const CHALLENGE_LIFETIME: Duration = Duration::from_secs(60);

/// Bytes of randomness in a rack credential (its SHA-256 is what the database keeps).
const CREDENTIAL_BYTES: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum RacksError {
    #[error("{reason}")]
    InvalidName { reason: String },
    #[error("too many registrations in progress; try again in a minute")]
    ChallengesFull,
    #[error("too many registrations in progress from this address; try again in a minute")]
    ChallengesFullForSource,
    #[error("unknown or expired challenge nonce: ask for a new challenge")]
    UnknownChallenge,
    #[error("{field} is not hex")]
    NotHex { field: &'static str },
    #[error(
        "registration proof version {found} is not {REGISTRATION_PROOF_VERSION}: this rackd is older than the \
         region and cannot pin its TLS certificate; upgrade rackd, then register again"
    )]
    ProofVersion { found: u32 },
    #[error(
        "wrong secret: the proof does not match this region's shared secret and TLS certificate (see 'regiond \
         secret show' on the region; if the secret is right, something between the rack and the region replaced \
         the region's certificate)"
    )]
    WrongSecret,
    #[error("cannot read the region's secret")]
    Secret { source: SecretFileError },
    #[error("this endpoint needs a rack credential: send 'Authorization: Rack ID:CREDENTIAL'")]
    CredentialMissing,
    #[error("this rack's credential is not known to the region (it was replaced or removed): register again")]
    CredentialUnknown,
    #[error(
        "secret changed: the region's shared secret changed since this rack registered; register again with \
         'rackd register --url URL --secret NEW_SECRET'"
    )]
    SecretChanged,
    #[error("no such rack")]
    NoSuchRack,
    #[error("limit must be 1 to {RACK_PAGE_MAX}")]
    InvalidLimit,
    #[error("{reason}")]
    InvalidPolicy { reason: String },
    #[error("a snapshot lists at most {max} files, not {n}", max = metalrack_api::limits::SNAPSHOT_FILES_MAX)]
    SnapshotTooLarge { n: usize },
    #[error("{value:?} is not a file hash (64 lowercase hex characters)")]
    SnapshotHash { value: String },
    #[error("only administrators may {action}")]
    NotAdmin { action: &'static str },
    #[error("cannot {step}")]
    Store { step: &'static str, source: StoreError },
}

fn store_error(step: &'static str) -> impl FnOnce(StoreError) -> RacksError {
    move |source| RacksError::Store { step, source }
}

#[derive(Debug)]
struct PendingChallenge {
    rack_name: String,
    source: IpAddr,
    issued: Instant,
}

/// The racks domain: the shared state plus what only registration needs in memory.
#[derive(Debug)]
pub struct Racks {
    shared: Shared,
    /// SHA-256 of the certificate the region serves: in every challenge, under every proof.
    certificate_sha256: [u8; CERTIFICATE_SHA256_LEN_BYTES],
    /// Outstanding challenges by nonce; at most [`CHALLENGES_PENDING_MAX`].
    challenges: Mutex<HashMap<String, PendingChallenge>>,
    /// (rack id, generation) pairs already recorded as refused, so a stale rack's heartbeats
    /// add one event, not one every few seconds. At most one entry per rack and generation.
    stale_reported: Mutex<HashSet<(String, i64)>>,
    /// Each rack's recent health from its heartbeats, for the controllers page's charts.
    history: std::sync::Mutex<history::HealthHistory>,
}

impl Racks {
    pub fn new(shared: Shared, certificate_sha256: [u8; CERTIFICATE_SHA256_LEN_BYTES]) -> Racks {
        Racks {
            shared,
            certificate_sha256,
            challenges: Mutex::default(),
            stale_reported: Mutex::default(),
            history: std::sync::Mutex::default(),
        }
    }

    /// The fingerprint a challenge carries, hex.
    pub fn certificate_sha256_hex(&self) -> String {
        hex::encode(self.certificate_sha256)
    }

    /// Step 1 of registration: a single-use nonce bound to the rack's name.
    pub async fn challenge(&self, rack_name: String, source: IpAddr) -> Result<String, RacksError> {
        validate_rack_name(&rack_name).map_err(|reason| RacksError::InvalidName { reason })?;
        let nonce = random_hex(NONCE_LEN_BYTES);
        let mut challenges = self.challenges.lock().await;
        challenges.retain(|_, c| c.issued.elapsed() < CHALLENGE_LIFETIME);
        if challenges.len() >= CHALLENGES_PENDING_MAX {
            return Err(RacksError::ChallengesFull);
        }
        if challenges.values().filter(|c| c.source == source).count() >= CHALLENGES_PER_SOURCE_MAX {
            return Err(RacksError::ChallengesFullForSource);
        }
        challenges.insert(nonce.clone(), PendingChallenge { rack_name, source, issued: Instant::now() });
        Ok(nonce)
    }

    /// Step 2 (over TLS): the proof (HMAC of the nonce, the certificate's fingerprint and the name
    /// under the secret). A right proof gets a new credential, replacing any earlier registration
    /// of the same name, and the region's own proof, by which the rack knows the fingerprint.
    pub async fn register(&self, request: RegisterRequest, peer: IpAddr) -> Result<RegisterResponse, RacksError> {
        validate_rack_name(&request.name).map_err(|reason| RacksError::InvalidName { reason })?;
        if request.proof_version != REGISTRATION_PROOF_VERSION {
            return Err(RacksError::ProofVersion { found: request.proof_version });
        }
        // A nonce is good for one attempt, right or wrong: a guesser needs a new challenge each time.
        let pending = self.challenges.lock().await.remove(&request.nonce);
        let pending = match pending {
            Some(p) if p.issued.elapsed() < CHALLENGE_LIFETIME && p.rack_name == request.name => p,
            _ => return Err(RacksError::UnknownChallenge),
        };
        let nonce = hex::decode(&request.nonce).map_err(|_| RacksError::NotHex { field: "nonce" })?;
        let proof = hex::decode(&request.proof).map_err(|_| RacksError::NotHex { field: "proof" })?;
        let store = &self.shared.store;
        let (secret, generation) = crate::secret::reconcile(self.shared.data_dir(), store, "region")
            .await
            .map_err(|source| RacksError::Secret { source })?;
        if !verify_registration_proof(&secret, &nonce, &self.certificate_sha256, &pending.rack_name, &proof) {
            let message = format!("rack {:?} from {peer} refused: wrong secret", request.name);
            tracing::warn!(rack = %request.name, %peer, "registration refused: wrong secret");
            self.shared.note_failure(FailureKind::Registration, peer, &request.name, &message).await;
            return Err(RacksError::WrongSecret);
        }
        let credential = random_hex(CREDENTIAL_BYTES);
        let (rack_id, replaced) = store
            .register_rack(&request.name, &sha256_hex(credential.as_bytes()), generation)
            .await
            .map_err(store_error("store the registration"))?;
        let verb = if replaced { "registered again (replacing its old registration)" } else { "registered" };
        tracing::info!(rack = %request.name, %rack_id, %peer, replaced, "rack registered");
        store
            .record_event("rack.registered", &request.name, &format!("rack {:?} {verb} from {peer}", request.name))
            .await
            .map_err(store_error("record the registration"))?;
        let cluster_name = self.shared.cluster_name().await.map_err(store_error("read the cluster name"))?;
        let region_proof =
            hex::encode(region_proof(&secret, &nonce, &self.certificate_sha256, &request.name, &rack_id));
        Ok(RegisterResponse { rack_id, credential, cluster_name, region_proof })
    }

    /// The rack an `Authorization: Rack RACK_ID:CREDENTIAL` header names, checked against the
    /// secret generation in force.
    pub async fn authenticate(&self, authorization: Option<&str>) -> Result<RackRow, RacksError> {
        let (rack_id, credential) = authorization
            .and_then(|v| v.strip_prefix("Rack "))
            .and_then(|v| v.split_once(':'))
            .ok_or(RacksError::CredentialMissing)?;
        let store = &self.shared.store;
        let rack =
            store.rack(rack_id).await.map_err(store_error("look up the rack"))?.ok_or(RacksError::CredentialUnknown)?;
        if !constant_time_eq(rack.credential_hash.as_bytes(), sha256_hex(credential.as_bytes()).as_bytes()) {
            return Err(RacksError::CredentialUnknown);
        }
        let generation = current_generation(store).await.map_err(store_error("read the secret generation"))?;
        if rack.secret_generation != generation {
            self.note_stale_rack(&rack, generation).await;
            return Err(RacksError::SecretChanged);
        }
        Ok(rack)
    }

    /// Records (once) that a rack registered under an older secret was refused.
    async fn note_stale_rack(&self, rack: &RackRow, generation: i64) {
        let first = self.stale_reported.lock().await.insert((rack.id.clone(), generation));
        if first {
            let message =
                format!("rack {:?} refused: registered under an older secret; it must register again", rack.name);
            self.shared.record_event_or_log("rack.refused", &rack.name, &message).await;
        }
    }

    /// A heartbeat: health and sync state stored, "online" recorded when the rack was not.
    pub async fn heartbeat(
        &self,
        rack: &RackRow,
        request: &HeartbeatRequest,
        peer: &str,
    ) -> Result<HeartbeatResponse, RacksError> {
        let store = &self.shared.store;
        let generation = current_generation(store).await.map_err(store_error("read the secret generation"))?;
        let was_offline = self.rack_state(rack, generation, now_ms()) != RackState::Online;
        // A rack coming online is written at once, so it shows online everywhere (the metrics'
        // counts read the database); later heartbeats only move `last_seen_ms` forward and
        // replace the health, so they wait for the next flush (see `run_heartbeat_flushes`).
        let recorded = if was_offline {
            store.write_heartbeat(&rack.id, &request.health, request.sync.as_ref(), peer).await
        } else {
            store.buffer_heartbeat(&rack.id, &request.health, request.sync.as_ref(), peer).await
        };
        recorded.map_err(store_error("record the heartbeat"))?;
        self.shared.metrics.heartbeats.inc();
        // One cheap read per heartbeat, for the sync lag (see `history`).
        let revision = store.catalogue_revision().await.map_err(store_error("read the catalogue revision"))?;
        self.history.lock().expect("health history lock").record(
            &rack.id,
            now_ms(),
            &request.health,
            request.sync.as_ref(),
            revision,
        );
        let reported = request.sync.as_ref().and_then(|s| s.snapshot_id.as_ref());
        let snapshot_wanted = reported.is_some_and(|id| rack.snapshot_id.as_ref() != Some(id));
        if was_offline {
            let message = format!("rack {:?} is online (version {})", rack.name, request.health.version);
            store
                .record_event("rack.online", &rack.name, &message)
                .await
                .map_err(store_error("record the rack online"))?;
        }
        Ok(HeartbeatResponse { heartbeat_interval_ms: self.shared.config.rack_heartbeat_interval_ms, snapshot_wanted })
    }

    /// What the rack's current snapshot holds, sent once per snapshot when its heartbeat's
    /// answer asked for it.
    pub async fn put_snapshot(&self, rack: &RackRow, snapshot: &RackSnapshot) -> Result<(), RacksError> {
        if snapshot.file_hashes.len() > metalrack_api::limits::SNAPSHOT_FILES_MAX {
            return Err(RacksError::SnapshotTooLarge { n: snapshot.file_hashes.len() });
        }
        let is_hash = |h: &str| h.len() == 64 && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if let Some(bad) = snapshot.file_hashes.iter().find(|h| !is_hash(h)) {
            return Err(RacksError::SnapshotHash { value: bad.chars().take(80).collect() });
        }
        validate_rack_name(&snapshot.snapshot_id)
            .map_err(|_| RacksError::SnapshotHash { value: snapshot.snapshot_id.chars().take(80).collect() })?;
        self.shared
            .store
            .put_rack_snapshot(&rack.id, &snapshot.snapshot_id, &snapshot.file_hashes)
            .await
            .map_err(store_error("store the rack's snapshot"))
    }

    /// A rack's state now: online while heartbeats arrive, offline after
    /// `rack_offline_after_ms` of silence, and needing re-registration once the secret it
    /// registered under is gone.
    pub fn rack_state(&self, rack: &RackRow, generation: i64, now_ms: i64) -> RackState {
        rack_state(rack, generation, now_ms, self.shared.config.rack_offline_after_ms)
    }

    /// One page of racks by name (`offset` racks skipped, at most `limit`, default
    /// [`RACK_PAGE_DEFAULT`]), each with its latest heartbeat (buffered or stored), and how many
    /// racks there are.
    pub async fn page(&self, offset: u64, limit: Option<u32>) -> Result<RackPage, RacksError> {
        let limit = limit.unwrap_or(RACK_PAGE_DEFAULT);
        if limit == 0 || limit > RACK_PAGE_MAX {
            return Err(RacksError::InvalidLimit);
        }
        let store = &self.shared.store;
        let generation = current_generation(store).await.map_err(store_error("read the secret generation"))?;
        let (rows, total) = store.rack_page(offset, limit).await.map_err(store_error("list racks"))?;
        let now = now_ms();
        let racks = rows.into_iter().map(|(rack, files)| self.view_of(rack, files, generation, now)).collect();
        Ok(RackPage { racks, total })
    }

    fn view_of(&self, rack: RackRow, snapshot_files: u64, generation: i64, now_ms: i64) -> RackView {
        RackView {
            snapshot_files,
            state: self.rack_state(&rack, generation, now_ms),
            id: rack.id,
            name: rack.name,
            registered_at_ms: rack.registered_at_ms,
            last_seen_ms: rack.last_seen_ms,
            health: rack.health,
            remote_address: rack.remote_address,
            sync_policy: rack.sync_policy,
            sync: rack.sync_report,
        }
    }

    /// How many racks are in each state (every state, 0 included) by the views' rule and with
    /// the buffered heartbeats, so the figures agree with the rack list: what the dashboard
    /// shows. Reads three columns per rack; no view is built. (The metrics count in SQL from
    /// the stored rows: see [`Racks::state_counts`].)
    pub async fn current_state_counts(&self) -> Result<Vec<(RackState, u64)>, RacksError> {
        let store = &self.shared.store;
        let generation = current_generation(store).await.map_err(store_error("read the secret generation"))?;
        let racks = store.rack_liveness().await.map_err(store_error("list racks"))?;
        let (now, offline_after_ms) = (now_ms(), self.shared.config.rack_offline_after_ms);
        let all = [RackState::Online, RackState::Offline, RackState::NeedsReregistration];
        Ok(all
            .into_iter()
            .map(|state| {
                let n = racks.iter().filter(|r| state_of(**r, generation, now, offline_after_ms) == state).count();
                (state, n as u64)
            })
            .collect())
    }

    /// A rack's recent health samples, oldest first (see [`history`]).
    pub fn health_samples(&self, rack_id: &str) -> Vec<HealthSample> {
        self.history.lock().expect("health history lock").samples(rack_id)
    }

    /// How many racks are in each state (every state, 0 included): one grouped query.
    pub async fn state_counts(&self) -> Result<Vec<(RackState, i64)>, RacksError> {
        let store = &self.shared.store;
        let generation = current_generation(store).await.map_err(store_error("read the secret generation"))?;
        let offline_after_ms = self.shared.config.rack_offline_after_ms;
        let counts = store
            .rack_state_counts(generation, now_ms(), offline_after_ms)
            .await
            .map_err(store_error("count racks"))?;
        let all = [RackState::Online, RackState::Offline, RackState::NeedsReregistration];
        Ok(all
            .into_iter()
            .map(|state| {
                let word = state_word(state);
                (state, counts.iter().find(|(w, _)| w == word).map_or(0, |(_, n)| *n))
            })
            .collect())
    }

    pub async fn view(&self, id: &str) -> Result<RackView, RacksError> {
        let store = &self.shared.store;
        let rack = store.rack(id).await.map_err(store_error("look up the rack"))?.ok_or(RacksError::NoSuchRack)?;
        let files = store.rack_snapshot_files_count(id).await.map_err(store_error("count snapshot files"))?;
        let generation = current_generation(store).await.map_err(store_error("read the secret generation"))?;
        Ok(self.view_of(rack, files, generation, now_ms()))
    }

    /// Sets a rack's sync policy; the rack hears of it with its next catalogue poll.
    pub async fn set_sync_policy(
        &self,
        actor: &crate::users::User,
        rack_id: &str,
        policy: &SyncPolicy,
    ) -> Result<(), RacksError> {
        require_admin(actor, "change sync policies")?;
        policy.validate().map_err(|reason| RacksError::InvalidPolicy { reason })?;
        let store = &self.shared.store;
        if !store.set_sync_policy(rack_id, policy).await.map_err(store_error("store the sync policy"))? {
            return Err(RacksError::NoSuchRack);
        }
        let message =
            format!("sync policy of rack {rack_id} set to {}", serde_json::to_string(policy).unwrap_or_default());
        store.record_event("sync.policy", &actor.username, &message).await.map_err(store_error("record the policy"))?;
        self.shared.notify_rack_change(&[Some(rack_id)]);
        Ok(())
    }

    /// "Sync now" for one rack or (with `None`) every rack.
    pub async fn request_sync(&self, actor: &crate::users::User, rack_id: Option<&str>) -> Result<(), RacksError> {
        require_admin(actor, "start a sync")?;
        let store = &self.shared.store;
        let n = store.request_sync(rack_id).await.map_err(store_error("request the sync"))?;
        if rack_id.is_some() && n == 0 {
            return Err(RacksError::NoSuchRack);
        }
        let whom = rack_id.map(|id| format!("rack {id}")).unwrap_or_else(|| format!("all {n} racks"));
        store
            .record_event("sync.requested", &actor.username, &format!("sync now requested for {whom}"))
            .await
            .map_err(store_error("record the sync request"))?;
        match rack_id {
            Some(rack_id) => self.shared.notify_rack_change(&[Some(rack_id)]),
            None => self.shared.notify_change(),
        }
        Ok(())
    }
}

/// Writes the buffered heartbeats every [`HEARTBEAT_FLUSH_INTERVAL`], in one transaction each
/// time, until aborted; the region runs it beside its other tasks and calls
/// [`flush_heartbeats_once`] once more at shutdown.
pub async fn run_heartbeat_flushes(shared: Shared) {
    let mut interval = tokio::time::interval(HEARTBEAT_FLUSH_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        flush_heartbeats_once(&shared).await;
    }
}

/// Writes the buffered heartbeats now. A failure is logged and the heartbeats stay buffered
/// for the next flush.
pub async fn flush_heartbeats_once(shared: &Shared) {
    match shared.store.flush_heartbeats().await {
        Ok(0) => {}
        Ok(n) => {
            shared.metrics.heartbeat_flushes.inc();
            shared.metrics.heartbeats_flushed.inc_by(n as u64);
        }
        Err(e) => {
            let pending = shared.store.heartbeats_pending();
            tracing::warn!(error = %e, pending, "cannot write the racks' heartbeats; they stay buffered for the next try");
        }
    }
}

fn require_admin(user: &crate::users::User, action: &'static str) -> Result<(), RacksError> {
    if user.is_admin {
        Ok(())
    } else {
        Err(RacksError::NotAdmin { action })
    }
}

/// A state as the API spells it (`RackState`'s serde name), which the metrics use too.
pub fn state_word(state: RackState) -> &'static str {
    match state {
        RackState::Online => "online",
        RackState::Offline => "offline",
        RackState::NeedsReregistration => "needs_reregistration",
    }
}

/// The state rule without I/O: see [`Racks::rack_state`].
pub fn rack_state(rack: &RackRow, generation: i64, now_ms: i64, offline_after_ms: u64) -> RackState {
    let liveness = RackLiveness { secret_generation: rack.secret_generation, last_seen_ms: rack.last_seen_ms };
    state_of(liveness, generation, now_ms, offline_after_ms)
}

/// The state rule itself, on only what it reads: the one place it is written (the metrics'
/// SQL in `Store::rack_state_counts` mirrors it).
pub fn state_of(rack: RackLiveness, generation: i64, now_ms: i64, offline_after_ms: u64) -> RackState {
    if rack.secret_generation != generation {
        return RackState::NeedsReregistration;
    }
    match rack.last_seen_ms {
        Some(seen) if now_ms - seen < offline_after_ms as i64 => RackState::Online,
        _ => RackState::Offline,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metalrack_api::images::SyncPolicyKind;

    fn rack(generation: i64, last_seen_ms: Option<i64>) -> RackRow {
        RackRow {
            id: "r1".into(),
            name: "rack1".into(),
            credential_hash: String::new(),
            secret_generation: generation,
            registered_at_ms: 0,
            last_seen_ms,
            health: None,
            remote_address: None,
            sync_policy: SyncPolicy {
                policy: SyncPolicyKind::Auto,
                delay_ms: 0,
                window_start: String::new(),
                window_end: String::new(),
                bandwidth_bytes_per_s: 0,
            },
            sync_requested: 0,
            sync_report: None,
            snapshot_id: None,
            boot_generation: 0,
        }
    }

    #[test]
    fn rack_state_follows_heartbeats_and_the_secret_generation() {
        assert_eq!(rack_state(&rack(1, Some(1_000)), 1, 5_000, 30_000), RackState::Online);
        assert_eq!(rack_state(&rack(1, Some(1_000)), 1, 31_000, 30_000), RackState::Offline);
        assert_eq!(rack_state(&rack(1, None), 1, 0, 30_000), RackState::Offline);
        assert_eq!(rack_state(&rack(1, Some(1_000)), 2, 5_000, 30_000), RackState::NeedsReregistration);
    }

    #[test]
    fn state_words_are_the_api_names() {
        for state in [RackState::Online, RackState::Offline, RackState::NeedsReregistration] {
            assert_eq!(serde_json::to_value(state).unwrap(), state_word(state));
        }
    }
}
