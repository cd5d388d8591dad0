//! The machines pages of the web UI: the list (paged, filtered by state, kept live by
//! `static/machines.js` polling `machines.json`), a machine's page with its actions (its progress
//! kept live the same way from `view.json`), and the Add form. Every change goes through `crate::machines`, which checks the caller and the lifecycle.

use axum::extract::{Form, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Redirect};
use axum::routing::{get, post};
use axum::{Json, Router};
use maud::{html, Markup};
use metalrack_api::agent::{DeployPhase, DeployProgress, EraseMode};
use metalrack_api::machines::{
    BrokenRequest, DeployRequest, MachineCreate, MachinePage, MachineState, MachineView, PowerCommand, ReleaseRequest,
};
use metalrack_api::power::{PowerDriver, PowerParameters, PowerState};
use serde::Deserialize;

use super::{cluster_name, csrf_input, events_table, human_bytes, layout, Nav, PageError, PageResult};
use crate::catalogue::ImageVersions;
use crate::http::error::ApiError;
use crate::http::extract::SessionUser;
use crate::http::{AppState, BASE_PATH};
use crate::machines::lifecycle::{transition, Trigger};
use crate::machines::{MachinesError, ROOT_DISK_KIND};
use crate::util::{ago, now_ms, rfc3339};

/// Machines one list page shows (the API's default page): a page stays quick to render and to
/// poll every [`LIVE_POLL_MS`].
pub const MACHINES_PAGE_ROWS: u32 = 100;

/// How often the list page's script asks for fresh figures: a deploy's rate moves by the
/// second, and one poll costs one page query.
pub const LIVE_POLL_MS: u32 = 2000;

const SCRIPT: &str = include_str!("../../../static/machines.js");

pub fn router() -> Router<AppState> {
    Router::new()
        .route(&format!("{BASE_PATH}/machines"), get(machines_page))
        .route(&format!("{BASE_PATH}/machines.json"), get(machines_json))
        .route(&format!("{BASE_PATH}/machines/add"), get(add_page).post(add_machine))
        .route(&format!("{BASE_PATH}/machines/{{id}}"), get(machine_page))
        .route(&format!("{BASE_PATH}/machines/{{id}}/view.json"), get(machine_json))
        .route(&format!("{BASE_PATH}/machines/{{id}}/{{action}}"), post(machine_action))
        .route(
            &format!("{BASE_PATH}/static/machines.js"),
            get(|| async {
                ([(header::CONTENT_TYPE, "application/javascript"), (header::CACHE_CONTROL, "max-age=300")], SCRIPT)
            }),
        )
}

// ---- rendering helpers ----

/// The state as the list shows it: `Allocated (queue 2)` while waiting for a deploy slot.
pub fn state_text(machine: &MachineView) -> String {
    match (machine.state, machine.queue_position) {
        (MachineState::Allocated, Some(position)) => format!("Allocated (queue {position})"),
        (state, _) => state.label().to_owned(),
    }
}

/// The badge colour class of a state.
fn state_class(state: MachineState) -> &'static str {
    match state {
        MachineState::Ready | MachineState::Deployed => "online",
        MachineState::New => "offline",
        MachineState::FailedCommissioning
        | MachineState::FailedDeployment
        | MachineState::FailedReleasing
        | MachineState::Broken => "failed",
        _ => "stale",
    }
}

/// Whole percent of a deploy done (0 when the total is not known yet).
pub fn progress_percent(progress: &DeployProgress) -> u64 {
    if progress.bytes_total == 0 {
        return 0;
    }
    (u128::from(progress.bytes_done.min(progress.bytes_total)) * 100 / u128::from(progress.bytes_total)) as u64
}

/// `42 % · 420 B of 1000 B · 100 B/s`; `static/machines.js` writes the same words.
pub fn progress_text(progress: &DeployProgress) -> String {
    format!(
        "{} % · {} of {} · {}/s",
        progress_percent(progress),
        human_bytes(progress.bytes_done),
        human_bytes(progress.bytes_total),
        human_bytes(progress.rate_bytes_per_s)
    )
}

