//! The web UI under `/MAAS/`: server-rendered HTML (maud escapes every value), no JavaScript
//! build step. Login, first-login welcome, dashboard, controllers, images, events, account; the
//! machines pages are in [`machines`].

mod charts;
mod machines;

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Form, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use axum_extra::extract::cookie::{Cookie, SameSite};
use axum_extra::extract::CookieJar;
use maud::{html, Markup, DOCTYPE};
use metalrack_api::images::{SyncPhase, SyncPolicy, SyncPolicyKind, SyncReport, VersionSyncStatus};
use metalrack_api::{RackState, RackView};
use serde::Deserialize;

use super::error::ApiError;
use super::extract::{SessionUser, CSRF_FIELD, SESSION_COOKIE};
use super::transport::Transport;
use super::{AppState, BASE_PATH};
use crate::cluster::{ClusterError, CLUSTER_NAME_LEN_MAX};
use crate::users::{Login, User};
use crate::util::{ago, now_ms, rfc3339};

/// Events shown on the events page and the dashboard.
const EVENTS_PAGE_ROWS: i64 = 200;
const DASHBOARD_EVENT_ROWS: i64 = 8;

const STYLE: &str = include_str!("../../../static/style.css");

pub fn router() -> Router<AppState> {
    Router::new()
        .route(BASE_PATH, get(|| async { Redirect::permanent(&format!("{BASE_PATH}/")) }))
        .route(&format!("{BASE_PATH}/"), get(dashboard))
        .route(&format!("{BASE_PATH}/login"), get(login_page).post(login))
        .route(&format!("{BASE_PATH}/logout"), post(logout))
        .route(&format!("{BASE_PATH}/welcome"), get(welcome_page).post(welcome))
        .route(&format!("{BASE_PATH}/controllers"), get(controllers))
        .route(&format!("{BASE_PATH}/controllers/add"), get(add_controller))
        .route(&format!("{BASE_PATH}/controllers/{{id}}"), get(controller_page))
        .route(&format!("{BASE_PATH}/controllers/{{id}}/policy"), post(controller_policy))
        .route(&format!("{BASE_PATH}/controllers/{{id}}/sync"), post(controller_sync))
        .route(&format!("{BASE_PATH}/images"), get(images_page))
        .route(&format!("{BASE_PATH}/images/sync"), post(images_sync))
        .route(&format!("{BASE_PATH}/images/{{image_id}}/versions/{{version}}/delete"), post(images_delete))
        .route(&format!("{BASE_PATH}/events"), get(events))
        .route(&format!("{BASE_PATH}/account"), get(account))
        .route(
            &format!("{BASE_PATH}/static/style.css"),
            get(|| async { ([(header::CONTENT_TYPE, "text/css"), (header::CACHE_CONTROL, "max-age=300")], STYLE) }),
        )
        .merge(machines::router())
        .route_layer(axum::middleware::from_fn(super::extract::check_csrf))
}

/// A page that failed: the log gets the details, the user a short page.
struct PageError(ApiError);

impl<E: Into<ApiError>> From<E> for PageError {
    fn from(e: E) -> Self {
        PageError(e.into())
    }
}

impl From<ClusterError> for ApiError {
    fn from(error: ClusterError) -> ApiError {
        match error {
            ClusterError::InvalidName => ApiError::bad_request(error.to_string()),
            ClusterError::NotAdmin => ApiError::forbidden(error.to_string()),
            ClusterError::Store { source, .. } => source.into(),
        }
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let body = html! {
            (DOCTYPE)
            html { head { title { "Error" } link rel="stylesheet" href=(format!("{BASE_PATH}/static/style.css")); }
                body { main.narrow { h1 { "Something went wrong" } p { (self.0.body.error) } a href=(format!("{BASE_PATH}/")) { "Back" } } } }
        };
        (self.0.status, body).into_response()
    }
}

type PageResult = Result<Response, PageError>;

/// The hidden field that carries a form's CSRF token (checked by `extract::check_csrf`).
fn csrf_input(csrf: &str) -> Markup {
    html! { input type="hidden" name=(CSRF_FIELD) value=(csrf); }
}

