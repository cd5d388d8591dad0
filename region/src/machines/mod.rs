//! Machines: their lifecycle (add, commission, deploy, release, break and fix, through the
//! transition table in [`lifecycle`]), their power (requests racks poll for, results they post),
//! what each rack is told to boot for each MAC (served with the catalogue so boots never ask the
//! region), the reports racks forward from machines' agents, the deploy queue per rack, the
//! stall timer, and the boot events racks report.
//!
//! Every change of state records an event naming who caused it (a user, a rack, or one of the
//! region's timers) and the machine; a change racks must hear of wakes their long-polls.

pub mod lifecycle;
pub mod store;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use metalrack_api::agent::{AgentJob, AgentReport, DeployEnv, EraseMode, ImageRef, AGENT_TOKEN_HEX_LEN};
use metalrack_api::images::{validate_image_name, validate_image_token};
use metalrack_api::machines::{
    normalize_mac, BootAction, BootEvent, BrokenRequest, DeployRequest, MachineBoot, MachineCreate, MachineEdit,
    MachinePage, MachineState, MachineUpdate, MachineView, PowerCommand, ReleaseRequest, BOOT_EVENTS_PER_REQUEST_MAX,
    BOOT_EVENT_KIND_BYTES_MAX, BOOT_EVENT_MAC_BYTES_MAX, BOOT_EVENT_MESSAGE_BYTES_MAX, BOOT_EVENT_QUEUE_ID_END,
    MACHINE_PAGE_MAX,
};
use metalrack_api::power::{
    BootDevice, PowerAction, PowerParameters, PowerRequest, PowerResult, PowerState, POWER_ERROR_BYTES_MAX,
    POWER_REQUESTS_PER_POLL_MAX,
};
use metalrack_api::EventView;
use metalrack_image_tools::log_safe::escape_control;
use sqlx::AnyConnection;

use crate::db::{query_error, StoreError};
use crate::state::Shared;
use crate::users::User;
use lifecycle::{Illegal, Trigger};
use store::MachineRow;

/// Longest hostname or kernel command line accepted (boot event fields have their own limits in
/// the wire contract, which racks truncate to).
pub const TEXT_LEN_MAX: usize = 1024;

pub use metalrack_api::limits::POWER_RESEND_AFTER;

/// Answered power requests are kept this long (for a look at what was asked of a BMC, in the
/// database), then deleted with the next power poll: open requests are at most one per machine
/// (a new one replaces the last), so the table holds machines plus a day of history.
pub const POWER_REQUESTS_DONE_KEPT: Duration = Duration::from_secs(24 * 3600);

/// Events one machine's event list shows (newest first).
pub const MACHINE_EVENTS_SHOWN_MAX: i64 = 1000;

/// How often the stall timer and the deploy scheduler look at the machines: the stall timeout's
/// granularity, and the longest a freed slot waits when no event frees it at once.
pub const MACHINE_TICK: Duration = Duration::from_secs(1);

/// The catalogue file kind a deploy writes to the disk.
pub const ROOT_DISK_KIND: &str = "root-disk";

/// Who the stall timer and scheduler are in events.
const STALL_TIMER: &str = "stall timer";
const DEPLOY_SCHEDULER: &str = "deploy scheduler";
const POWER_POLL: &str = "power poll";

#[derive(Debug, thiserror::Error)]
pub enum MachinesError {
    #[error("only administrators may change machines")]
    NotAdmin,
    #[error("{reason}")]
    InvalidMac { reason: String },
    #[error("hostname too long")]
    HostnameTooLong,
    #[error("hostname {hostname:?}: use letters, digits and '-' (at most 63)")]
    InvalidHostname { hostname: String },
    #[error("{reason}")]
    InvalidImage { reason: String },
    #[error("{reason}")]
    InvalidPower { reason: String },
    #[error("kernel_params must be one line of at most {TEXT_LEN_MAX} characters")]
    InvalidKernelParams,
    #[error("a reason is 1 to {TEXT_LEN_MAX} characters of one line")]
    InvalidReason,
    #[error("limit must be 1 to {MACHINE_PAGE_MAX}")]
    InvalidLimit,
    #[error("unknown state {state:?}")]
    InvalidState { state: String },
    #[error("at most {BOOT_EVENTS_PER_REQUEST_MAX} events per request")]
    TooManyEvents,
    #[error("boot event {index}: invalid kind {kind:?} (kinds start with \"boot.\" or \"machine.\")")]
    InvalidEvent { index: usize, kind: String },
    #[error("boot event {index}: {field} is {len} bytes, at most {max}")]
    EventFieldTooLong { index: usize, field: &'static str, len: usize, max: usize },
    #[error("boot event {index}: queue_id must be below 2^53 and seq below 2^63")]
    EventIdOutOfRange { index: usize },
    #[error("no machine {key:?}")]
    NoSuchMachine { key: String },
    #[error("no rack {key:?}")]
    NoSuchRack { key: String },
    #[error("name the rack the machine boots from (there are several, or none registered)")]
    RackRequired,
    #[error("a machine with MAC {mac} exists already")]
    MacTaken { mac: String },
    #[error("machine {hostname} boots from no rack: set its rack first")]
    NoRack { hostname: String },
    #[error("machine {hostname} has no power driver to {action}")]
    NoPowerDriver { hostname: String, action: &'static str },
    #[error("no deploy environment in the catalogue: push one with imgtool deploy-env build --push")]
    NoDeployEnv,
    #[error("image {image} {arch} has no version{} with a {ROOT_DISK_KIND} file", .version.as_ref().map(|v| format!(" {v}")).unwrap_or_default())]
    NoDeployableImage { image: String, arch: String, version: Option<String> },
    #[error("{source}")]
    Illegal { source: Illegal },
    #[error("cannot {step}")]
    Store { step: &'static str, source: StoreError },
}

fn store_error(step: &'static str) -> impl FnOnce(StoreError) -> MachinesError {
    move |source| MachinesError::Store { step, source }
}

fn require_admin(actor: &User) -> Result<(), MachinesError> {
    if actor.is_admin {
        Ok(())
    } else {
        Err(MachinesError::NotAdmin)
    }
}

/// 8 random lower-case letters and digits.
fn new_machine_id() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..8).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char).collect()
}

fn new_job_token() -> String {
    let token = crate::util::random_hex(AGENT_TOKEN_HEX_LEN / 2);
    debug_assert_eq!(token.len(), AGENT_TOKEN_HEX_LEN);
    token
}

/// The hostname a machine gets from its MAC when nobody named it.
fn hostname_from_mac(mac: &str) -> String {
    format!("node-{}", mac.replace(':', ""))
}

fn check_hostname(hostname: &str) -> Result<(), MachinesError> {
    let valid = !hostname.is_empty()
        && hostname.len() <= 63
        && hostname.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        && !hostname.starts_with('-');
    if valid {
        Ok(())
    } else {
        Err(MachinesError::InvalidHostname { hostname: hostname.chars().take(80).collect() })
    }
}

/// A machine key from the API: a MAC (any separator) becomes its normal form; else an id.
fn machine_key(key: &str) -> String {
    normalize_mac(key).unwrap_or_else(|_| key.to_owned())
}