/// `writing · 1.0 MiB fetched, ...`; `static/machines.js` writes the same words.
pub fn progress_detail(progress: &DeployProgress) -> String {
    let phase = match progress.phase {
        DeployPhase::Planning => "planning",
        DeployPhase::Writing => "writing",
        DeployPhase::Verifying => "verifying",
        DeployPhase::Done => "done",
    };
    format!(
        "{phase} · {} fetched, {} written, {} already there, {} chunks fetched again",
        human_bytes(progress.bytes_fetched),
        human_bytes(progress.bytes_written),
        human_bytes(progress.bytes_skipped),
        progress.chunks_refetched
    )
}

fn progress_markup(machine: &MachineView) -> Markup {
    html! {
        @if let (MachineState::Deploying, Some(progress)) = (machine.state, &machine.progress) {
            progress max="100" value=(progress_percent(progress)) {}
            span.progress-text { (progress_text(progress)) }
        }
    }
}

fn power_state_word(state: PowerState) -> &'static str {
    match state {
        PowerState::On => "on",
        PowerState::Off => "off",
        PowerState::Unknown => "unknown",
        PowerState::Error => "error",
    }
}

fn driver_word(driver: PowerDriver) -> &'static str {
    match driver {
        PowerDriver::Redfish => "redfish",
        PowerDriver::Ipmi => "ipmi",
        PowerDriver::Manual => "manual",
    }
}

fn image_text(machine: &MachineView) -> String {
    machine.image.as_ref().map(|i| format!("{} {} {}", i.image, i.arch, i.version)).unwrap_or_default()
}

fn machine_href(id: &str) -> String {
    format!("{BASE_PATH}/machines/{id}")
}

/// Whether a form's error is shown on its own page (bad input, a refused transition) rather
/// than on the error page (no such machine, not an administrator, a failing store).
fn shown_on_page(error: &ApiError) -> bool {
    error.status == StatusCode::BAD_REQUEST || error.status == StatusCode::CONFLICT
}

// ---- list ----

#[derive(Deserialize, Default)]
struct ListQuery {
    #[serde(default)]
    state: String,
    #[serde(default)]
    offset: u64,
}

async fn page(state: &AppState, query: &ListQuery) -> Result<MachinePage, MachinesError> {
    crate::machines::list(&state.shared, Some(&query.state), query.offset, Some(MACHINES_PAGE_ROWS)).await
}

/// `machines.json`: the list page's machines for its script (the session's user, the same data
/// as `GET /api/v1/machines`).
async fn machines_json(
    State(state): State<AppState>,
    _session: SessionUser,
    Query(query): Query<ListQuery>,
) -> Result<Json<MachinePage>, ApiError> {
    Ok(Json(page(&state, &query).await?))
}

/// `machines/{id}/view.json`: one machine for its page's script (the same data as
/// `GET /api/v1/machines/{id}`).
async fn machine_json(
    State(state): State<AppState>,
    _session: SessionUser,
    Path(id): Path<String>,
) -> Result<Json<MachineView>, ApiError> {
    Ok(Json(crate::machines::get(&state.shared, &id).await?))
}

fn list_href(state: &str, offset: u64) -> String {
    let mut href = format!("{BASE_PATH}/machines?offset={offset}");
    if !state.is_empty() {
        href.push_str(&format!("&state={state}"));
    }
    href
}