async fn cluster_name(state: &AppState) -> Result<String, PageError> {
    Ok(state.shared.cluster_name().await?)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Nav {
    Dashboard,
    Controllers,
    Machines,
    Images,
    Events,
    Account,
    None,
}

fn layout(title: &str, cluster: &str, session: Option<&SessionUser>, nav: Nav, content: Markup) -> Markup {
    let link = |target: Nav, href: &str, label: &str| {
        html! { a.active[nav == target] href=(format!("{BASE_PATH}{href}")) { (label) } }
    };
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " | " (cluster) " | Metalrack" }
                link rel="stylesheet" href=(format!("{BASE_PATH}/static/style.css"));
            }
            body {
                header.top {
                    a.brand href=(format!("{BASE_PATH}/")) { span.logo { "▦" } " Metalrack" span.cluster { (cluster) } }
                    @if let Some(SessionUser { user, csrf }) = session {
                        nav {
                            (link(Nav::Dashboard, "/", "Dashboard"))
                            (link(Nav::Controllers, "/controllers", "Controllers"))
                            (link(Nav::Machines, "/machines", "Machines"))
                            (link(Nav::Images, "/images", "Images"))
                            (link(Nav::Events, "/events", "Events"))
                        }
                        div.user {
                            (link(Nav::Account, "/account", &user.username))
                            form method="post" action=(format!("{BASE_PATH}/logout")) { (csrf_input(csrf)) button.link type="submit" { "Log out" } }
                        }
                    }
                }
                main { (content) }
            }
        }
    }
}

// ---- login ----

#[derive(Deserialize)]
struct LoginForm {
    username: String,
    password: String,
}

async fn login_page(State(state): State<AppState>) -> PageResult {
    let cluster = cluster_name(&state).await?;
    Ok(login_markup(&cluster, None).into_response())
}

fn login_markup(cluster: &str, error: Option<&str>) -> Markup {
    layout(
        "Log in",
        cluster,
        None,
        Nav::None,
        html! {
            section.card.narrow {
                h1 { "Log in to " (cluster) }
                @if let Some(error) = error { p.error role="alert" { (error) } }
                form method="post" action=(format!("{BASE_PATH}/login")) {
                    label { "Username" input name="username" id="username" autocomplete="username" required autofocus; }
                    label { "Password" input name="password" id="password" type="password" autocomplete="current-password" required; }
                    button.primary type="submit" id="login" { "Log in" }
                }
                p.hint { "No account yet? On the region run " code { "regiond createadmin" } "." }
            }
        },
    )
}

async fn login(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    transport: Transport,
    jar: CookieJar,
    Form(form): Form<LoginForm>,
) -> PageResult {
    let login = crate::users::login(&state.shared, &state.login_throttle, &form.username, form.password, peer.ip());
    let (user, token) = match login.await? {
        Login::Session { user, token } => (user, token),
        Login::Refused => {
            let cluster = cluster_name(&state).await?;
            let page = login_markup(&cluster, Some("Wrong username or password."));
            return Ok((StatusCode::UNAUTHORIZED, page).into_response());
        }
        Login::Throttled { retry_after } => {
            let cluster = cluster_name(&state).await?;
            // Rounded up: a client that waits as long as it is told must not be refused again.
            let seconds = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
            let message = format!("Too many failed logins. Try again in {seconds} s.");
            let mut response = (StatusCode::TOO_MANY_REQUESTS, login_markup(&cluster, Some(&message))).into_response();
            response.headers_mut().insert(header::RETRY_AFTER, seconds.into());
            return Ok(response);
        }
    };
    tracing::debug!(username = %user.username, "session opened");
    let cookie = Cookie::build((SESSION_COOKIE, token))
        .path(BASE_PATH)
        .http_only(true)
        // The UI is served over TLS only (clear requests are redirected), so the browser must
        // never send the session in clear either.
        .secure(transport == Transport::Tls)
        .same_site(SameSite::Strict)
        .max_age(time_duration(state.shared.config.session_lifetime_ms))
        .build();
    let next = if crate::cluster::welcome_done(&state.shared).await? {
        format!("{BASE_PATH}/")
    } else {
        format!("{BASE_PATH}/welcome")
    };
    Ok((jar.add(cookie), Redirect::to(&next)).into_response())
}