/// What a change did besides the row: its events and the power request it queues.
#[derive(Debug, Default)]
struct Effects {
    /// `(kind, message)` events about the machine.
    events: Vec<(&'static str, String)>,
    power: Option<Vec<PowerAction>>,
}

impl Effects {
    fn event(&mut self, kind: &'static str, message: String) {
        self.events.push((kind, message));
    }
}

/// Moves `row` by `trigger`, recording the transition.
fn step(row: &mut MachineRow, trigger: Trigger, effects: &mut Effects) -> Result<(), MachinesError> {
    let next = lifecycle::transition(row.state, trigger).map_err(|source| MachinesError::Illegal { source })?;
    if next != row.state {
        effects
            .event("machine.state", format!("{} ({}): {} → {}", row.hostname, row.id, row.state.label(), next.label()));
    }
    row.state = next;
    Ok(())
}

/// Starts a job: a new token (reports of the job before are ignored from now on), and the
/// stall timer counts from now.
fn start_job(row: &mut MachineRow, job: AgentJob, now: i64) {
    row.job = Some(job);
    row.job_token = Some(new_job_token());
    row.progress = None;
    row.last_progress_at_ms = Some(now);
    row.status_message.clear();
}

fn end_job(row: &mut MachineRow) {
    row.job = None;
    row.job_token = None;
}

fn is_manual(row: &MachineRow) -> bool {
    matches!(row.power, None | Some(PowerParameters::Manual))
}

/// Writes a change in the caller's transaction: the row, its events, its power request (or,
/// for a machine without a BMC, an event asking the operator). Returns whether a power request
/// was queued.
async fn write_change(
    conn: &mut AnyConnection,
    before: &MachineRow,
    row: &mut MachineRow,
    effects: Effects,
    actor: &str,
) -> Result<bool, StoreError> {
    let now = crate::util::now_ms();
    row.updated_at_ms = now;
    if row.state != before.state {
        row.state_changed_at_ms = now;
    }
    store::save_machine(conn, row).await?;
    if racks_must_hear(before, row) {
        // With the change, so a power request queued below never reaches a rack with a
        // generation its boot table could reach without this change.
        store::raise_boot_generation(conn, &[before.rack_id.as_deref(), row.rack_id.as_deref()]).await?;
    }
    for (kind, message) in &effects.events {
        store::insert_machine_event(conn, kind, actor, message, &row.id).await?;
    }
    let Some(actions) = effects.power else { return Ok(false) };
    // A new request replaces what is still queued for the machine: a cycle for a job asked
    // for later must not run before an older off.
    store::cancel_power(conn, &row.id).await?;
    match (&row.rack_id, is_manual(row)) {
        (Some(rack_id), false) => {
            store::queue_power(conn, rack_id, &row.id, &actions).await?;
            Ok(true)
        }
        _ => {
            let message =
                format!("{} has no BMC the region can drive: do by hand: {}", row.hostname, describe_actions(&actions));
            store::insert_machine_event(conn, "machine.power_manual", actor, &message, &row.id).await?;
            Ok(false)
        }
    }
}

fn describe_actions(actions: &[PowerAction]) -> String {
    let words: Vec<String> = actions
        .iter()
        .map(|a| match a {
            PowerAction::On => "power on".to_owned(),
            PowerAction::Off => "power off".to_owned(),
            PowerAction::Cycle => "power cycle (on if off)".to_owned(),
            PowerAction::Query => "query power".to_owned(),
            PowerAction::SetNextBoot(BootDevice::Pxe) => "boot from the network next".to_owned(),
            PowerAction::SetNextBoot(BootDevice::Disk) => "boot from the disk next".to_owned(),
        })
        .collect();
    words.join(", then ")
}

/// What a change of `before` into `after` means for racks: they must hear of a new boot action.
fn racks_must_hear(before: &MachineRow, after: &MachineRow) -> bool {
    before.state != after.state
        || before.job_token != after.job_token
        || before.boot != after.boot
        || before.hostname != after.hostname
        || before.rack_id != after.rack_id
        || before.mac != after.mac
}

/// Loads machine `key`, lets `change` alter it (returning its effects), and writes it all in one
/// transaction; then wakes the racks' long-polls that must hear of it.
async fn change_machine<F>(shared: &Shared, key: &str, actor: &str, change: F) -> Result<MachineRow, MachinesError>
where
    F: FnOnce(&mut MachineRow, i64) -> Result<Effects, MachinesError>,
{
    let key = machine_key(key);
    let mut tx = shared
        .store
        .begin_write()
        .await
        .map_err(query_error("begin machine change"))
        .map_err(store_error("change the machine"))?;
    let before = store::machine_row(&mut tx, &key)
        .await
        .map_err(store_error("look up the machine"))?
        .ok_or_else(|| MachinesError::NoSuchMachine { key: key.clone() })?;
    let mut row = before.clone();
    let effects = change(&mut row, crate::util::now_ms())?;
    let queued =
        write_change(&mut tx, &before, &mut row, effects, actor).await.map_err(store_error("store the change"))?;
    tx.commit().await.map_err(query_error("commit machine change")).map_err(store_error("store the change"))?;
    after_change(shared, &before, &row, queued).await;
    Ok(row)
}

/// Wakes whoever must hear of a committed change, and gives freed deploy slots away.
async fn after_change(shared: &Shared, before: &MachineRow, after: &MachineRow, power_queued: bool) {
    if racks_must_hear(before, after) {
        shared.notify_rack_change(&[before.rack_id.as_deref(), after.rack_id.as_deref()]);
    }
    if power_queued {
        shared.notify_power();
    }
    let slot_freed = before.state == MachineState::Deploying && after.state != MachineState::Deploying;
    if slot_freed || (after.state == MachineState::Allocated && before.state != MachineState::Allocated) {
        // Boxed: the scheduler changes machines itself (its grants free no slot, so this ends).
        if let Err(e) = Box::pin(schedule_deploys(shared)).await {
            tracing::error!(error = %metalrack_image_tools::error_chain(&e), "deploy scheduler failed");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Views.

/// The API's view of rows: rack names, queue positions, no passwords.
async fn views(shared: &Shared, rows: Vec<MachineRow>) -> Result<Vec<MachineView>, MachinesError> {
    let rack_names = shared.store.rack_names().await.map_err(store_error("list racks"))?;
    let mut conn = shared.store.connection().await.map_err(store_error("read the machines"))?;
    let mut positions = store::queue_positions(&mut conn, &rows).await.map_err(store_error("read the deploy queue"))?;
    drop(conn);
    let mut views = Vec::with_capacity(rows.len());
    for row in rows {
        let queue_position = positions.remove(&row.id);
        let rack_name = row.rack_id.as_ref().and_then(|id| rack_names.get(id)).cloned();
        views.push(MachineView {
            id: row.id,
            hostname: row.hostname,
            mac: row.mac,
            state: row.state,
            status_message: row.status_message,
            rack_id: row.rack_id,
            rack_name,
            power: row.power.as_ref().map(PowerParameters::view),
            power_state: row.power_state,
            power_checked_at_ms: row.power_checked_at_ms,
            image: row.image,
            disk: row.disk,
            progress: row.progress,
            queue_position,
            inventory: row.inventory,
            boot: row.boot,
            updated_at_ms: row.updated_at_ms,
            state_changed_at_ms: row.state_changed_at_ms,
        });
    }
    Ok(views)
}

async fn view(shared: &Shared, row: MachineRow) -> Result<MachineView, MachinesError> {
    Ok(views(shared, vec![row]).await?.pop().expect("one view per row"))
}

pub async fn get(shared: &Shared, key: &str) -> Result<MachineView, MachinesError> {
    let key = machine_key(key);
    let mut conn = shared.store.connection().await.map_err(store_error("read the machine"))?;
    let row = store::machine_row(&mut conn, &key)
        .await
        .map_err(store_error("look up the machine"))?
        .ok_or(MachinesError::NoSuchMachine { key })?;
    drop(conn);
    view(shared, row).await
}

/// One page of machines, `state` filtering when given (its API word).
pub async fn list(
    shared: &Shared,
    state: Option<&str>,
    offset: u64,
    limit: Option<u32>,
) -> Result<MachinePage, MachinesError> {
    let state = state
        .filter(|s| !s.is_empty())
        .map(|s| {
            MachineState::parse(s).ok_or_else(|| MachinesError::InvalidState { state: s.chars().take(40).collect() })
        })
        .transpose()?;
    let limit = limit.unwrap_or(100);
    if limit == 0 || limit > MACHINE_PAGE_MAX {
        return Err(MachinesError::InvalidLimit);
    }
    let (rows, total) = shared.store.machine_page(state, offset, limit).await.map_err(store_error("list machines"))?;
    Ok(MachinePage { machines: views(shared, rows).await?, total })
}

/// How many machines are in each state (states with none left out), in lifecycle order.
pub async fn counts_by_state(shared: &Shared) -> Result<Vec<(MachineState, u64)>, MachinesError> {
    shared.store.machine_counts_by_state().await.map_err(store_error("count machines by state"))
}

pub async fn events(shared: &Shared, key: &str) -> Result<Vec<EventView>, MachinesError> {
    let machine = get(shared, key).await?;
    shared
        .store
        .machine_events(&machine.id, MACHINE_EVENTS_SHOWN_MAX)
        .await
        .map_err(store_error("list the machine's events"))
}

// ---------------------------------------------------------------------------------------------
// Operator changes.

/// The rack `key` names (id or name), or the only rack when `key` is `None`.
async fn resolve_rack(conn: &mut AnyConnection, key: Option<&str>) -> Result<String, MachinesError> {
    match key {
        Some(key) => store::rack_id_by_key(conn, key)
            .await
            .map_err(store_error("look up the rack"))?
            .ok_or_else(|| MachinesError::NoSuchRack { key: key.chars().take(80).collect() }),
        None => {
            let ids = store::rack_ids(conn).await.map_err(store_error("list racks"))?;
            match <[String; 1]>::try_from(ids) {
                Ok([id]) => Ok(id),
                Err(_) => Err(MachinesError::RackRequired),
            }
        }
    }
}

fn check_power(power: &PowerParameters) -> Result<(), MachinesError> {
    power.validate().map_err(|reason| MachinesError::InvalidPower { reason })
}

pub async fn add(shared: &Shared, actor: &User, create: MachineCreate) -> Result<MachineView, MachinesError> {
    require_admin(actor)?;
    let mac = normalize_mac(&create.mac).map_err(|reason| MachinesError::InvalidMac { reason })?;
    let hostname = if create.hostname.is_empty() { hostname_from_mac(&mac) } else { create.hostname };
    check_hostname(&hostname)?;
    check_power(&create.power)?;
    let store_step = |step| move |e: sqlx::Error| MachinesError::Store { step, source: query_error("machine add")(e) };
    let mut tx = shared.store.begin_write().await.map_err(store_step("add the machine"))?;
    let rack_id = resolve_rack(&mut tx, create.rack.as_deref()).await?;
    let now = crate::util::now_ms();
    let row = MachineRow {
        rack_id: Some(rack_id),
        power: Some(create.power),
        ..MachineRow::new(new_machine_id(), mac.clone(), hostname, now)
    };
    if !store::insert_machine(&mut tx, &row).await.map_err(store_error("add the machine"))? {
        return Err(MachinesError::MacTaken { mac });
    }
    let message = format!("machine {} ({}) added with MAC {mac}", row.hostname, row.id);
    store::insert_machine_event(&mut tx, "machine.added", &actor.username, &message, &row.id)
        .await
        .map_err(store_error("record the addition"))?;
    tx.commit().await.map_err(store_step("add the machine"))?;
    shared.notify_rack_change(&[row.rack_id.as_deref()]);
    view(shared, row).await
}

pub async fn edit(shared: &Shared, actor: &User, key: &str, edit: MachineEdit) -> Result<MachineView, MachinesError> {
    require_admin(actor)?;
    if let Some(hostname) = &edit.hostname {
        check_hostname(hostname)?;
    }
    if let Some(power) = &edit.power {
        check_power(power)?;
    }
    let rack_id = match &edit.rack {
        Some(key) => {
            let mut conn = shared.store.connection().await.map_err(store_error("look up the rack"))?;
            Some(resolve_rack(&mut conn, Some(key)).await?)
        }
        None => None,
    };
    let row = change_machine(shared, key, &actor.username, move |row, _| {
        let mut effects = Effects::default();
        let mut changed = Vec::new();
        if let Some(hostname) = edit.hostname {
            changed.push(format!("hostname {} → {hostname}", row.hostname));
            row.hostname = hostname;
        }
        if let Some(power) = edit.power {
            // The view, never the parameters: the password stays out of the log.
            changed.push(format!("power driver {:?}", power.driver()));
            row.power = Some(power);
        }
        if let Some(rack_id) = rack_id {
            changed.push(format!("rack {rack_id}"));
            row.rack_id = Some(rack_id);
        }
        effects.event("machine.edited", format!("{} ({}) edited: {}", row.hostname, row.id, changed.join(", ")));
        Ok(effects)
    })
    .await?;
    view(shared, row).await
}

pub async fn delete(shared: &Shared, actor: &User, key: &str) -> Result<(), MachinesError> {
    require_admin(actor)?;
    let key = machine_key(key);
    let mut tx =
        shared.store.begin_write().await.map_err(query_error("begin")).map_err(store_error("delete the machine"))?;
    let row = store::machine_row(&mut tx, &key)
        .await
        .map_err(store_error("look up the machine"))?
        .ok_or_else(|| MachinesError::NoSuchMachine { key: key.clone() })?;
    store::delete_machine(&mut tx, &row.id).await.map_err(store_error("delete the machine"))?;
    let message = format!("machine {} ({}, MAC {}) deleted", row.hostname, row.id, row.mac);
    store::insert_machine_event(&mut tx, "machine.deleted", &actor.username, &message, &row.id)
        .await
        .map_err(store_error("record the deletion"))?;
    tx.commit().await.map_err(query_error("commit")).map_err(store_error("delete the machine"))?;
    shared.notify_rack_change(&[row.rack_id.as_deref()]);
    if row.state == MachineState::Deploying {
        let _ = schedule_deploys(shared).await;
    }
    Ok(())
}

/// The deploy environment racks boot machines into: the newest version of the configured image
/// with `kernel` and `initrd` files; `None` while the catalogue holds none.
pub async fn deploy_env(shared: &Shared) -> Result<Option<DeployEnv>, MachinesError> {
    let config = &shared.config;
    let mut conn = shared.store.connection().await.map_err(store_error("find the deploy environment"))?;
    store::deploy_env(&mut conn, &config.deploy_env_image, &config.deploy_env_arch, &config.deploy_env_kernel_params)
        .await
        .map_err(store_error("find the deploy environment"))
}

async fn require_deploy_env(shared: &Shared) -> Result<DeployEnv, MachinesError> {
    deploy_env(shared).await?.ok_or(MachinesError::NoDeployEnv)
}

/// A machine must boot from a rack to run a job, and a rack can only drive a BMC it knows.
fn require_rack(row: &MachineRow) -> Result<(), MachinesError> {
    if row.rack_id.is_none() && !is_manual(row) {
        return Err(MachinesError::NoRack { hostname: row.hostname.clone() });
    }
    Ok(())
}

/// The network boot, then on (or a reset when on): how every job starts.
fn boot_job_power() -> Vec<PowerAction> {
    vec![PowerAction::SetNextBoot(BootDevice::Pxe), PowerAction::Cycle]
}

pub async fn commission(shared: &Shared, actor: &User, key: &str) -> Result<MachineView, MachinesError> {
    require_admin(actor)?;
    require_deploy_env(shared).await?;
    let row = change_machine(shared, key, &actor.username, |row, now| {
        let mut effects = Effects::default();
        step(row, Trigger::Commission, &mut effects)?;
        require_rack(row)?;
        start_job(row, AgentJob::Commission, now);
        effects.power = Some(boot_job_power());
        Ok(effects)
    })
    .await?;
    view(shared, row).await
}

pub async fn deploy(
    shared: &Shared,
    actor: &User,
    key: &str,
    request: DeployRequest,
) -> Result<MachineView, MachinesError> {
    require_admin(actor)?;
    let invalid = |reason| MachinesError::InvalidImage { reason };
    validate_image_name(&request.image).map_err(invalid)?;
    validate_image_token("arch", &request.arch).map_err(invalid)?;
    if let Some(version) = &request.version {
        validate_image_token("version", version).map_err(invalid)?;
    }
    if let Some(disk) = &request.disk {
        if disk.is_empty() || disk.len() > 64 || !disk.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_/".contains(&b))
        {
            return Err(MachinesError::InvalidImage { reason: format!("disk {disk:?} is not a disk name") });
        }
    }
    require_deploy_env(shared).await?;
    let versions = {
        let mut conn = shared.store.connection().await.map_err(store_error("list image versions"))?;
        store::image_versions(&mut conn, &request.image, &request.arch)
            .await
            .map_err(store_error("list image versions"))?
    };
    let version = versions
        .into_iter()
        .filter(|(_, kinds)| kinds.iter().any(|k| k == ROOT_DISK_KIND))
        .map(|(version, _)| version)
        .find(|version| request.version.as_ref().is_none_or(|wanted| wanted == version))
        .ok_or_else(|| MachinesError::NoDeployableImage {
            image: request.image.clone(),
            arch: request.arch.clone(),
            version: request.version.clone(),
        })?;
    let image = ImageRef { image: request.image, arch: request.arch, version };
    let row = change_machine(shared, key, &actor.username, move |row, now| {
        let mut effects = Effects::default();
        step(row, Trigger::Allocate, &mut effects)?;
        require_rack(row)?;
        row.disk =
            request.disk.or_else(|| row.inventory.as_ref().and_then(|i| i.disks.first()).map(|d| d.name.clone()));
        effects.event(
            "machine.deploy",
            format!(
                "{} ({}): deploy {} {} version {} to {} asked for",
                row.hostname,
                row.id,
                image.image,
                image.arch,
                image.version,
                row.disk.as_deref().unwrap_or("the first disk")
            ),
        );
        row.image = Some(image);
        row.deploy_requested_at_ms = Some(now);
        row.status_message.clear();
        end_job(row);
        Ok(effects)
    })
    .await?;
    // The scheduler may have started it already.
    get(shared, &row.id).await
}

pub async fn release(
    shared: &Shared,
    actor: &User,
    key: &str,
    request: ReleaseRequest,
) -> Result<MachineView, MachinesError> {
    require_admin(actor)?;
    let erase = request.erase;
    if erase != EraseMode::None {
        require_deploy_env(shared).await?;
    }
    let row = change_machine(shared, key, &actor.username, move |row, now| {
        let mut effects = Effects::default();
        step(row, Trigger::Release, &mut effects)?;
        row.status_message.clear();
        if erase == EraseMode::None {
            end_job(row);
            row.last_progress_at_ms = Some(now);
            effects.power = Some(vec![PowerAction::Off]);
            if is_manual(row) {
                // Nobody will report the power state: the operator is asked to switch it off.
                step(row, Trigger::PowerOffConfirmed, &mut effects)?;
            }
        } else {
            require_rack(row)?;
            let disk = row.disk.clone();
            start_job(row, AgentJob::Release { erase, disk }, now);
            effects.power = Some(boot_job_power());
        }
        Ok(effects)
    })
    .await?;
    view(shared, row).await
}

pub async fn power(
    shared: &Shared,
    actor: &User,
    key: &str,
    command: PowerCommand,
) -> Result<MachineView, MachinesError> {
    require_admin(actor)?;
    let (action, word) = match command {
        PowerCommand::On => (PowerAction::On, "power on"),
        PowerCommand::Off => (PowerAction::Off, "power off"),
        PowerCommand::Cycle => (PowerAction::Cycle, "power cycle"),
        PowerCommand::Query => (PowerAction::Query, "query power"),
    };
    let row = change_machine(shared, key, &actor.username, |row, _| {
        if is_manual(row) {
            return Err(MachinesError::NoPowerDriver { hostname: row.hostname.clone(), action: word });
        }
        require_rack(row)?;
        let mut effects = Effects::default();
        effects.event("machine.power", format!("{} ({}): {word} asked for", row.hostname, row.id));
        effects.power = Some(vec![action]);
        Ok(effects)
    })
    .await?;
    view(shared, row).await
}

pub async fn mark_broken(
    shared: &Shared,
    actor: &User,
    key: &str,
    request: BrokenRequest,
) -> Result<MachineView, MachinesError> {
    require_admin(actor)?;
    let reason = request.reason.trim().to_owned();
    if reason.is_empty() || reason.len() > TEXT_LEN_MAX || reason.chars().any(char::is_control) {
        return Err(MachinesError::InvalidReason);
    }
    let row = change_machine(shared, key, &actor.username, move |row, _| {
        let mut effects = Effects::default();
        step(row, Trigger::MarkBroken, &mut effects)?;
        effects.event("machine.broken", format!("{} ({}) marked broken: {reason}", row.hostname, row.id));
        row.status_message = reason;
        end_job(row);
        Ok(effects)
    })
    .await?;
    view(shared, row).await
}

pub async fn mark_fixed(shared: &Shared, actor: &User, key: &str) -> Result<MachineView, MachinesError> {
    require_admin(actor)?;
    let row = change_machine(shared, key, &actor.username, |row, _| {
        let mut effects = Effects::default();
        step(row, Trigger::MarkFixed { commissioned: row.inventory.is_some() }, &mut effects)?;
        row.status_message.clear();
        Ok(effects)
    })
    .await?;
    view(shared, row).await
}

pub async fn abort(shared: &Shared, actor: &User, key: &str) -> Result<MachineView, MachinesError> {
    require_admin(actor)?;
    let who = actor.username.clone();
    let row = change_machine(shared, key, &actor.username, move |row, _| {
        let mut effects = Effects::default();
        let was_running = lifecycle::runs_job(row.state);
        step(row, Trigger::Abort, &mut effects)?;
        end_job(row);
        row.status_message = format!("aborted by {who}");
        if was_running {
            effects.power = Some(vec![PowerAction::Off]);
        }
        Ok(effects)
    })
    .await?;
    view(shared, row).await
}

/// Sets what a machine boots while it runs no job (the bare decision, as before the lifecycle);
/// a MAC the region does not know becomes a new machine served by every rack.
pub async fn put(shared: &Shared, actor: &User, mac: &str, update: MachineUpdate) -> Result<(), MachinesError> {
    require_admin(actor)?;
    let mac = normalize_mac(mac).map_err(|reason| MachinesError::InvalidMac { reason })?;
    if update.hostname.len() > TEXT_LEN_MAX {
        return Err(MachinesError::HostnameTooLong);
    }
    match &update.boot {
        BootAction::Image { image, arch, version, kernel_params } => {
            let invalid = |reason| MachinesError::InvalidImage { reason };
            validate_image_name(image).map_err(invalid)?;
            validate_image_token("arch", arch).map_err(invalid)?;
            validate_image_token("version", version).map_err(invalid)?;
            if kernel_params.len() > TEXT_LEN_MAX || kernel_params.chars().any(|c| c.is_control()) {
                return Err(MachinesError::InvalidKernelParams);
            }
        }
        BootAction::Agent { .. } => {
            return Err(MachinesError::InvalidImage {
                reason: "agent boots are the lifecycle's: commission, deploy or release the machine".into(),
            })
        }
        BootAction::Enlist | BootAction::Local => {}
    }
    let message = format!("machine {mac} boots {}", serde_json::to_string(&update.boot).unwrap_or_default());
    let step_error =
        |e: sqlx::Error| MachinesError::Store { step: "store the machine", source: query_error("put machine")(e) };
    let mut tx = shared.store.begin_write().await.map_err(step_error)?;
    let now = crate::util::now_ms();
    let id = match store::machine_row(&mut tx, &mac).await.map_err(store_error("look up the machine"))? {
        Some(mut row) => {
            row.hostname = update.hostname;
            row.boot = Some(update.boot);
            row.updated_at_ms = now;
            store::save_machine(&mut tx, &row).await.map_err(store_error("store the machine"))?;
            row.id
        }
        None => {
            let row = MachineRow {
                boot: Some(update.boot),
                ..MachineRow::new(new_machine_id(), mac.clone(), update.hostname, now)
            };
            store::insert_machine(&mut tx, &row).await.map_err(store_error("store the machine"))?;
            row.id
        }
    };
    store::insert_machine_event(&mut tx, "machine.boot", &actor.username, &message, &id)
        .await
        .map_err(store_error("record the change"))?;
    tx.commit().await.map_err(step_error)?;
    shared.notify_change();
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// What racks are told.

/// What `row` boots next, given the deploy environment.
pub fn boot_action(row: &MachineRow, env: Option<&DeployEnv>) -> BootAction {
    if lifecycle::runs_job(row.state) {
        if let (Some(job), Some(token), Some(env)) = (&row.job, &row.job_token, env) {
            return BootAction::Agent {
                env: env.clone(),
                machine_id: row.id.clone(),
                token: token.clone(),
                job: job.clone(),
            };
        }
    }
    if row.state == MachineState::Deployed {
        return BootAction::Local;
    }
    row.boot.clone().unwrap_or(BootAction::Local)
}

/// The boot table of rack `rack_id`: its machines and those of no rack.
pub async fn rack_boots(
    shared: &Shared,
    rack_id: &str,
    env: Option<&DeployEnv>,
) -> Result<Vec<MachineBoot>, MachinesError> {
    let rows = shared.store.rack_machines(rack_id).await.map_err(store_error("list the rack's machines"))?;
    Ok(rows
        .iter()
        .map(|row| MachineBoot { mac: row.mac.clone(), hostname: row.hostname.clone(), boot: boot_action(row, env) })
        .collect())
}

// ---------------------------------------------------------------------------------------------
// Reports and boot events from racks.

/// Boot events a rack queued (also while the region was away), recorded as region events. The
/// batch is checked whole before any is stored, and stored in one transaction; an event whose
/// `(queue_id, seq)` this rack sent before is skipped, so a batch sent again is stored once.
/// Each new event's machine report is applied in the same transaction, in order. Returns how
/// many were new.
pub async fn record_boot_events(
    shared: &Shared,
    rack_id: &str,
    rack_name: &str,
    events: Vec<BootEvent>,
) -> Result<u64, MachinesError> {
    if let Err(refusal) = check_boot_events(&events) {
        // The rack splits a refused batch down to the one bad event and drops it (its own
        // metrics count that precisely); here every event of each refused batch is counted.
        let n = events.len() as u64;
        shared.metrics.count_dropped(crate::metrics::DROPPED_BOOT_BATCH_REFUSED, n);
        return Err(refusal);
    }
    let n_received = events.len() as u64;
    // A machine chose some of this (a TFTP file name): no control characters reach the log.
    let events: Vec<BootEvent> = events
        .into_iter()
        .map(|mut event| {
            for field in [&mut event.kind, &mut event.mac, &mut event.message] {
                if let std::borrow::Cow::Owned(escaped) = escape_control(field) {
                    *field = escaped;
                }
            }
            event
        })
        .collect();
    let outcome = Arc::new(Mutex::new(ReportOutcome::default()));
    let (rack_id_owned, rack_name_owned) = (rack_id.to_owned(), rack_name.to_owned());
    let stored = shared
        .store
        .record_boot_events_with(rack_id, rack_name, &events, |conn, event| {
            let outcome = outcome.clone();
            let (rack_id, rack_name) = (rack_id_owned.clone(), rack_name_owned.clone());
            Box::pin(async move {
                let Some(report) = &event.report else { return Ok(()) };
                let applied = apply_report(conn, &rack_id, &rack_name, &event.mac, report).await?;
                outcome.lock().expect("report outcome lock").merge(applied);
                Ok(())
            })
        })
        .await
        .map_err(store_error("record boot events"))?;
    shared.metrics.boot_events_received.inc_by(n_received);
    shared.metrics.boot_events_stored.inc_by(stored);
    let outcome = std::mem::take(&mut *outcome.lock().expect("report outcome lock"));
    if outcome.racks_must_hear {
        shared.notify_change();
    }
    if outcome.power_queued {
        shared.notify_power();
    }
    if outcome.slot_freed {
        schedule_deploys(shared).await?;
    }
    Ok(stored)
}

/// What applying reports changed that others must hear of after the commit.
#[derive(Debug, Default)]
struct ReportOutcome {
    racks_must_hear: bool,
    power_queued: bool,
    slot_freed: bool,
}

impl ReportOutcome {
    fn merge(&mut self, other: ReportOutcome) {
        self.racks_must_hear |= other.racks_must_hear;
        self.power_queued |= other.power_queued;
        self.slot_freed |= other.slot_freed;
    }
}

/// Applies one machine report in the caller's transaction (see the wire contract's
/// `MachineReport`): an enlistment, or a report of the machine's current job. Reports that do
/// not apply (a late report of an earlier job, an illegal transition) change nothing.
async fn apply_report(
    conn: &mut AnyConnection,
    rack_id: &str,
    rack_name: &str,
    event_mac: &str,
    report: &metalrack_api::agent::MachineReport,
) -> Result<ReportOutcome, StoreError> {
    if let Err(reason) = report.report.validate() {
        tracing::warn!(rack = rack_name, %reason, "machine report out of bounds ignored");
        return Ok(ReportOutcome::default());
    }
    let now = crate::util::now_ms();
    let actor = format!("rack {rack_name}");
    if report.machine_id.is_empty() {
        let AgentReport::Inventory { inventory } = &report.report else {
            tracing::debug!(rack = rack_name, "a report without a machine id that is no inventory ignored");
            return Ok(ReportOutcome::default());
        };
        let Ok(mac) = normalize_mac(event_mac) else {
            tracing::debug!(rack = rack_name, "an enlistment without a MAC ignored");
            return Ok(ReportOutcome::default());
        };
        return match store::machine_row(conn, &mac).await? {
            Some(before) => {
                let mut row = before.clone();
                row.inventory = Some(inventory.clone());
                let mut effects = Effects::default();
                effects.event(
                    "machine.inventory",
                    format!("{} ({}): inventory updated by enlistment", row.hostname, row.id),
                );
                write_change(conn, &before, &mut row, effects, &actor).await?;
                Ok(ReportOutcome::default())
            }
            None => {
                let row = MachineRow {
                    rack_id: Some(rack_id.to_owned()),
                    inventory: Some(inventory.clone()),
                    ..MachineRow::new(new_machine_id(), mac.clone(), hostname_from_mac(&mac), now)
                };
                store::insert_machine(conn, &row).await?;
                let message = format!("machine {} ({}) enlisted with MAC {mac}", row.hostname, row.id);
                store::insert_machine_event(conn, "machine.enlisted", &actor, &message, &row.id).await?;
                Ok(ReportOutcome { racks_must_hear: true, ..Default::default() })
            }
        };
    }
    let Some(before) = store::machine_row(conn, &report.machine_id).await? else {
        tracing::debug!(rack = rack_name, machine = %report.machine_id, "report for an unknown machine ignored");
        return Ok(ReportOutcome::default());
    };
    let current = before
        .job_token
        .as_deref()
        .is_some_and(|token| crate::util::constant_time_eq(token.as_bytes(), report.token.as_bytes()));
    if !current {
        tracing::debug!(rack = rack_name, machine = %before.id, kind = report.report.event_kind(),
            "a report of an earlier job ignored (its token is not the current job's)");
        return Ok(ReportOutcome::default());
    }
    let mut row = before.clone();
    let mut effects = Effects::default();
    let result = (|| -> Result<(), MachinesError> {
        match &report.report {
            AgentReport::Inventory { inventory } => {
                step(&mut row, Trigger::InventoryReported, &mut effects)?;
                row.inventory = Some(inventory.clone());
                end_job(&mut row);
                effects.power = Some(vec![PowerAction::Off]);
            }
            AgentReport::Progress { progress } => {
                if !lifecycle::runs_job(row.state) {
                    return Err(MachinesError::Illegal {
                        source: Illegal { reason: format!("progress while {}", row.state.label()) },
                    });
                }
                row.progress = Some(*progress);
            }
            AgentReport::Deployed { progress } => {
                step(&mut row, Trigger::ImageWritten, &mut effects)?;
                row.progress = Some(*progress);
                effects.event(
                    "machine.image_written",
                    format!("{} ({}): image written and verified", row.hostname, row.id),
                );
            }
            AgentReport::BootedLocal => {
                step(&mut row, Trigger::BootedLocal, &mut effects)?;
                end_job(&mut row);
            }
            AgentReport::Released => {
                step(&mut row, Trigger::Released, &mut effects)?;
                end_job(&mut row);
                effects.power = Some(vec![PowerAction::Off]);
            }
            AgentReport::Failed { reason } => {
                step(&mut row, Trigger::JobFailed, &mut effects)?;
                effects.event("machine.failed", format!("{} ({}): {reason}", row.hostname, row.id));
                row.status_message = reason.clone();
                end_job(&mut row);
            }
        }
        Ok(())
    })();
    if let Err(e) = result {
        tracing::debug!(rack = rack_name, machine = %before.id, error = %e, "a report that does not apply ignored");
        return Ok(ReportOutcome::default());
    }
    row.last_progress_at_ms = Some(now);
    let power_queued = write_change(conn, &before, &mut row, effects, &actor).await?;
    Ok(ReportOutcome {
        racks_must_hear: racks_must_hear(&before, &row),
        power_queued,
        slot_freed: before.state == MachineState::Deploying && row.state != MachineState::Deploying,
    })
}

/// Refuses a batch the rack should not have sent (it truncates fields and bounds batches by the
/// same named limits), naming the first bad event and field.
fn check_boot_events(events: &[BootEvent]) -> Result<(), MachinesError> {
    if events.len() > BOOT_EVENTS_PER_REQUEST_MAX {
        return Err(MachinesError::TooManyEvents);
    }
    for (index, event) in events.iter().enumerate() {
        for (field, len, max) in [
            ("kind", event.kind.len(), BOOT_EVENT_KIND_BYTES_MAX),
            ("mac", event.mac.len(), BOOT_EVENT_MAC_BYTES_MAX),
            ("message", event.message.len(), BOOT_EVENT_MESSAGE_BYTES_MAX),
        ] {
            if len > max {
                return Err(MachinesError::EventFieldTooLong { index, field, len, max });
            }
        }
        if !(event.kind.starts_with("boot.") || event.kind.starts_with("machine.")) {
            return Err(MachinesError::InvalidEvent { index, kind: event.kind.clone() });
        }
        if event.queue_id >= BOOT_EVENT_QUEUE_ID_END || i64::try_from(event.seq).is_err() {
            return Err(MachinesError::EventIdOutOfRange { index });
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Power requests and results.

/// Rack `rack_id`'s power requests: those not sent yet and those sent over
/// [`POWER_RESEND_AFTER`] ago without an answer, held up to `wait` (at most the catalogue
/// poll's hold) while there are none.
pub async fn rack_power_requests(
    shared: &Shared,
    rack_id: &str,
    wait: Duration,
) -> Result<Vec<PowerRequest>, MachinesError> {
    let deadline = tokio::time::Instant::now() + wait.min(metalrack_api::limits::CATALOGUE_POLL_HOLD_MAX);
    loop {
        // Subscribe before reading, so a request queued between the read and the wait wakes it.
        let mut queued = shared.watch_power();
        let resend_before = crate::util::now_ms() - POWER_RESEND_AFTER.as_millis() as i64;
        let requests = shared
            .store
            .take_power_requests(rack_id, resend_before, POWER_REQUESTS_PER_POLL_MAX)
            .await
            .map_err(store_error("list power requests"))?;
        if !requests.is_empty() || shared.is_closing() || tokio::time::Instant::now() >= deadline {
            return Ok(requests);
        }
        tokio::select! {
            result = queued.changed() => if result.is_err() { return Ok(Vec::new()) },
            _ = tokio::time::sleep_until(deadline) => return Ok(Vec::new()),
        }
    }
}

/// What came of a power request: the machine's power state, an event (with the driver's error),
/// the request done; a machine releasing without erase is Ready once it is off.
pub async fn power_result(
    shared: &Shared,
    rack_id: &str,
    rack_name: &str,
    result: PowerResult,
) -> Result<(), MachinesError> {
    let error = result.error.as_deref().map(|e| {
        let mut text: String = escape_control(e).into_owned();
        if text.len() > POWER_ERROR_BYTES_MAX {
            let mut end = POWER_ERROR_BYTES_MAX;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
        }
        text
    });
    let step_error = |e: sqlx::Error| MachinesError::Store {
        step: "store the power result",
        source: query_error("power result")(e),
    };
    let mut tx = shared.store.begin_write().await.map_err(step_error)?;
    let Some((machine_id, actions)) = store::open_power_request(&mut tx, rack_id, result.id)
        .await
        .map_err(store_error("look up the power request"))?
    else {
        // Answered already (a resend's second answer) or cancelled by a newer request.
        tracing::debug!(rack = rack_name, request = result.id, "result of a closed power request ignored");
        return Ok(());
    };
    store::finish_power_request(&mut tx, result.id).await.map_err(store_error("finish the power request"))?;
    let Some(before) = store::machine_row(&mut tx, &machine_id).await.map_err(store_error("look up the machine"))?
    else {
        tx.commit().await.map_err(step_error)?;
        return Ok(());
    };
    let mut row = before.clone();
    row.power_state = result.state;
    row.power_checked_at_ms = Some(crate::util::now_ms());
    let mut effects = Effects::default();
    let outcome = match &error {
        Some(error) => format!("failed: {error}"),
        None => format!("done; power is {}", store::power_state_word(result.state)),
    };
    effects.event(
        if error.is_some() { "machine.power_failed" } else { "machine.power_result" },
        format!("{} ({}): {} {outcome}", row.hostname, row.id, describe_actions(&actions)),
    );
    if result.state == PowerState::Off && row.state == MachineState::Releasing && row.job.is_none() {
        step(&mut row, Trigger::PowerOffConfirmed, &mut effects)?;
    }
    let actor = format!("rack {rack_name}");
    write_change(&mut tx, &before, &mut row, effects, &actor).await.map_err(store_error("store the power result"))?;
    tx.commit().await.map_err(step_error)?;
    if racks_must_hear(&before, &row) {
        shared.notify_rack_change(&[before.rack_id.as_deref(), row.rack_id.as_deref()]);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Timers: the deploy scheduler, the stall timer, the power poll.

/// Serializes the scheduler against itself, so two runs cannot both fill one free slot.
static SCHEDULER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Starts waiting deploys while their rack has fewer than `deploys_per_rack_max` running, in the
/// order they were asked for.
pub async fn schedule_deploys(shared: &Shared) -> Result<(), MachinesError> {
    let _one = SCHEDULER.lock().await;
    let store::DeployQueue { waiting, mut running } =
        shared.store.deploy_queue().await.map_err(store_error("read the deploy queue"))?;
    let max = shared.config.deploys_per_rack_max as usize;
    for (id, rack_id) in waiting {
        let slots = running.entry(rack_id).or_default();
        if *slots >= max {
            continue;
        }
        let granted = change_machine(shared, &id, DEPLOY_SCHEDULER, |row, now| {
            let mut effects = Effects::default();
            step(row, Trigger::SlotGranted, &mut effects)?;
            let image = row.image.clone().expect("an allocated machine has an image");
            let job = AgentJob::Deploy { image, kind: ROOT_DISK_KIND.to_owned(), disk: row.disk.clone() };
            start_job(row, job, now);
            effects.power = Some(boot_job_power());
            Ok(effects)
        });
        // A grant frees no slot, so change_machine does not call the scheduler (whose lock this
        // loop holds) again.
        match granted.await {
            Ok(_) => *slots += 1,
            Err(MachinesError::Illegal { .. } | MachinesError::NoSuchMachine { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Fails jobs with no report for `stall_timeout_s`, counted from the last report or the
/// region's start, whichever is later.
pub async fn fail_stalled_jobs(shared: &Shared) -> Result<(), MachinesError> {
    let timeout_ms = shared.config.stall_timeout_s.saturating_mul(1000) as i64;
    let started = shared.started_at_ms();
    // Stalled: no report for the timeout, counted from the region's start at the earliest.
    let before_ms = crate::util::now_ms() - timeout_ms;
    if started >= before_ms {
        return Ok(());
    }
    let ids = shared.store.stalled_job_ids(before_ms).await.map_err(store_error("list stalled jobs"))?;
    for id in ids {
        let last = shared.store.last_machine_event(&id).await.map_err(store_error("read the last event"))?;
        let last = last.map(|e| e.message).unwrap_or_else(|| "none".into());
        let seconds = shared.config.stall_timeout_s;
        let result = change_machine(shared, &id, STALL_TIMER, |row, now| {
            // Checked again on the row as it is now: a report may have come in meanwhile.
            let since = row.last_progress_at_ms.unwrap_or(0).max(started);
            if now - since <= timeout_ms {
                return Err(MachinesError::Illegal { source: Illegal { reason: "no longer stalled".into() } });
            }
            let mut effects = Effects::default();
            step(row, Trigger::Stalled, &mut effects)?;
            row.status_message = format!("no report for {seconds} s; the last event: {last}");
            effects.event("machine.stalled", format!("{} ({}): {}", row.hostname, row.id, row.status_message));
            end_job(row);
            Ok(effects)
        })
        .await;
        match result {
            Ok(_) | Err(MachinesError::Illegal { .. } | MachinesError::NoSuchMachine { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Queues a power query for every machine with a BMC and a rack that has no request open.
pub async fn queue_power_queries(shared: &Shared) -> Result<(), MachinesError> {
    let rows = shared.store.all_machines().await.map_err(store_error("list machines"))?;
    let mut queued = false;
    for row in rows.into_iter().filter(|r| !is_manual(r) && r.rack_id.is_some()) {
        let rack_id = row.rack_id.as_deref().expect("filtered");
        if shared.store.has_open_power_request(&row.id).await.map_err(store_error("look up power requests"))? {
            continue;
        }
        shared.store.queue_power_query(rack_id, &row.id).await.map_err(store_error("queue a power query"))?;
        queued = true;
    }
    if queued {
        tracing::debug!(actor = POWER_POLL, "power queries queued");
        shared.notify_power();
    }
    Ok(())
}

/// The machines' timers; runs until aborted.
pub async fn run_timers(shared: Shared) {
    let mut tick = tokio::time::interval(MACHINE_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let poll_every = Duration::from_secs(shared.config.power_poll_interval_s);
    let mut next_poll = tokio::time::Instant::now() + poll_every;
    loop {
        tick.tick().await;
        let log = |what: &str, e: MachinesError| {
            tracing::error!(error = %metalrack_image_tools::error_chain(&e), what, "machine timer failed");
        };
        if let Err(e) = fail_stalled_jobs(&shared).await {
            log("stall timer", e);
        }
        if let Err(e) = schedule_deploys(&shared).await {
            log("deploy scheduler", e);
        }
        if tokio::time::Instant::now() >= next_poll {
            next_poll = tokio::time::Instant::now() + poll_every;
            if let Err(e) = queue_power_queries(&shared).await {
                log("power poll", e);
            }
            let before = crate::util::now_ms() - POWER_REQUESTS_DONE_KEPT.as_millis() as i64;
            if let Err(e) = shared.store.delete_done_power_requests(before).await {
                log("power request cleanup", MachinesError::Store { step: "delete old power requests", source: e });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(seq: u64, message: &str) -> BootEvent {
        BootEvent {
            queue_id: 7,
            seq,
            at_ms: 1,
            mac: "52:54:00:aa:bb:01".into(),
            kind: "boot.tftp".into(),
            message: message.into(),
            report: None,
        }
    }

    #[test]
    fn oversize_fields_are_refused_naming_the_event_and_field() {
        let mut events = vec![event(1, "fine"), event(2, &"x".repeat(BOOT_EVENT_MESSAGE_BYTES_MAX))];
        check_boot_events(&events).unwrap();
        events[1].message.push('x');
        let error = check_boot_events(&events).unwrap_err().to_string();
        assert_eq!(error, "boot event 1: message is 1025 bytes, at most 1024");
        events[1] = event(2, "m");
        events[1].mac = "m".repeat(BOOT_EVENT_MAC_BYTES_MAX + 1);
        assert!(check_boot_events(&events).unwrap_err().to_string().contains("mac is 65 bytes"));
        events[1] = event(2, "m");
        events[1].kind = format!("boot.{}", "k".repeat(BOOT_EVENT_KIND_BYTES_MAX));
        assert!(check_boot_events(&events).unwrap_err().to_string().contains("kind is 37 bytes"));
        events[1] = event(2, "m");
        events[1].kind = "user.login".into();
        assert!(check_boot_events(&events).unwrap_err().to_string().contains("invalid kind"));
        events[1].kind = "machine.progress".into();
        check_boot_events(&events).unwrap();
        events[1] = event(u64::MAX, "m");
        assert!(matches!(check_boot_events(&events), Err(MachinesError::EventIdOutOfRange { index: 1 })));
    }

    #[test]
    fn machine_ids_are_eight_lower_case_letters_and_digits_and_tokens_32_hex() {
        for _ in 0..100 {
            let id = new_machine_id();
            assert_eq!(id.len(), 8);
            assert!(id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()), "{id}");
            let token = new_job_token();
            assert_eq!(token.len(), AGENT_TOKEN_HEX_LEN);
            assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));
        }
    }

    fn row(state: MachineState) -> MachineRow {
        MachineRow {
            state,
            rack_id: Some("r1".into()),
            job: Some(AgentJob::Commission),
            job_token: Some("t".repeat(32)),
            ..MachineRow::new("abcd1234".into(), "52:54:00:aa:bb:01".into(), "node1".into(), 0)
        }
    }

    #[test]
    fn racks_boot_jobs_into_the_agent_deployed_machines_from_disk_and_others_by_their_bare_decision() {
        let env = DeployEnv {
            image: ImageRef { image: "metalrack/deploy-env".into(), arch: "amd64".into(), version: "1".into() },
            kernel_params: "console=ttyS0".into(),
        };
        let agent = boot_action(&row(MachineState::Commissioning), Some(&env));
        assert!(matches!(agent, BootAction::Agent { job: AgentJob::Commission, .. }), "{agent:?}");
        assert_eq!(boot_action(&row(MachineState::Commissioning), None), BootAction::Local, "no env: no agent");
        let image = BootAction::Image {
            image: "ubuntu/noble".into(),
            arch: "amd64".into(),
            version: "1".into(),
            kernel_params: String::new(),
        };
        let mut legacy = row(MachineState::New);
        legacy.job = None;
        legacy.boot = Some(image.clone());
        assert_eq!(boot_action(&legacy, Some(&env)), image, "the bare decision stays while no job runs");
        legacy.state = MachineState::Deployed;
        assert_eq!(boot_action(&legacy, Some(&env)), BootAction::Local);
        legacy.boot = None;
        legacy.state = MachineState::Ready;
        assert_eq!(boot_action(&legacy, Some(&env)), BootAction::Local);
    }

    #[tokio::test]
    async fn a_batch_sent_twice_is_stored_once_and_other_racks_and_queues_are_apart() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::db::Store::open(dir.path()).await.unwrap();
        let batch: Vec<BootEvent> = (1..=3).map(|seq| event(seq, &format!("event {seq}"))).collect();
        assert_eq!(store.record_boot_events("r1", "rack1", &batch).await.unwrap(), 3);
        assert_eq!(store.record_boot_events("r1", "rack1", &batch).await.unwrap(), 0, "the resend");
        // Half old, half new: a batch split after a refusal, or one that grew since.
        let overlapping: Vec<BootEvent> = (2..=5).map(|seq| event(seq, &format!("event {seq}"))).collect();
        assert_eq!(store.record_boot_events("r1", "rack1", &overlapping).await.unwrap(), 2);
        assert_eq!(store.record_boot_events("r2", "rack2", &batch).await.unwrap(), 3, "another rack");
        let mut new_queue = batch.clone();
        new_queue.iter_mut().for_each(|e| e.queue_id = 8);
        assert_eq!(store.record_boot_events("r1", "rack1", &new_queue).await.unwrap(), 3, "a wiped rack's new queue");
        // Racks from before ids: nothing to tell resends apart by, so each is stored.
        let mut legacy = batch.clone();
        legacy.iter_mut().for_each(|e| (e.queue_id, e.seq) = (0, 0));
        assert_eq!(store.record_boot_events("r1", "rack1", &legacy).await.unwrap(), 3);
        assert_eq!(store.record_boot_events("r1", "rack1", &legacy).await.unwrap(), 3);
        let messages: Vec<String> = store.events(100).await.unwrap().into_iter().rev().map(|e| e.message).collect();
        assert_eq!(messages.len(), 5 + 3 + 3 + 6);
        assert_eq!(&messages[..5], ["event 1", "event 2", "event 3", "event 4", "event 5"], "in order, once");
    }
}