async fn machines_page(
    State(state): State<AppState>,
    session: SessionUser,
    Query(query): Query<ListQuery>,
) -> PageResult {
    let cluster = cluster_name(&state).await?;
    let machines = page(&state, &query).await?;
    let rows = u64::from(MACHINES_PAGE_ROWS);
    let content = html! {
        div.heading {
            h1 { "Machines" }
            @if session.user.is_admin { a.button.primary href=(format!("{BASE_PATH}/machines/add")) id="add-machine" { "Add machine" } }
        }
        form.filter method="get" action=(format!("{BASE_PATH}/machines")) {
            label { "State"
                select name="state" id="state-filter" {
                    option value="" selected[query.state.is_empty()] { "all" }
                    @for s in MachineState::ALL { option value=(s.as_str()) selected[query.state == s.as_str()] { (s.label()) } }
                }
            }
            button type="submit" { "Filter" }
        }
        @if machines.machines.is_empty() {
            p.muted { "No machines" @if !query.state.is_empty() { " in this state" } "." }
        } @else {
            table.machines id="machines" data-poll-ms=(LIVE_POLL_MS)
                data-src=(format!("{BASE_PATH}/machines.json?state={}&offset={}", query.state, query.offset)) {
                thead { tr { th { "Hostname" } th { "MAC" } th { "State" } th { "Power" } th { "Rack" } th { "Image" } th { "Progress" } } }
                tbody { @for m in &machines.machines {
                    tr data-machine=(m.id) {
                        td.name { a href=(machine_href(&m.id)) { (m.hostname) } }
                        td { code { (m.mac) } }
                        td.state { span class=(format!("badge {}", state_class(m.state))) data-state=(m.state.as_str()) { (state_text(m)) } }
                        td.power { (power_state_word(m.power_state)) }
                        td { (m.rack_name.as_deref().unwrap_or("")) }
                        td.image { (image_text(m)) }
                        td.progress { (progress_markup(m)) }
                    }
                } }
            }
        }
        p.pager {
            (machines.total) @if machines.total == 1 { " machine" } @else { " machines" }
            @if machines.total > rows { " · showing " (query.offset + 1) "–" ((query.offset + rows).min(machines.total)) }
            @if query.offset > 0 { " · " a href=(list_href(&query.state, query.offset.saturating_sub(rows))) id="previous" { "previous" } }
            @if query.offset + rows < machines.total { " · " a href=(list_href(&query.state, query.offset + rows)) id="next" { "next" } }
        }
        script src=(format!("{BASE_PATH}/static/machines.js")) {}
    };
    Ok(layout("Machines", &cluster, Some(&session), Nav::Machines, content).into_response())
}

/// How many machines are in each state (the dashboard's tile), states with none left out.
/// One page of one row per state (11 small queries per dashboard load): the domain's list
/// counts by state already, and the shared store is left untouched by the UI.
pub async fn counts_by_state(state: &AppState) -> Result<Vec<(MachineState, u64)>, MachinesError> {
    crate::machines::counts_by_state(&state.shared).await
}

// ---- one machine ----

async fn machine_page(State(state): State<AppState>, session: SessionUser, Path(id): Path<String>) -> PageResult {
    render_machine(&state, &session, &id, None, StatusCode::OK).await
}

async fn render_machine(
    state: &AppState,
    session: &SessionUser,
    id: &str,
    error: Option<&str>,
    status: StatusCode,
) -> PageResult {
    let cluster = cluster_name(state).await?;
    let machine = crate::machines::get(&state.shared, id).await?;
    let events = crate::machines::events(&state.shared, &machine.id).await?;
    let images =
        if session.user.is_admin { state.catalogue.images_with_file(ROOT_DISK_KIND).await? } else { Vec::new() };
    let content = machine_markup(&machine, &events, &images, session, error);
    Ok((status, layout(&machine.hostname, &cluster, Some(session), Nav::Machines, content)).into_response())
}