fn time_duration(ms: u64) -> cookie::time::Duration {
    cookie::time::Duration::milliseconds(ms as i64)
}

async fn logout(State(state): State<AppState>, jar: CookieJar) -> PageResult {
    if let Some(cookie) = jar.get(SESSION_COOKIE) {
        crate::users::logout(&state.shared, cookie.value()).await?;
    }
    let jar = jar.remove(Cookie::build(SESSION_COOKIE).path(BASE_PATH));
    Ok((jar, Redirect::to(&format!("{BASE_PATH}/login"))).into_response())
}

// ---- welcome ----

async fn welcome_page(State(state): State<AppState>, session: SessionUser) -> PageResult {
    let cluster = cluster_name(&state).await?;
    Ok(welcome_markup(&cluster, &session, None).into_response())
}

fn welcome_markup(cluster: &str, session: &SessionUser, error: Option<&str>) -> Markup {
    layout(
        "Welcome",
        cluster,
        Some(session),
        Nav::None,
        html! {
            section.card.narrow {
                h1 { "Welcome to Metalrack" }
                p { "Name this cluster. The name shows in the header and in every rack's status. You can change it later." }
                @if let Some(error) = error { p.error role="alert" { (error) } }
                form method="post" action=(format!("{BASE_PATH}/welcome")) {
                    (csrf_input(&session.csrf))
                    label { "Cluster name" input name="cluster_name" id="cluster_name" value=(cluster) maxlength=(CLUSTER_NAME_LEN_MAX); }
                    div.actions {
                        button.primary type="submit" name="action" value="save" id="save" { "Save and continue" }
                        button type="submit" name="action" value="skip" id="skip" formnovalidate { "Skip" }
                    }
                }
            }
        },
    )
}

#[derive(Deserialize)]
struct WelcomeForm {
    action: String,
    cluster_name: Option<String>,
}

async fn welcome(State(state): State<AppState>, session: SessionUser, Form(form): Form<WelcomeForm>) -> PageResult {
    let user = &session.user;
    if !user.is_admin {
        // The welcome page is the administrators' to answer; others go on to the dashboard.
        return Ok(Redirect::to(&format!("{BASE_PATH}/")).into_response());
    }
    if form.action == "save" {
        let name = form.cluster_name.unwrap_or_default();
        match crate::cluster::rename(&state.shared, user, &name).await {
            Ok(()) => {}
            Err(error @ ClusterError::InvalidName) => {
                let cluster = cluster_name(&state).await?;
                let body = welcome_markup(&cluster, &session, Some(&error.to_string()));
                return Ok((StatusCode::BAD_REQUEST, body).into_response());
            }
            Err(error) => return Err(error.into()),
        }
    }
    crate::cluster::mark_welcome_done(&state.shared).await?;
    Ok(Redirect::to(&format!("{BASE_PATH}/")).into_response())
}

// ---- dashboard ----