fn machine_markup(
    m: &MachineView,
    events: &[metalrack_api::EventView],
    images: &[ImageVersions],
    session: &SessionUser,
    error: Option<&str>,
) -> Markup {
    let SessionUser { user, csrf } = session;
    let now = now_ms();
    let can = |trigger: Trigger| transition(m.state, trigger).is_ok();
    let action = |name: &str| format!("{BASE_PATH}/machines/{}/{name}", m.id);
    html! {
        div.heading {
            h1 { (m.hostname) " " span class=(format!("badge {}", state_class(m.state))) id="machine-state" data-state=(m.state.as_str()) { (state_text(m)) } }
        }
        @if let Some(error) = error { p.error role="alert" id="machine-error" { (error) } }
        section.card {
            dl {
                dt { "MAC" } dd { code { (m.mac) } }
                dt { "State" } dd { (state_text(m)) " · changed " span title=(rfc3339(m.state_changed_at_ms)) { (ago(m.state_changed_at_ms, now)) } }
                @if !m.status_message.is_empty() { dt { "Status" } dd id="status-message" { (m.status_message) } }
                dt { "Rack" } dd { (m.rack_name.as_deref().unwrap_or("none")) }
                dt { "Image" } dd { @if m.image.is_some() { (image_text(m)) } @else { span.muted { "none" } } }
                dt { "Disk" } dd { (m.disk.as_deref().unwrap_or("")) }
                @if m.progress.is_some() || m.state == MachineState::Deploying {
                    dt { "Progress" } dd.progress id="machine-progress" {
                        @if let Some(progress) = &m.progress {
                            progress max="100" value=(progress_percent(progress)) {}
                            span.progress-text { (progress_text(progress)) }
                            div.muted.progress-detail { (progress_detail(progress)) }
                        }
                    }
                }
            }
        }
        section.card {
            h2 { "Power" }
            dl {
                dt { "State" } dd id="power-state" { (power_state_word(m.power_state))
                    @if let Some(at) = m.power_checked_at_ms { span.muted title=(rfc3339(at)) { " · checked " (ago(at, now)) } } }
                @match &m.power {
                    Some(power) => {
                        dt { "Driver" } dd { (driver_word(power.driver)) }
                        @if let Some(address) = &power.address { dt { "Address" } dd { code { (address) } } }
                        @if let Some(username) = &power.username { dt { "User" } dd { (username) } }
                        @if power.driver != PowerDriver::Manual { dt { "Password" } dd { @if power.password_set { "set" } @else { "not set" } } }
                        @if let Some(system_id) = &power.system_id { dt { "System id" } dd { (system_id) } }
                        @if power.driver == PowerDriver::Redfish { dt { "Self-signed" } dd { @if power.trust_self_signed { "trusted" } @else { "refused" } } }
                    }
                    None => { dt { "Driver" } dd.muted { "none" } }
                }
            }
            @if m.power.as_ref().is_none_or(|p| p.driver == PowerDriver::Manual) {
                p.hint { "No BMC: the region asks for nothing here; an event says when to press the machine's button." }
            } @else if user.is_admin {
                form.actions method="post" action=(action("power")) id="power-form" {
                    (csrf_input(csrf))
                    button type="submit" name="power" value="on" id="power-on" { "On" }
                    button type="submit" name="power" value="off" id="power-off" { "Off" }
                    button type="submit" name="power" value="cycle" id="power-cycle" { "Cycle" }
                    button type="submit" name="power" value="query" id="power-check" { "Check" }
                }
            }
        }
        @if user.is_admin {
            section.card id="actions" {
                h2 { "Actions" }
                @if can(Trigger::Commission) {
                    form method="post" action=(action("commission")) {
                        (csrf_input(csrf))
                        button.primary type="submit" id="commission" { "Commission" }
                        span.hint { " Boots the deploy environment to take an inventory." }
                    }
                }
                @if can(Trigger::Allocate) {
                    h3 { "Deploy" }
                    @if images.is_empty() {
                        p.muted { "No image with a " code { (ROOT_DISK_KIND) } " file: push one with imgtool." }
                    } @else {
                        form method="post" action=(action("deploy")) id="deploy-form" {
                            (csrf_input(csrf))
                            label { "Image"
                                select name="target" id="deploy-image" {
                                    @for image in images {
                                        optgroup label=(format!("{} {}", image.name, image.arch)) {
                                            option value=(format!("{} {} ", image.name, image.arch)) { (image.name) " " (image.arch) ", newest (" (image.versions[0]) ")" }
                                            @for version in &image.versions { option value=(format!("{} {} {version}", image.name, image.arch)) { (image.name) " " (image.arch) " version " (version) } }
                                        }
                                    }
                                }
                            }
                            label { "Disk"
                                select name="disk" id="deploy-disk" {
                                    @match &m.inventory {
                                        Some(inventory) if !inventory.disks.is_empty() => {
                                            @for disk in &inventory.disks { option value=(disk.name) { (disk.name) " · " (human_bytes(disk.size_bytes)) " " (disk.model) } }
                                        }
                                        _ => option value="" { "the first disk" },
                                    }
                                }
                            }
                            button.primary type="submit" id="deploy" { "Deploy" }
                        }
                    }
                }
                @if can(Trigger::Release) {
                    h3 { "Release" }
                    form method="post" action=(action("release")) id="release-form" {
                        (csrf_input(csrf))
                        label { "Erase the disk"
                            select name="erase" id="release-erase" {
                                option value="none" { "no" }
                                option value="quick" { "quick (both ends of the disk)" }
                                option value="full" { "full (zeros over the whole disk)" }
                            }
                        }
                        button type="submit" id="release" { "Release" }
                    }
                }
                @if can(Trigger::Abort) {
                    form method="post" action=(action("abort")) {
                        (csrf_input(csrf))
                        button type="submit" id="abort" { "Abort" }
                    }
                }
                @if can(Trigger::MarkBroken) {
                    h3 { "Mark broken" }
                    form method="post" action=(action("mark-broken")) id="broken-form" {
                        (csrf_input(csrf))
                        label { "Reason" input name="reason" id="broken-reason" required maxlength=(crate::machines::TEXT_LEN_MAX); }
                        button type="submit" id="mark-broken" { "Mark broken" }
                    }
                }
                @if m.state == MachineState::Broken {
                    form method="post" action=(action("mark-fixed")) {
                        (csrf_input(csrf))
                        button.primary type="submit" id="mark-fixed" { "Mark fixed" }
                    }
                }
                details.confirm {
                    summary { "Delete" }
                    form method="post" action=(action("delete")) {
                        (csrf_input(csrf))
                        button type="submit" id="delete" { "Delete " (m.hostname) }
                    }
                }
            }
        }
        @if let Some(inventory) = &m.inventory {
            section.card id="inventory" {
                h2 { "Inventory" }
                dl {
                    dt { "Firmware" } dd { (format!("{:?}", inventory.firmware).to_uppercase()) }
                    dt { "CPUs" } dd { (inventory.cpus) @if !inventory.cpu_model.is_empty() { " × " (inventory.cpu_model) } }
                    dt { "Memory" } dd { (human_bytes(inventory.memory_bytes)) }
                }
                h3 { "Disks" }
                table { thead { tr { th { "Name" } th { "Size" } th { "Model" } th { "Serial" } } }
                    tbody { @for d in &inventory.disks { tr { td { (d.name) } td { (human_bytes(d.size_bytes)) } td { (d.model) } td { (d.serial) } } } } }
                h3 { "Network interfaces" }
                table { thead { tr { th { "Name" } th { "MAC" } th { "Speed" } } }
                    tbody { @for n in &inventory.nics { tr { td { (n.name) } td { code { (n.mac) } } td { @if let Some(s) = n.speed_mbps { (s) " Mb/s" } } } } } }
            }
        }
        section.card {
            h2 { "Events" }
            (events_table(events))
        }
        // The script follows the progress in place and loads the page again when the state
        // changes (its actions change with it).
        div id="machine-live" hidden data-poll-ms=(LIVE_POLL_MS) data-state=(m.state.as_str()) data-page=(machine_href(&m.id))
            data-src=(format!("{BASE_PATH}/machines/{}/view.json", m.id)) {}
        script src=(format!("{BASE_PATH}/static/machines.js")) {}
    }
}

#[derive(Deserialize)]
struct ActionForm {
    power: Option<String>,
    /// Deploy: `IMAGE ARCH [VERSION]` (no version: the newest).
    target: Option<String>,
    disk: Option<String>,
    erase: Option<String>,
    reason: Option<String>,
}

/// A deploy target from the form: image, arch, and the version when one was chosen.
fn parse_target(target: &str) -> Option<(String, String, Option<String>)> {
    let mut words = target.split(' ');
    let image = words.next().filter(|w| !w.is_empty())?;
    let arch = words.next().filter(|w| !w.is_empty())?;
    let version = words.next().filter(|w| !w.is_empty()).map(str::to_owned);
    words.next().is_none().then(|| (image.to_owned(), arch.to_owned(), version))
}

async fn machine_action(
    State(state): State<AppState>,
    session: SessionUser,
    Path((id, action)): Path<(String, String)>,
    Form(form): Form<ActionForm>,
) -> PageResult {
    let shared = &state.shared;
    let user = &session.user;
    let bad = |message: &str| ApiError::bad_request(message.to_owned());
    let result: Result<(), ApiError> = match action.as_str() {
        "power" => {
            let command = match form.power.as_deref() {
                Some("on") => PowerCommand::On,
                Some("off") => PowerCommand::Off,
                Some("cycle") => PowerCommand::Cycle,
                Some("query") => PowerCommand::Query,
                _ => return Err(PageError(bad("Unknown power action."))),
            };
            crate::machines::power(shared, user, &id, command).await.map(drop).map_err(ApiError::from)
        }
        "commission" => crate::machines::commission(shared, user, &id).await.map(drop).map_err(ApiError::from),
        "deploy" => match form.target.as_deref().and_then(parse_target) {
            Some((image, arch, version)) => {
                let disk = form.disk.filter(|d| !d.is_empty());
                let request = DeployRequest { image, arch, version, disk };
                crate::machines::deploy(shared, user, &id, request).await.map(drop).map_err(ApiError::from)
            }
            None => Err(bad("Choose an image to deploy.")),
        },
        "release" => {
            let erase = match form.erase.as_deref().unwrap_or("none") {
                "none" => EraseMode::None,
                "quick" => EraseMode::Quick,
                "full" => EraseMode::Full,
                _ => return Err(PageError(bad("Unknown erase mode."))),
            };
            crate::machines::release(shared, user, &id, ReleaseRequest { erase })
                .await
                .map(drop)
                .map_err(ApiError::from)
        }
        "abort" => crate::machines::abort(shared, user, &id).await.map(drop).map_err(ApiError::from),
        "mark-broken" => {
            let request = BrokenRequest { reason: form.reason.unwrap_or_default() };
            crate::machines::mark_broken(shared, user, &id, request).await.map(drop).map_err(ApiError::from)
        }
        "mark-fixed" => crate::machines::mark_fixed(shared, user, &id).await.map(drop).map_err(ApiError::from),
        "delete" => {
            crate::machines::delete(shared, user, &id).await?;
            return Ok(Redirect::to(&format!("{BASE_PATH}/machines")).into_response());
        }
        _ => return Err(PageError(ApiError::not_found("No such machine action."))),
    };
    match result {
        Ok(()) => Ok(Redirect::to(&machine_href(&id)).into_response()),
        Err(error) if shown_on_page(&error) => {
            render_machine(&state, &session, &id, Some(&error.body.error), error.status).await
        }
        Err(error) => Err(PageError(error)),
    }
}