async fn dashboard(State(state): State<AppState>, session: SessionUser) -> PageResult {
    let user = &session.user;
    let cluster = cluster_name(&state).await?;
    let rack_counts = state.racks.current_state_counts().await?;
    let count = |s: RackState| rack_counts.iter().find(|(state, _)| *state == s).map_or(0, |(_, n)| *n);
    let racks_total: u64 = rack_counts.iter().map(|(_, n)| n).sum();
    let users = crate::users::count(&state.shared).await?;
    let events = state.shared.store.events(DASHBOARD_EVENT_ROWS).await?;
    let machine_counts = machines::counts_by_state(&state).await?;
    let content = html! {
        h1 { "Dashboard" }
        div.tiles {
            a.tile href=(format!("{BASE_PATH}/controllers")) {
                span.big { (racks_total) } span { "rack controllers" }
                span.detail { (count(RackState::Online)) " online · " (count(RackState::Offline)) " offline"
                    @if count(RackState::NeedsReregistration) > 0 { " · " (count(RackState::NeedsReregistration)) " need re-registration" } }
            }
            a.tile href=(format!("{BASE_PATH}/machines")) id="machine-counts" {
                span.big { (machine_counts.iter().map(|(_, n)| n).sum::<u64>()) } span { "machines" }
                span.detail { @for (i, (s, n)) in machine_counts.iter().enumerate() {
                    @if i > 0 { " · " } span data-state=(s.as_str()) { (n) " " (s.label().to_lowercase()) }
                } }
            }
            div.tile { span.big { (users) } span { "users" } }
        }
        @if racks_total == 0 {
            section.card {
                h2 { "Add your first rack" }
                p { "A rack controller serves PXE to the machines of its rack. Install " code { "rackd" } " on a box in the rack and register it with this region." }
                @if user.is_admin { a.button.primary href=(format!("{BASE_PATH}/controllers/add")) { "Add rack controller" } }
            }
        }
        section.card {
            h2 { "Recent events" }
            (events_table(&events))
            a href=(format!("{BASE_PATH}/events")) { "All events" }
        }
    };
    Ok(layout("Dashboard", &cluster, Some(&session), Nav::Dashboard, content).into_response())
}

fn events_table(events: &[metalrack_api::EventView]) -> Markup {
    let now = now_ms();
    html! {
        @if events.is_empty() { p.muted { "No events yet." } } @else {
            table.events {
                thead { tr { th { "When" } th { "Event" } th { "By" } th { "What happened" } } }
                tbody { @for e in events {
                    tr { td title=(rfc3339(e.at_ms)) { (ago(e.at_ms, now)) } td { code { (e.kind) } } td { (e.actor) } td { (e.message) } }
                } }
            }
        }
    }
}

// ---- controllers ----

/// Racks one controllers page shows (the API's default page): each row carries its charts, so
/// the page's size and build time stay bounded however many racks register (1,000 at a large
/// site).
pub const CONTROLLERS_PAGE_ROWS: u32 = metalrack_api::RACK_PAGE_DEFAULT;

#[derive(Deserialize, Default)]
struct ControllersQuery {
    #[serde(default)]
    offset: u64,
}

fn controllers_href(offset: u64) -> String {
    format!("{BASE_PATH}/controllers?offset={offset}")
}

async fn controllers(
    State(state): State<AppState>,
    session: SessionUser,
    Query(query): Query<ControllersQuery>,
) -> PageResult {
    let user = &session.user;
    let cluster = cluster_name(&state).await?;
    let page = state.racks.page(query.offset, Some(CONTROLLERS_PAGE_ROWS)).await?;
    let (racks, total, offset) = (&page.racks, page.total, query.offset);
    let rows = u64::from(CONTROLLERS_PAGE_ROWS);
    let content = html! {
        div.heading {
            h1 { "Controllers" }
            @if user.is_admin { a.button.primary href=(format!("{BASE_PATH}/controllers/add")) id="add-rack" { "Add rack controller" } }
        }
        @if total == 0 { p.muted { "No rack controllers are registered yet." } } @else {
            @if !racks.is_empty() {
                table.controllers id="controllers" {
                    thead { tr { th { "Name" } th { "State" } th { "Last seen" } th { "Version" } th { "Addresses" } th { "Uptime" } th { "CPU load" } th { "Disk free" } th { "Sync" } th { "Recent" } } }
                    tbody { @for rack in racks { (controller_row(rack, &state.racks.health_samples(&rack.id))) } }
                }
            }
            p.pager {
                (total) @if total == 1 { " rack controller" } @else { " rack controllers" }
                @if total > rows && offset < total { " · showing " (offset + 1) "–" ((offset + rows).min(total)) }
                @if offset > 0 { " · " a href=(controllers_href(offset.saturating_sub(rows))) id="previous" { "previous" } }
                @if offset + rows < total { " · " a href=(controllers_href(offset + rows)) id="next" { "next" } }
            }
            (charts::explanation(state.shared.config.rack_heartbeat_interval_ms))
        }
    };
    Ok(layout("Controllers", &cluster, Some(&session), Nav::Controllers, content).into_response())
}

fn controller_row(rack: &RackView, samples: &[crate::racks::HealthSample]) -> Markup {
    let now = now_ms();
    let state_class = match rack.state {
        RackState::Online => "online",
        RackState::Offline => "offline",
        RackState::NeedsReregistration => "stale",
    };
    html! {
        tr data-rack=(rack.name) {
            td.name { (rack.name) }
            td { span class=(format!("badge {state_class}")) data-state=(rack.state.label()) { (rack.state.label()) } }
            td { @match rack.last_seen_ms { Some(at) => span title=(rfc3339(at)) { (ago(at, now)) }, None => span.muted { "never" } } }
            @match &rack.health {
                Some(h) => {
                    td { (h.version) }
                    td.addresses { @for a in &h.addresses { div { (a) } } @if h.addresses.is_empty() { @if let Some(r) = &rack.remote_address { (r) } } }
                    td { (human_duration(h.uptime_s)) }
                    td { (format!("{:.0} %", h.cpu_load * 100.0)) }
                    td { (human_bytes(h.disk_free_bytes)) " of " (human_bytes(h.disk_total_bytes)) }
                }
                None => { td.muted colspan="5" { "no heartbeat yet" } }
            }
            td.sync {
                a href=(format!("{BASE_PATH}/controllers/{}", rack.id)) { (policy_label(&rack.sync_policy)) }
                @if let Some(sync) = &rack.sync { div.muted { (sync_label(sync)) } }
            }
            td.recent { (charts::rack_charts(samples)) }
        }
    }
}

async fn add_controller(State(state): State<AppState>, session: SessionUser) -> PageResult {
    let user = &session.user;
    if !user.is_admin {
        return Err(PageError(ApiError::forbidden("Only administrators can add rack controllers.")));
    }
    let cluster = cluster_name(&state).await?;
    let url = state.shared.region_url();
    let secret = crate::secret::show(&state.shared, &user.username).await?;
    let command = format!("rackd register --url {url} --secret {}", secret.expose());
    let content = html! {
        h1 { "Add rack controller" }
        section.card {
            ol.steps {
                li { "Install " code { "rackd" } " on the rack's box (see the README's operator guide)." }
                li { "Run this on that box:" pre.command id="register-command" { (command) }
                    p.hint { "To keep the secret out of the process list and shell history, put it in a file only root can read and run "
                        code id="register-command-file" { "rackd register --url " (url) " --secret-file FILE" }
                        ", or pass " code { "--secret -" } " and type it on standard input." } }
                li { "Start it with " code { "rackd serve" } ". It appears on " a href=(format!("{BASE_PATH}/controllers")) { "Controllers" } " within seconds." }
            }
            p.hint { "The command holds this region's shared secret: treat it like a password. "
                "If the secret leaks, run " code { "regiond secret rotate" } " and register every rack again." }
        }
    };
    Ok(layout("Add rack controller", &cluster, Some(&session), Nav::Controllers, content).into_response())
}

// ---- events and account ----

async fn events(State(state): State<AppState>, session: SessionUser) -> PageResult {
    let cluster = cluster_name(&state).await?;
    let events = state.shared.store.events(EVENTS_PAGE_ROWS).await?;
    let content = html! { h1 { "Events" } section.card { (events_table(&events)) } };
    Ok(layout("Events", &cluster, Some(&session), Nav::Events, content).into_response())
}

async fn account(State(state): State<AppState>, session: SessionUser) -> PageResult {
    let user = &session.user;
    let cluster = cluster_name(&state).await?;
    let crate::users::Account { api_keys: keys, ssh_keys } = crate::users::account(&state.shared, user).await?;
    let content = html! {
        h1 { (user.username) }
        section.card {
            dl { dt { "Email" } dd { (user.email) } dt { "Role" } dd { @if user.is_admin { "administrator" } @else { "user" } } }
        }
        section.card {
            h2 { "API keys" }
            p.hint { "Send one as " code { "Authorization: Bearer KEY" } " to " code { (BASE_PATH) "/api/v1/" } ". "
                "On the region, " code { "regiond apikey --username " (user.username) } " prints them too." }
            @for key in &keys { pre.apikey { (key) } }
        }
        section.card {
            h2 { "SSH keys" }
            @if ssh_keys.is_empty() { p.muted { "None." } }
            @for key in &ssh_keys { pre { (key) } }
        }
    };
    Ok(layout(&user.username, &cluster, Some(&session), Nav::Account, content).into_response())
}