// ---- add ----

/// The Add form's fields, kept to fill the form again after an error (the password is not).
#[derive(Deserialize, Default)]
struct AddForm {
    #[serde(default)]
    hostname: String,
    #[serde(default)]
    mac: String,
    #[serde(default)]
    rack: String,
    #[serde(default)]
    driver: String,
    #[serde(default)]
    address: String,
    #[serde(default)]
    username: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    system_id: String,
    #[serde(default)]
    trust_self_signed: Option<String>,
    #[serde(default)]
    ipmi_port: String,
}

impl AddForm {
    fn power(&self) -> Result<PowerParameters, String> {
        match self.driver.as_str() {
            "manual" => Ok(PowerParameters::Manual),
            "redfish" => Ok(PowerParameters::Redfish {
                address: self.address.trim().to_owned(),
                username: self.username.clone(),
                password: self.password.clone(),
                system_id: Some(self.system_id.trim().to_owned()).filter(|s| !s.is_empty()),
                trust_self_signed: self.trust_self_signed.is_some(),
            }),
            "ipmi" => {
                let port = match self.ipmi_port.trim() {
                    "" => 623,
                    text => text.parse::<u16>().map_err(|_| format!("IPMI port {text:?} is not a port number"))?,
                };
                Ok(PowerParameters::Ipmi {
                    address: self.address.trim().to_owned(),
                    port,
                    username: self.username.clone(),
                    password: self.password.clone(),
                })
            }
            other => Err(format!("unknown power driver {:?}", other.chars().take(40).collect::<String>())),
        }
    }
}

async fn add_page(State(state): State<AppState>, session: SessionUser) -> PageResult {
    super::require_admin_page(&session.user)?;
    render_add(&state, &session, &AddForm { driver: "redfish".into(), ..AddForm::default() }, None, StatusCode::OK)
        .await
}