fn human_duration(s: u64) -> String {
    match s {
        0..=3599 => format!("{} min", s / 60),
        3600..=86_399 => format!("{} h {} min", s / 3600, s % 3600 / 60),
        _ => format!("{} days {} h", s / 86_400, s % 86_400 / 3600),
    }
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 * 1024 * 1024 * 1024), "3.0 GiB");
        assert_eq!(human_duration(125), "2 min");
        assert_eq!(human_duration(3 * 86_400 + 7200), "3 days 2 h");
    }
}

fn policy_label(policy: &SyncPolicy) -> String {
    let mut label = match policy.policy {
        SyncPolicyKind::Auto => format!("auto, {} after a change", human_duration(policy.delay_ms / 1000)),
        SyncPolicyKind::Window => format!("window {}–{}", policy.window_start, policy.window_end),
        SyncPolicyKind::Manual => "manual".to_owned(),
    };
    if policy.bandwidth_bytes_per_s > 0 {
        label.push_str(&format!(", ≤ {}/s", human_bytes(policy.bandwidth_bytes_per_s)));
    }
    label
}

fn sync_label(sync: &SyncReport) -> String {
    match sync.phase {
        SyncPhase::Idle => format!("up to date (revision {})", sync.snapshot_revision),
        SyncPhase::Waiting => format!("behind: {}", sync.message),
        SyncPhase::Syncing => format!(
            "syncing {:.0} %, {} to go",
            sync.bytes_done as f64 * 100.0 / sync.bytes_total.max(1) as f64,
            human_bytes(sync.bytes_total.saturating_sub(sync.bytes_done))
        ),
        SyncPhase::Paused => format!("paused: {}", sync.message),
        SyncPhase::Failed => format!("failed: {}", sync.message),
    }
}

async fn rack_by_id(state: &AppState, id: &str) -> Result<RackView, PageError> {
    match state.racks.view(id).await {
        Ok(rack) => Ok(rack),
        Err(crate::racks::RacksError::NoSuchRack) => Err(PageError(ApiError::not_found("No such rack controller."))),
        Err(e) => Err(e.into()),
    }
}

fn require_admin_page(user: &User) -> Result<(), PageError> {
    if user.is_admin {
        Ok(())
    } else {
        Err(PageError(ApiError::forbidden("Only administrators can do that.")))
    }
}

async fn controller_page(
    State(state): State<AppState>,
    session: SessionUser,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> PageResult {
    let cluster = cluster_name(&state).await?;
    let rack = rack_by_id(&state, &id).await?;
    Ok(layout(&rack.name, &cluster, Some(&session), Nav::Controllers, controller_markup(&state, &rack, &session, None))
        .into_response())
}

fn controller_markup(state: &AppState, rack: &RackView, session: &SessionUser, error: Option<&str>) -> Markup {
    let SessionUser { user, csrf } = session;
    let policy = &rack.sync_policy;
    let is = |kind: SyncPolicyKind| policy.policy == kind;
    html! {
        div.heading {
            h1 { (rack.name) " " span class=(format!("badge {}", match rack.state { RackState::Online => "online", RackState::Offline => "offline", RackState::NeedsReregistration => "stale" })) { (rack.state.label()) } }
            @if user.is_admin {
                form method="post" action=(format!("{BASE_PATH}/controllers/{}/sync", rack.id)) { (csrf_input(csrf)) button.primary type="submit" id="sync-now" { "Sync now" } }
            }
        }
        section.card id="recent-health" {
            h2 { "Recent health" }
            (charts::rack_charts(&state.racks.health_samples(&rack.id)))
            (charts::explanation(state.shared.config.rack_heartbeat_interval_ms))
        }
        section.card {
            h2 { "Image sync" }
            @match &rack.sync {
                Some(sync) => {
                    p id="sync-state" { (sync_label(sync)) }
                    @if let Some(id) = &sync.snapshot_id { p.muted { "Snapshot " code { (id) } } }
                    @if let Some(last) = &sync.last_sync {
                        p.muted { "Last sync: " (last.chunks_fetched) " chunks, " (human_bytes(last.bytes_fetched)) " fetched ("
                            (human_bytes(last.bytes_received)) " over the network), "
                            (human_bytes(last.bytes_reused)) " reused, " (format!("{:.1}", last.duration_ms as f64 / 1000.0)) " s" }
                    }
                }
                None => p.muted { "This rack has not reported a sync yet." }
            }
        }
        @if user.is_admin {
            section.card {
                h2 { "Sync policy" }
                @if let Some(error) = error { p.error role="alert" { (error) } }
                form method="post" action=(format!("{BASE_PATH}/controllers/{}/policy", rack.id)) id="policy-form" {
                    (csrf_input(csrf))
                    label { "Policy"
                        select name="policy" id="policy" {
                            option value="auto" selected[is(SyncPolicyKind::Auto)] { "auto: a while after each change" }
                            option value="window" selected[is(SyncPolicyKind::Window)] { "window: only between the times below" }
                            option value="manual" selected[is(SyncPolicyKind::Manual)] { "manual: only when asked" }
                        }
                    }
                    label { "Delay after a change (seconds, auto)" input name="delay_s" type="number" min="0" value=(policy.delay_ms / 1000); }
                    div.actions {
                        label { "Window start (rack local time)" input name="window_start" value=(policy.window_start) pattern="[0-2][0-9]:[0-5][0-9]"; }
                        label { "Window end" input name="window_end" value=(policy.window_end) pattern="[0-2][0-9]:[0-5][0-9]"; }
                    }
                    label { "Bandwidth cap (MiB/s, 0 = none)" input name="bandwidth_mib_s" type="number" min="0" step="any" value=(policy.bandwidth_bytes_per_s as f64 / 1048576.0); }
                    button.primary type="submit" id="save-policy" { "Save policy" }
                }
            }
        }
    }
}

#[derive(Deserialize)]
struct PolicyForm {
    policy: String,
    delay_s: u64,
    window_start: String,
    window_end: String,
    bandwidth_mib_s: f64,
}

async fn controller_policy(
    State(state): State<AppState>,
    session: SessionUser,
    axum::extract::Path(id): axum::extract::Path<String>,
    Form(form): Form<PolicyForm>,
) -> PageResult {
    let user = &session.user;
    require_admin_page(user)?;
    let kind = match form.policy.as_str() {
        "auto" => SyncPolicyKind::Auto,
        "window" => SyncPolicyKind::Window,
        "manual" => SyncPolicyKind::Manual,
        _ => return Err(PageError(ApiError::bad_request("Unknown policy."))),
    };
    let policy = SyncPolicy {
        policy: kind,
        delay_ms: form.delay_s.saturating_mul(1000),
        window_start: form.window_start,
        window_end: form.window_end,
        bandwidth_bytes_per_s: (form.bandwidth_mib_s.max(0.0) * 1048576.0) as u64,
    };
    if let Err(PageError(error)) = state.racks.set_sync_policy(user, &id, &policy).await.map_err(PageError::from) {
        if error.status == StatusCode::BAD_REQUEST {
            let cluster = cluster_name(&state).await?;
            let rack = rack_by_id(&state, &id).await?;
            let body = layout(
                &rack.name,
                &cluster,
                Some(&session),
                Nav::Controllers,
                controller_markup(&state, &rack, &session, Some(&error.body.error)),
            );
            return Ok((StatusCode::BAD_REQUEST, body).into_response());
        }
        return Err(PageError(error));
    }
    Ok(Redirect::to(&format!("{BASE_PATH}/controllers/{id}")).into_response())
}

async fn controller_sync(
    State(state): State<AppState>,
    session: SessionUser,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> PageResult {
    let user = &session.user;
    require_admin_page(user)?;
    state.racks.request_sync(user, Some(&id)).await?;
    Ok(Redirect::to(&format!("{BASE_PATH}/controllers/{id}")).into_response())
}

async fn images_page(State(state): State<AppState>, session: SessionUser) -> PageResult {
    let user = &session.user;
    let cluster = cluster_name(&state).await?;
    let images = state.catalogue.image_views().await?;
    let now = now_ms();
    let content = html! {
        div.heading {
            h1 { "Images" }
            @if user.is_admin && !images.is_empty() {
                form method="post" action=(format!("{BASE_PATH}/images/sync")) { (csrf_input(&session.csrf)) button.primary type="submit" id="sync-all" { "Sync now (all racks)" } }
            }
        }
        @if images.is_empty() {
            section.card {
                p { "No images yet. Push one from any machine with " code { "imgtool" } ":" }
                pre { "imgtool push ubuntu.img --name ubuntu/jammy --arch amd64 --kind root-disk \\\n  --url http://REGION:5240/MAAS --api-key KEY" }
                p.hint { "Your API key is on your " a href=(format!("{BASE_PATH}/account")) { "account page" } "." }
            }
        }
        @for image in &images {
            section.card data-image=(image.name) {
                h2 { (image.name) " " span.muted { (image.arch) } }
                table.versions {
                    thead { tr { th { "Version" } th { "Files" } th { "Size" } th { "Chunks" } th { "Racks" } th {} } }
                    tbody { @for version in &image.versions {
                        tr data-version=(version.version) {
                            td { (version.version) div.muted title=(rfc3339(version.created_at_ms)) { (ago(version.created_at_ms, now)) } }
                            td { @for f in &version.files { div { (f.kind) " " code title=(f.file_hash) { (&f.file_hash[..12]) } } } }
                            td { (human_bytes(version.size_bytes)) }
                            td { (version.n_chunks) }
                            td.racks { @for r in &version.racks {
                                div.rack-sync data-rack=(r.rack_name) {
                                    (r.rack_name) " "
                                    @match r.status {
                                        VersionSyncStatus::Synced => span.badge.online data-status="synced" { "synced" },
                                        VersionSyncStatus::Syncing => span.badge.stale data-status="syncing" {
                                            "syncing " (format!("{:.0} %", r.percent.unwrap_or(0.0))) ", " (human_bytes(r.bytes_to_go.unwrap_or(0))) " to go" },
                                        VersionSyncStatus::Behind => span.badge.offline data-status="behind" title=[r.reason.as_deref()] { "behind" },
                                        VersionSyncStatus::Failed => span.badge.failed data-status="failed" { "failed: " (r.reason.as_deref().unwrap_or("")) },
                                    }
                                }
                            } @if version.racks.is_empty() { span.muted { "no racks" } } }
                            td { @if user.is_admin {
                                // A second click to confirm, without JavaScript (the CSP allows none).
                                details.confirm {
                                    summary { "Delete" }
                                    form method="post" action=(format!("{BASE_PATH}/images/{}/versions/{}/delete", image.id, version.version)) {
                                        (csrf_input(&session.csrf))
                                        button type="submit" { "Delete " (image.name) " version " (version.version) }
                                    }
                                }
                            } }
                        }
                    } }
                }
            }
        }
    };
    let mut page = layout("Images", &cluster, Some(&session), Nav::Images, content).into_response();
    // The page follows sync progress without JavaScript.
    page.headers_mut().insert(header::REFRESH, axum::http::HeaderValue::from_static("5"));
    Ok(page)
}

async fn images_sync(State(state): State<AppState>, session: SessionUser) -> PageResult {
    let user = &session.user;
    require_admin_page(user)?;
    state.racks.request_sync(user, None).await?;
    Ok(Redirect::to(&format!("{BASE_PATH}/images")).into_response())
}

async fn images_delete(
    State(state): State<AppState>,
    session: SessionUser,
    axum::extract::Path((image_id, version)): axum::extract::Path<(String, String)>,
) -> PageResult {
    let user = &session.user;
    require_admin_page(user)?;
    state.catalogue.delete_version(user, &image_id, &version).await?;
    Ok(Redirect::to(&format!("{BASE_PATH}/images")).into_response())
}