async fn render_add(
    state: &AppState,
    session: &SessionUser,
    form: &AddForm,
    error: Option<&str>,
    status: StatusCode,
) -> PageResult {
    let cluster = cluster_name(state).await?;
    // Ids and names only: the form needs no rack's health, policy or sync report.
    let racks = state.shared.store.rack_names_by_name().await?;
    let content = add_markup(form, &racks, &session.csrf, error);
    Ok((status, layout("Add machine", &cluster, Some(session), Nav::Machines, content)).into_response())
}

/// `racks`: (id, name) of every rack, by name.
fn add_markup(form: &AddForm, racks: &[(String, String)], csrf: &str, error: Option<&str>) -> Markup {
    html! {
        section.card.narrow {
            h1 { "Add machine" }
            @if let Some(error) = error { p.error role="alert" id="add-error" { (error) } }
            form method="post" action=(format!("{BASE_PATH}/machines/add")) id="add-form" {
                (csrf_input(csrf))
                label { "Hostname (empty: derived from the MAC)" input name="hostname" id="hostname" value=(form.hostname) maxlength="63"; }
                label { "MAC address" input name="mac" id="mac" value=(form.mac) required placeholder="52:54:00:aa:bb:01"; }
                label { "Rack"
                    select name="rack" id="rack" {
                        @for (id, name) in racks { option value=(id) selected[&form.rack == id] { (name) } }
                    }
                }
                @if racks.is_empty() { p.hint { "No rack controller is registered yet: add one first." } }
                label { "Power driver"
                    select name="driver" id="driver" {
                        option value="redfish" selected[form.driver == "redfish"] { "Redfish" }
                        option value="ipmi" selected[form.driver == "ipmi"] { "IPMI" }
                        option value="manual" selected[form.driver == "manual"] { "manual (no BMC)" }
                    }
                }
                fieldset {
                    legend { "BMC (Redfish and IPMI)" }
                    label { "Address (Redfish: https://HOST[:PORT]; IPMI: host)" input name="address" id="address" value=(form.address); }
                    label { "User" input name="username" id="bmc-username" value=(form.username) autocomplete="off"; }
                    label { "Password" input name="password" id="bmc-password" type="password" autocomplete="new-password"; }
                    label { "Redfish system id (empty: the first)" input name="system_id" id="system_id" value=(form.system_id); }
                    label.checkbox { input type="checkbox" name="trust_self_signed" id="trust_self_signed" checked[form.trust_self_signed.is_some()]; " Trust the BMC's self-signed certificate (Redfish)" }
                    label { "IPMI port" input name="ipmi_port" id="ipmi_port" type="number" min="1" max="65535" placeholder="623" value=(form.ipmi_port); }
                }
                button.primary type="submit" id="add" { "Add machine" }
            }
        }
    }
}

async fn add_machine(State(state): State<AppState>, session: SessionUser, Form(form): Form<AddForm>) -> PageResult {
    super::require_admin_page(&session.user)?;
    let power = match form.power() {
        Ok(power) => power,
        Err(message) => return render_add(&state, &session, &form, Some(&message), StatusCode::BAD_REQUEST).await,
    };
    let create = MachineCreate {
        hostname: form.hostname.trim().to_owned(),
        mac: form.mac.trim().to_owned(),
        power,
        rack: Some(form.rack.clone()).filter(|r| !r.is_empty()),
    };
    match crate::machines::add(&state.shared, &session.user, create).await.map_err(ApiError::from) {
        Ok(machine) => Ok(Redirect::to(&machine_href(&machine.id)).into_response()),
        Err(error) if shown_on_page(&error) => {
            render_add(&state, &session, &form, Some(&error.body.error), error.status).await
        }
        Err(error) => Err(PageError(error)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(done: u64, total: u64) -> DeployProgress {
        DeployProgress {
            phase: DeployPhase::Writing,
            bytes_total: total,
            bytes_done: done,
            bytes_fetched: done,
            bytes_written: done,
            bytes_skipped: 0,
            chunks_refetched: 0,
            rate_bytes_per_s: 2048,
        }
    }

    #[test]
    fn progress_is_whole_percent_of_the_total_and_never_above_100() {
        assert_eq!(progress_percent(&progress(420, 1000)), 42);
        assert_eq!(progress_percent(&progress(5, 0)), 0, "no total yet");
        assert_eq!(progress_percent(&progress(2000, 1000)), 100);
        assert_eq!(progress_percent(&progress(u64::MAX, u64::MAX)), 100, "no overflow");
        assert_eq!(progress_text(&progress(420, 1000)), "42 % · 420 B of 1000 B · 2.0 KiB/s");
    }

    fn machine(state: MachineState) -> MachineView {
        serde_json::from_value(serde_json::json!({
            "id": "abcd1234", "hostname": "node-1", "mac": "52:54:00:aa:bb:01", "state": state,
            "status_message": "", "rack_id": "r1", "rack_name": "rack1",
            "power": {"driver": "redfish", "address": "https://10.0.0.5", "username": "root", "password_set": true,
                      "system_id": null, "trust_self_signed": false},
            "power_state": "on", "power_checked_at_ms": 1, "image": {"image": "ubuntu/noble", "arch": "amd64", "version": "3"},
            "disk": "vda", "progress": progress(420, 1000), "queue_position": null, "inventory": null,
            "updated_at_ms": 1, "state_changed_at_ms": 1,
        }))
        .unwrap()
    }

    fn session(is_admin: bool) -> SessionUser {
        let user = crate::users::User {
            id: "u1".into(),
            username: "ann".into(),
            email: String::new(),
            password_hash: String::new(),
            is_admin,
        };
        SessionUser { user, csrf: "token".into() }
    }

    #[test]
    fn only_administrators_see_the_machine_pages_forms_and_each_carries_the_csrf_token() {
        let m = machine(MachineState::Deploying);
        let page = machine_markup(&m, &[], &[], &session(false), None).into_string();
        assert!(!page.contains("<form"), "{page}");
        assert!(page.contains("42 % · 420 B of 1000 B"), "the progress shows to everyone: {page}");
        let page = machine_markup(&m, &[], &[], &session(true), None).into_string();
        let forms = page.matches("<form").count();
        assert!(forms >= 3, "power, abort, mark broken, delete: {page}");
        assert_eq!(page.matches(r#"name="csrf" value="token""#).count(), forms, "{page}");
        // Only what the lifecycle allows from Deploying.
        assert!(page.contains(r#"id="abort""#) && !page.contains(r#"id="commission""#), "{page}");
        assert!(!page.contains(r#"id="deploy""#) && !page.contains(r#"id="release""#), "{page}");
    }

    #[test]
    fn an_allocated_machine_shows_its_place_in_the_deploy_queue() {
        let mut m = machine(MachineState::Allocated);
        m.queue_position = Some(2);
        assert_eq!(state_text(&m), "Allocated (queue 2)");
        assert_eq!(state_text(&machine(MachineState::FailedDeployment)), "Failed deployment");
    }

    #[test]
    fn deploy_targets_parse_with_and_without_a_version() {
        assert_eq!(parse_target("ubuntu/noble amd64 "), Some(("ubuntu/noble".into(), "amd64".into(), None)));
        assert_eq!(
            parse_target("ubuntu/noble amd64 3"),
            Some(("ubuntu/noble".into(), "amd64".into(), Some("3".into())))
        );
        assert_eq!(parse_target("ubuntu/noble"), None);
        assert_eq!(parse_target("a b c d"), None);
    }

    #[test]
    fn add_form_builds_power_parameters_per_driver() {
        let form = |driver: &str, port: &str| AddForm {
            driver: driver.into(),
            address: " 10.0.0.5 ".into(),
            username: "admin".into(),
            password: "pw".into(),
            ipmi_port: port.into(),
            ..AddForm::default()
        };
        assert_eq!(form("manual", "").power().unwrap(), PowerParameters::Manual);
        match form("ipmi", "").power().unwrap() {
            PowerParameters::Ipmi { address, port, .. } => assert_eq!((address.as_str(), port), ("10.0.0.5", 623)),
            other => panic!("{other:?}"),
        }
        assert!(form("ipmi", "70000").power().unwrap_err().contains("not a port number"));
        assert!(form("telnet", "").power().unwrap_err().contains("unknown power driver"));
    }
}
