//! The machines' queries: machine rows (lifecycle, power settings, jobs), machine events, power
//! requests for racks, the deploy queue, and the boot events racks report. Functions taking a
//! connection run inside the caller's transaction, so a change, its event and its power request
//! commit together.

use metalrack_api::agent::{AgentJob, DeployEnv, DeployProgress, ImageRef, Inventory};
use metalrack_api::machines::{BootAction, MachineState};
use metalrack_api::power::{PowerAction, PowerParameters, PowerRequest, PowerState};
use metalrack_api::EventView;
use std::collections::HashMap;

use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};

use crate::db::events::EVENTS_KEPT_MAX;
use crate::db::{query_error, Store, StoreError};
use crate::util::now_ms;

/// What the deploy scheduler reads ([`Store::deploy_queue`]).
#[derive(Debug, Default, PartialEq)]
pub struct DeployQueue {
    /// Waiting machines' (id, rack), first to be granted first.
    pub waiting: Vec<(String, Option<String>)>,
    /// Deploys running per rack (racks with none absent); empty when nothing waits.
    pub running: HashMap<Option<String>, usize>,
}

/// A machine as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct MachineRow {
    pub id: String,
    pub mac: String,
    pub hostname: String,
    /// The legacy bare boot decision (`PUT /machines/{mac}`), if one was set.
    pub boot: Option<BootAction>,
    pub state: MachineState,
    pub status_message: String,
    pub rack_id: Option<String>,
    pub power: Option<PowerParameters>,
    pub power_state: PowerState,
    pub power_checked_at_ms: Option<i64>,
    pub image: Option<ImageRef>,
    pub disk: Option<String>,
    pub job: Option<AgentJob>,
    pub job_token: Option<String>,
    pub progress: Option<DeployProgress>,
    pub last_progress_at_ms: Option<i64>,
    pub inventory: Option<Inventory>,
    pub deploy_requested_at_ms: Option<i64>,
    pub state_changed_at_ms: i64,
    pub updated_at_ms: i64,
}

impl MachineRow {
    /// A machine just known (New): no rack, power, job, image or inventory yet; callers set
    /// what they know.
    pub fn new(id: String, mac: String, hostname: String, now_ms: i64) -> MachineRow {
        MachineRow {
            id,
            mac,
            hostname,
            boot: None,
            state: MachineState::New,
            status_message: String::new(),
            rack_id: None,
            power: None,
            power_state: PowerState::Unknown,
            power_checked_at_ms: None,
            image: None,
            disk: None,
            job: None,
            job_token: None,
            progress: None,
            last_progress_at_ms: None,
            inventory: None,
            deploy_requested_at_ms: None,
            state_changed_at_ms: now_ms,
            updated_at_ms: now_ms,
        }
    }
}

const COLUMNS: &str = "mac, id, hostname, boot_json, state, status_message, rack_id, power_json, power_state, \
     power_checked_at_ms, image_json, disk, job_json, job_token, progress_json, last_progress_at_ms, inventory_json, \
     deploy_requested_at_ms, state_changed_at_ms, updated_at_ms";

fn to_json<T: serde::Serialize>(value: &Option<T>) -> Option<String> {
    value.as_ref().map(|v| serde_json::to_string(v).expect("wire types serialize"))
}

pub fn power_state_word(state: PowerState) -> &'static str {
    match state {
        PowerState::On => "on",
        PowerState::Off => "off",
        PowerState::Unknown => "unknown",
        PowerState::Error => "error",
    }
}

fn parse_power_state(word: &str) -> PowerState {
    match word {
        "on" => PowerState::On,
        "off" => PowerState::Off,
        "error" => PowerState::Error,
        _ => PowerState::Unknown,
    }
}

fn read_row(row: &AnyRow) -> Result<MachineRow, StoreError> {
    let read = || query_error("read machine");
    let mac: String = row.try_get(0).map_err(read())?;
    let json = |index: usize, what: &str| -> Result<Option<String>, StoreError> {
        let _ = what;
        row.try_get::<Option<String>, _>(index).map_err(query_error("read machine"))
    };
    fn parse<T: serde::de::DeserializeOwned>(
        mac: &str,
        what: &str,
        text: Option<String>,
    ) -> Result<Option<T>, StoreError> {
        text.map(|t| serde_json::from_str(&t))
            .transpose()
            .map_err(|e| StoreError::Corrupt { what: format!("{what} of machine {mac}: {e}") })
    }
    let state: String = row.try_get(4).map_err(read())?;
    Ok(MachineRow {
        id: row.try_get(1).map_err(read())?,
        hostname: row.try_get(2).map_err(read())?,
        boot: parse(&mac, "boot decision", json(3, "boot")?)?,
        state: MachineState::parse(&state)
            .ok_or_else(|| StoreError::Corrupt { what: format!("state {state:?} of machine {mac}") })?,
        status_message: row.try_get(5).map_err(read())?,
        rack_id: row.try_get(6).map_err(read())?,
        power: parse(&mac, "power parameters", json(7, "power")?)?,
        power_state: parse_power_state(&row.try_get::<String, _>(8).map_err(read())?),
        power_checked_at_ms: row.try_get(9).map_err(read())?,
        image: parse(&mac, "image", json(10, "image")?)?,
        disk: row.try_get(11).map_err(read())?,
        job: parse(&mac, "job", json(12, "job")?)?,
        job_token: row.try_get(13).map_err(read())?,
        progress: parse(&mac, "progress", json(14, "progress")?)?,
        last_progress_at_ms: row.try_get(15).map_err(read())?,
        inventory: parse(&mac, "inventory", json(16, "inventory")?)?,
        deploy_requested_at_ms: row.try_get(17).map_err(read())?,
        state_changed_at_ms: row.try_get(18).map_err(read())?,
        updated_at_ms: row.try_get(19).map_err(read())?,
        mac,
    })
}

/// The machine named `key` (its id, or its normalised MAC).
pub async fn machine_row(conn: &mut AnyConnection, key: &str) -> Result<Option<MachineRow>, StoreError> {
    let row = sqlx::query(&format!("SELECT {COLUMNS} FROM machines WHERE id = $1 OR mac = $1"))
        .bind(key)
        .fetch_optional(&mut *conn)
        .await
        .map_err(query_error("look up machine"))?;
    row.as_ref().map(read_row).transpose()
}

/// Inserts `machine`; `false` when its MAC or id is taken.
pub async fn insert_machine(conn: &mut AnyConnection, machine: &MachineRow) -> Result<bool, StoreError> {
    let sql = format!(
        "INSERT INTO machines ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, \
         $16, $17, $18, $19, $20) ON CONFLICT DO NOTHING"
    );
    let result =
        bind_row(sqlx::query(&sql), machine).execute(&mut *conn).await.map_err(query_error("insert machine"))?;
    Ok(result.rows_affected() == 1)
}

fn bind_row<'q>(
    query: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    m: &MachineRow,
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    query
        .bind(m.mac.clone())
        .bind(m.id.clone())
        .bind(m.hostname.clone())
        .bind(to_json(&m.boot))
        .bind(m.state.as_str())
        .bind(m.status_message.clone())
        .bind(m.rack_id.clone())
        .bind(to_json(&m.power))
        .bind(power_state_word(m.power_state))
        .bind(m.power_checked_at_ms)
        .bind(to_json(&m.image))
        .bind(m.disk.clone())
        .bind(to_json(&m.job))
        .bind(m.job_token.clone())
        .bind(to_json(&m.progress))
        .bind(m.last_progress_at_ms)
        .bind(to_json(&m.inventory))
        .bind(m.deploy_requested_at_ms)
        .bind(m.state_changed_at_ms)
        .bind(m.updated_at_ms)
}

/// Writes every column of `machine` back to its row (found by id).
pub async fn save_machine(conn: &mut AnyConnection, machine: &MachineRow) -> Result<(), StoreError> {
    let query = sqlx::query(
        "UPDATE machines SET mac = $1, hostname = $3, boot_json = $4, state = $5, status_message = $6, rack_id = $7, \
         power_json = $8, power_state = $9, power_checked_at_ms = $10, image_json = $11, disk = $12, job_json = $13, \
         job_token = $14, progress_json = $15, last_progress_at_ms = $16, inventory_json = $17, \
         deploy_requested_at_ms = $18, state_changed_at_ms = $19, updated_at_ms = $20 WHERE id = $2",
    );
    bind_row(query, machine).execute(&mut *conn).await.map_err(query_error("update machine"))?;
    Ok(())
}

pub async fn delete_machine(conn: &mut AnyConnection, id: &str) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM machines WHERE id = $1")
        .bind(id)
        .execute(&mut *conn)
        .await
        .map_err(query_error("delete machine"))?;
    Ok(())
}

/// Appends an event about machine `machine_id` (trimming the log is left to the boot-event and
/// general paths, which run far more often).
pub async fn insert_machine_event(
    conn: &mut AnyConnection,
    kind: &str,
    actor: &str,
    message: &str,
    machine_id: &str,
) -> Result<(), StoreError> {
    sqlx::query("INSERT INTO events (at_ms, kind, actor, message, machine_id) VALUES ($1, $2, $3, $4, $5)")
        .bind(now_ms())
        .bind(kind)
        .bind(actor)
        .bind(message)
        .bind(machine_id)
        .execute(&mut *conn)
        .await
        .map_err(query_error("insert machine event"))?;
    Ok(())
}

/// Queues a power request for `rack_id`.
pub async fn queue_power(
    conn: &mut AnyConnection,
    rack_id: &str,
    machine_id: &str,
    actions: &[PowerAction],
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO power_requests (rack_id, machine_id, actions_json, created_at_ms, done) VALUES ($1, $2, $3, $4, 0)",
    )
    .bind(rack_id)
    .bind(machine_id)
    .bind(serde_json::to_string(actions).expect("actions serialize"))
    .bind(now_ms())
    .execute(&mut *conn)
    .await
    .map_err(query_error("queue power request"))?;
    Ok(())
}

/// Raises the boot generation of the racks that serve a changed machine (`None`: a machine of
/// no rack, which every rack serves), in the caller's transaction: see migration 0008.
pub async fn raise_boot_generation(conn: &mut AnyConnection, racks: &[Option<&str>]) -> Result<(), StoreError> {
    let raise = "UPDATE racks SET boot_generation = boot_generation + 1";
    if racks.iter().any(Option::is_none) {
        sqlx::query(raise).execute(&mut *conn).await.map_err(query_error("raise boot generations"))?;
        return Ok(());
    }
    let mut ids: Vec<&str> = racks.iter().flatten().copied().collect();
    ids.sort_unstable();
    ids.dedup();
    for id in ids {
        sqlx::query(&format!("{raise} WHERE id = $1"))
            .bind(id)
            .execute(&mut *conn)
            .await
            .map_err(query_error("raise a boot generation"))?;
    }
    Ok(())
}

/// Drops the unanswered power requests of a machine (a new job's request replaces them).
pub async fn cancel_power(conn: &mut AnyConnection, machine_id: &str) -> Result<(), StoreError> {
    sqlx::query("UPDATE power_requests SET done = 1 WHERE machine_id = $1 AND done = 0")
        .bind(machine_id)
        .execute(&mut *conn)
        .await
        .map_err(query_error("cancel power requests"))?;
    Ok(())
}

/// Deploy queue positions (1 = next) of those of `machines` that wait for a deploy slot
/// (Allocated), by id, in one query however many there are: a page of 100 machines half of
/// which wait took one query per waiting machine, and during a deploy storm that was most of
/// the machine list's time (docs/PERFORMANCE.md, issue 13). The order is the scheduler's
/// (`schedule_deploys`): per rack, by request time with none first, then id.
pub async fn queue_positions(
    conn: &mut AnyConnection,
    machines: &[MachineRow],
) -> Result<HashMap<String, u32>, StoreError> {
    let waiting: Vec<&str> =
        machines.iter().filter(|m| m.state == MachineState::Allocated).map(|m| m.id.as_str()).collect();
    if waiting.is_empty() {
        return Ok(HashMap::new());
    }
    let placeholders: Vec<String> = (1..=waiting.len()).map(|n| format!("${n}")).collect();
    let sql = format!(
        "SELECT id, position FROM (SELECT id, ROW_NUMBER() OVER (PARTITION BY rack_id \
         ORDER BY deploy_requested_at_ms NULLS FIRST, id) AS position FROM machines WHERE state = 'allocated') \
         AS queue WHERE id IN ({})",
        placeholders.join(", ")
    );
    let mut query = sqlx::query_as::<_, (String, i64)>(&sql);
    for id in waiting {
        query = query.bind(id);
    }
    let rows = query.fetch_all(&mut *conn).await.map_err(query_error("read the deploy queue"))?;
    Ok(rows.into_iter().map(|(id, position)| (id, u32::try_from(position).unwrap_or(u32::MAX))).collect())
}

/// Files of image version `image` (all versions when `version` is `None`), newest version first:
/// `(version, kinds)`.
pub async fn image_versions(
    conn: &mut AnyConnection,
    image: &str,
    arch: &str,
) -> Result<Vec<(String, Vec<String>)>, StoreError> {
    let rows = sqlx::query(
        "SELECT v.version, f.kind FROM images i JOIN image_versions v ON v.image_id = i.id \
         JOIN image_files f ON f.version_id = v.id WHERE i.name = $1 AND i.arch = $2 \
         ORDER BY v.created_at_ms DESC, v.version DESC, f.kind",
    )
    .bind(image)
    .bind(arch)
    .fetch_all(&mut *conn)
    .await
    .map_err(query_error("list image versions"))?;
    let mut versions: Vec<(String, Vec<String>)> = Vec::new();
    for row in rows {
        let version: String = row.try_get(0).map_err(query_error("read image version"))?;
        let kind: String = row.try_get(1).map_err(query_error("read image version"))?;
        match versions.last_mut() {
            Some((last, kinds)) if *last == version => kinds.push(kind),
            _ => versions.push((version, vec![kind])),
        }
    }
    Ok(versions)
}

/// The rack whose id or name is `key`: its id.
pub async fn rack_id_by_key(conn: &mut AnyConnection, key: &str) -> Result<Option<String>, StoreError> {
    sqlx::query_scalar("SELECT id FROM racks WHERE id = $1 OR name = $1")
        .bind(key)
        .fetch_optional(&mut *conn)
        .await
        .map_err(query_error("look up rack"))
}

/// Every rack's id (to pick the one when there is one).
pub async fn rack_ids(conn: &mut AnyConnection) -> Result<Vec<String>, StoreError> {
    sqlx::query_scalar("SELECT id FROM racks ORDER BY id LIMIT 2")
        .fetch_all(&mut *conn)
        .await
        .map_err(query_error("list racks"))
}

impl Store {
    /// One page of machines (all states when `state` is `None`), by hostname, and the total.
    pub async fn machine_page(
        &self,
        state: Option<MachineState>,
        offset: u64,
        limit: u32,
    ) -> Result<(Vec<MachineRow>, u64), StoreError> {
        let filter = state.map(MachineState::as_str);
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM machines WHERE ($1 IS NULL OR state = $1) ORDER BY hostname, id LIMIT $2 OFFSET $3"
        ))
        .bind(filter)
        .bind(i64::from(limit))
        .bind(i64::try_from(offset).unwrap_or(i64::MAX))
        .fetch_all(self.pool())
        .await
        .map_err(query_error("list machines"))?;
        let total: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM machines WHERE ($1 IS NULL OR state = $1)")
            .bind(filter)
            .fetch_one(self.pool())
            .await
            .map_err(query_error("count machines"))?;
        Ok((rows.iter().map(read_row).collect::<Result<_, _>>()?, total as u64))
    }

    /// How many machines are in each state, in [`MachineState::ALL`]'s order, states with none
    /// left out: one query (the dashboard once made one page query per state, eleven in all).
    pub async fn machine_counts_by_state(&self) -> Result<Vec<(MachineState, u64)>, StoreError> {
        let rows: Vec<(String, i64)> = sqlx::query_as("SELECT state, COUNT(*) FROM machines GROUP BY state")
            .fetch_all(self.pool())
            .await
            .map_err(query_error("count machines by state"))?;
        let mut counts = rows
            .into_iter()
            .map(|(state, n)| {
                let parsed = MachineState::parse(&state)
                    .ok_or_else(|| StoreError::Corrupt { what: format!("machine state {state:?}") })?;
                Ok((parsed, n as u64))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        counts.sort_by_key(|(state, _)| MachineState::ALL.iter().position(|s| s == state));
        Ok(counts)
    }

    /// The machines rack `rack_id` serves: its own and those of no rack.
    pub async fn rack_machines(&self, rack_id: &str) -> Result<Vec<MachineRow>, StoreError> {
        let rows =
            sqlx::query(&format!("SELECT {COLUMNS} FROM machines WHERE rack_id = $1 OR rack_id IS NULL ORDER BY mac"))
                .bind(rack_id)
                .fetch_all(self.pool())
                .await
                .map_err(query_error("list the rack's machines"))?;
        rows.iter().map(read_row).collect()
    }

    /// Ids of the machines running a job (commissioning, deploying, releasing) with no report
    /// since `before_ms` (none counts as 0). The stall timer asks every second: only the stalled
    /// rows' ids cross, where reading every running row in full (JSON columns parsed) cost a
    /// machine list's worth of the region's core each second of a deploy storm.
    pub async fn stalled_job_ids(&self, before_ms: i64) -> Result<Vec<String>, StoreError> {
        sqlx::query_scalar(
            "SELECT id FROM machines WHERE state IN ('commissioning', 'deploying', 'releasing') \
             AND COALESCE(last_progress_at_ms, 0) < $1 ORDER BY id",
        )
        .bind(before_ms)
        .fetch_all(self.pool())
        .await
        .map_err(query_error("list stalled jobs"))
    }

    /// The deploy queue as the scheduler needs it: the waiting (Allocated) machines' ids and
    /// racks in the order they asked (request time with none first, then id), and how many
    /// deploys each rack runs, only when some machine waits. The scheduler runs every second
    /// and after every finished deploy; ids and counts are all it reads.
    pub async fn deploy_queue(&self) -> Result<DeployQueue, StoreError> {
        let waiting: Vec<(String, Option<String>)> = sqlx::query_as(
            "SELECT id, rack_id FROM machines WHERE state = 'allocated' \
             ORDER BY deploy_requested_at_ms NULLS FIRST, id",
        )
        .fetch_all(self.pool())
        .await
        .map_err(query_error("list waiting deploys"))?;
        if waiting.is_empty() {
            return Ok(DeployQueue::default());
        }
        let running: Vec<(Option<String>, i64)> =
            sqlx::query_as("SELECT rack_id, COUNT(*) FROM machines WHERE state = 'deploying' GROUP BY rack_id")
                .fetch_all(self.pool())
                .await
                .map_err(query_error("count running deploys"))?;
        let running = running.into_iter().map(|(rack, n)| (rack, usize::try_from(n).unwrap_or(usize::MAX))).collect();
        Ok(DeployQueue { waiting, running })
    }

    /// How many machines are in each state (states with none are absent): one grouped query,
    /// cheap enough for every metrics scrape.
    pub async fn machine_state_counts(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let rows = sqlx::query("SELECT state, COUNT(*) FROM machines GROUP BY state")
            .fetch_all(self.pool())
            .await
            .map_err(query_error("count machines by state"))?;
        rows.iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
            .collect::<Result<_, sqlx::Error>>()
            .map_err(query_error("read machine counts"))
    }

    pub async fn all_machines(&self) -> Result<Vec<MachineRow>, StoreError> {
        let rows = sqlx::query(&format!("SELECT {COLUMNS} FROM machines"))
            .fetch_all(self.pool())
            .await
            .map_err(query_error("list machines"))?;
        rows.iter().map(read_row).collect()
    }

    /// The newest `limit` events about machine `machine_id`, newest first.
    pub async fn machine_events(&self, machine_id: &str, limit: i64) -> Result<Vec<EventView>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, at_ms, kind, actor, message FROM events WHERE machine_id = $1 ORDER BY id DESC LIMIT $2",
        )
        .bind(machine_id)
        .bind(limit)
        .fetch_all(self.pool())
        .await
        .map_err(query_error("list machine events"))?;
        rows.iter().map(crate::db::events::read_event).collect()
    }

    pub async fn has_open_power_request(&self, machine_id: &str) -> Result<bool, StoreError> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM power_requests WHERE machine_id = $1 AND done = 0")
            .bind(machine_id)
            .fetch_one(self.pool())
            .await
            .map_err(query_error("count open power requests"))?;
        Ok(n > 0)
    }

    /// Deletes answered (or replaced) power requests created before `before_ms`.
    pub async fn delete_done_power_requests(&self, before_ms: i64) -> Result<u64, StoreError> {
        let result = self
            .write_one(sqlx::query("DELETE FROM power_requests WHERE done = 1 AND created_at_ms < $1").bind(before_ms))
            .await
            .map_err(query_error("delete done power requests"))?;
        Ok(result.rows_affected())
    }

    pub async fn queue_power_query(&self, rack_id: &str, machine_id: &str) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await.map_err(query_error("begin queue power query"))?;
        queue_power(&mut tx, rack_id, machine_id, &[PowerAction::Query]).await?;
        tx.commit().await.map_err(query_error("commit queue power query"))
    }

    /// The newest event about machine `machine_id`, for a failure's status message.
    pub async fn last_machine_event(&self, machine_id: &str) -> Result<Option<EventView>, StoreError> {
        Ok(self.machine_events(machine_id, 1).await?.into_iter().next())
    }

    /// Power requests for `rack_id` not yet sent, or sent before `resend_before_ms` and not
    /// answered: at most `limit`, oldest first, marked sent now.
    pub async fn take_power_requests(
        &self,
        rack_id: &str,
        resend_before_ms: i64,
        limit: usize,
    ) -> Result<Vec<PowerRequest>, StoreError> {
        // A read first: every queued request wakes every rack's poll, and most find nothing, so
        // they must not each take the database's one write lock.
        let pending: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM power_requests \
             WHERE rack_id = $1 AND done = 0 AND (sent_at_ms IS NULL OR sent_at_ms < $2)",
        )
        .bind(rack_id)
        .bind(resend_before_ms)
        .fetch_one(self.pool())
        .await
        .map_err(query_error("count power requests"))?;
        if pending == 0 {
            return Ok(Vec::new());
        }
        let mut tx = self.begin_write().await.map_err(query_error("begin take power requests"))?;
        // In the transaction that takes the requests: at least the generation of the change
        // that queued each of them.
        let boot_generation: i64 = sqlx::query_scalar("SELECT boot_generation FROM racks WHERE id = $1")
            .bind(rack_id)
            .fetch_optional(&mut *tx)
            .await
            .map_err(query_error("read the rack's boot generation"))?
            .unwrap_or(0);
        let rows = sqlx::query(
            "SELECT p.id, p.machine_id, m.mac, m.power_json, p.actions_json FROM power_requests p \
             JOIN machines m ON m.id = p.machine_id \
             WHERE p.rack_id = $1 AND p.done = 0 AND (p.sent_at_ms IS NULL OR p.sent_at_ms < $2) \
             ORDER BY p.id LIMIT $3",
        )
        .bind(rack_id)
        .bind(resend_before_ms)
        .bind(limit as i64)
        .fetch_all(&mut *tx)
        .await
        .map_err(query_error("list power requests"))?;
        let mut requests = Vec::with_capacity(rows.len());
        for row in &rows {
            let read = || query_error("read power request");
            let id: i64 = row.try_get(0).map_err(read())?;
            let machine_id: String = row.try_get(1).map_err(read())?;
            let power: Option<String> = row.try_get(3).map_err(read())?;
            let actions: String = row.try_get(4).map_err(read())?;
            let corrupt = |e: serde_json::Error| StoreError::Corrupt { what: format!("power request {id}: {e}") };
            let parameters = match power {
                Some(json) => serde_json::from_str(&json).map_err(corrupt)?,
                None => PowerParameters::Manual,
            };
            requests.push(PowerRequest {
                id,
                mac: row.try_get(2).map_err(read())?,
                machine_id,
                parameters,
                actions: serde_json::from_str(&actions).map_err(corrupt)?,
                boot_generation: boot_generation.max(0) as u64,
            });
            sqlx::query("UPDATE power_requests SET sent_at_ms = $1 WHERE id = $2")
                .bind(now_ms())
                .bind(id)
                .execute(&mut *tx)
                .await
                .map_err(query_error("mark power request sent"))?;
        }
        tx.commit().await.map_err(query_error("commit take power requests"))?;
        Ok(requests)
    }

    /// Appends a rack's boot events to the event log in one transaction, skipping any this rack
    /// sent before (by `(queue_id, seq)`; 0 and 0 are never skipped), and trims the log to
    /// [`EVENTS_KEPT_MAX`] once. `apply` runs in the same transaction for each new event (the
    /// machines domain applies reports with it). Returns how many were new. `seq` must fit an
    /// i64 (checked by the caller: the wire's bound).
    pub async fn record_boot_events_with<F>(
        &self,
        rack_id: &str,
        rack_name: &str,
        events: &[metalrack_api::machines::BootEvent],
        mut apply: F,
    ) -> Result<u64, StoreError>
    where
        F: for<'c> FnMut(
            &'c mut AnyConnection,
            &'c metalrack_api::machines::BootEvent,
        ) -> futures_util::future::BoxFuture<'c, Result<(), StoreError>>,
    {
        let mut tx = self.begin_write().await.map_err(query_error("begin record boot events"))?;
        let now = now_ms();
        let mut stored = 0;
        for event in events {
            let has_id = event.queue_id != 0 || event.seq != 0;
            let id = |value: u64| has_id.then(|| i64::try_from(value).expect("checked against the wire bound"));
            let result = sqlx::query(
                "INSERT INTO events (at_ms, kind, actor, message, rack_id, rack_queue_id, rack_seq) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7) \
                 ON CONFLICT (rack_id, rack_queue_id, rack_seq) DO NOTHING",
            )
            .bind(now)
            .bind(&event.kind)
            .bind(format!("{} via {rack_name}", event.mac))
            .bind(&event.message)
            .bind(has_id.then_some(rack_id))
            .bind(id(event.queue_id))
            .bind(id(event.seq))
            .execute(&mut *tx)
            .await
            .map_err(query_error("insert boot event"))?;
            if result.rows_affected() == 1 {
                stored += 1;
                apply(&mut tx, event).await?;
            }
        }
        sqlx::query("DELETE FROM events WHERE id <= (SELECT MAX(id) FROM events) - $1")
            .bind(EVENTS_KEPT_MAX)
            .execute(&mut *tx)
            .await
            .map_err(query_error("trim events"))?;
        tx.commit().await.map_err(query_error("commit boot events"))?;
        Ok(stored)
    }

    /// Appends boot events without applying anything (see [`Store::record_boot_events_with`]).
    pub async fn record_boot_events(
        &self,
        rack_id: &str,
        rack_name: &str,
        events: &[metalrack_api::machines::BootEvent],
    ) -> Result<u64, StoreError> {
        self.record_boot_events_with(rack_id, rack_name, events, |_, _| Box::pin(async { Ok(()) })).await
    }
}

/// The power request `id` of rack `rack_id` if it is still open: its machine id.
pub async fn open_power_request(
    conn: &mut AnyConnection,
    rack_id: &str,
    id: i64,
) -> Result<Option<(String, Vec<PowerAction>)>, StoreError> {
    let row =
        sqlx::query("SELECT machine_id, actions_json FROM power_requests WHERE id = $1 AND rack_id = $2 AND done = 0")
            .bind(id)
            .bind(rack_id)
            .fetch_optional(&mut *conn)
            .await
            .map_err(query_error("look up power request"))?;
    let Some(row) = row else { return Ok(None) };
    let machine_id: String = row.try_get(0).map_err(query_error("read power request"))?;
    let actions: String = row.try_get(1).map_err(query_error("read power request"))?;
    let actions =
        serde_json::from_str(&actions).map_err(|e| StoreError::Corrupt { what: format!("power request {id}: {e}") })?;
    Ok(Some((machine_id, actions)))
}

pub async fn finish_power_request(conn: &mut AnyConnection, id: i64) -> Result<(), StoreError> {
    sqlx::query("UPDATE power_requests SET done = 1 WHERE id = $1")
        .bind(id)
        .execute(&mut *conn)
        .await
        .map_err(query_error("finish power request"))?;
    Ok(())
}

/// The newest version of `image`/`arch` holding both `kernel` and `initrd`, as a deploy env.
pub async fn deploy_env(
    conn: &mut AnyConnection,
    image: &str,
    arch: &str,
    kernel_params: &str,
) -> Result<Option<DeployEnv>, StoreError> {
    let versions = image_versions(conn, image, arch).await?;
    Ok(versions
        .into_iter()
        .find(|(_, kinds)| kinds.iter().any(|k| k == "kernel") && kinds.iter().any(|k| k == "initrd"))
        .map(|(version, _)| DeployEnv {
            image: ImageRef { image: image.to_owned(), arch: arch.to_owned(), version },
            kernel_params: kernel_params.to_owned(),
        }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database from before the lifecycle (migrations 1-5) with a bare boot decision keeps it:
    /// the machine gets an id, starts New, and racks are still told what it boots.
    #[tokio::test]
    async fn machines_from_before_the_lifecycle_keep_their_boot_decision_and_get_an_id() {
        let dir = tempfile::tempdir().unwrap();
        sqlx::any::install_default_drivers();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join(crate::db::DATABASE_FILE).display());
        {
            let pool = sqlx::any::AnyPoolOptions::new().max_connections(1).connect(&url).await.unwrap();
            let mut old = crate::db::migrator();
            old.migrations = std::borrow::Cow::Owned(old.migrations[..5].to_vec());
            old.run(&pool).await.unwrap();
            sqlx::query("INSERT INTO machines (mac, hostname, boot_json, updated_at_ms) VALUES ($1, $2, $3, $4)")
                .bind("52:54:00:aa:bb:01")
                .bind("node1")
                .bind(r#"{"kind":"image","image":"ubuntu/noble","arch":"amd64","version":"1","kernel_params":""}"#)
                .bind(1234_i64)
                .execute(&pool)
                .await
                .unwrap();
            pool.close().await;
        }
        let store = Store::open(dir.path()).await.unwrap();
        let rows = store.all_machines().await.unwrap();
        assert_eq!(rows.len(), 1);
        let row = &rows[0];
        assert_eq!(
            (row.mac.as_str(), row.hostname.as_str(), row.state),
            ("52:54:00:aa:bb:01", "node1", MachineState::New)
        );
        assert!(row.id.len() == 8 && row.id.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert_eq!((row.rack_id.as_deref(), row.state_changed_at_ms), (None, 1234));
        assert!(matches!(&row.boot, Some(BootAction::Image { image, .. }) if image == "ubuntu/noble"));
        let served = store.rack_machines("any-rack").await.unwrap();
        assert_eq!(served.len(), 1, "a machine of no rack is served by every rack");
    }

    /// A store with two registered racks: (its dir, the store, rack-a's id, rack-b's id).
    async fn store_with_two_racks() -> (tempfile::TempDir, Store, String, String) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        let (rack_a, _) = store.register_rack("rack-a", "hash", 1).await.unwrap();
        let (rack_b, _) = store.register_rack("rack-b", "hash", 1).await.unwrap();
        (dir, store, rack_a, rack_b)
    }

    /// Machine `id` (MAC and hostname numbered `n`) on `rack` in `state`, the rest as new.
    fn machine_on(id: &str, n: u8, rack: &str, state: MachineState) -> MachineRow {
        MachineRow {
            rack_id: Some(rack.to_owned()),
            state,
            ..MachineRow::new(id.into(), format!("52:54:00:aa:bb:{n:02x}"), format!("node{n}"), 1)
        }
    }

    /// Queue positions follow the scheduler's order (per rack; request time, then id) and count
    /// the waiting machines not asked about: a page holding only the last of a rack's queue
    /// still says 3.
    #[tokio::test]
    async fn queue_positions_count_per_rack_in_the_schedulers_order_beyond_the_page() {
        let (_dir, store, rack_a, rack_b) = store_with_two_racks().await;
        let mut conn = store.pool().acquire().await.unwrap();
        let machine = |id: &str, n: u8, rack: &str, state: MachineState, requested: Option<i64>| MachineRow {
            deploy_requested_at_ms: requested,
            ..machine_on(id, n, rack, state)
        };
        let rows = [
            machine("aaaa0002", 1, &rack_a, MachineState::Allocated, Some(200)),
            machine("aaaa0001", 2, &rack_a, MachineState::Allocated, Some(200)),
            machine("aaaa0000", 3, &rack_a, MachineState::Allocated, Some(100)),
            machine("bbbb0001", 4, &rack_b, MachineState::Allocated, Some(300)),
            machine("cccc0001", 5, &rack_a, MachineState::Deploying, Some(10)),
            machine("dddd0001", 6, &rack_a, MachineState::Ready, None),
        ];
        for row in &rows {
            assert!(insert_machine(&mut conn, row).await.unwrap());
        }
        let positions = queue_positions(&mut conn, &rows).await.unwrap();
        let expected: HashMap<String, u32> =
            [("aaaa0000", 1), ("aaaa0001", 2), ("aaaa0002", 3), ("bbbb0001", 1)].map(|(id, n)| (id.into(), n)).into();
        assert_eq!(positions, expected);
        let page = [rows[0].clone(), rows[5].clone()];
        let positions = queue_positions(&mut conn, &page).await.unwrap();
        assert_eq!(positions, HashMap::from([("aaaa0002".to_owned(), 3)]));
        assert!(queue_positions(&mut conn, &rows[4..]).await.unwrap().is_empty(), "none waits");
    }

    /// The stall timer reads only running jobs without a report since the cutoff; the deploy
    /// scheduler reads the waiting machines in the order they asked and the running deploys per
    /// rack, and nothing when nobody waits.
    #[tokio::test]
    async fn the_timers_read_only_stalled_jobs_and_the_waiting_deploys_in_order() {
        let (_dir, store, rack_a, rack_b) = store_with_two_racks().await;
        let mut conn = store.pool().acquire().await.unwrap();
        let machine =
            |id: &str, n: u8, rack: &str, state: MachineState, progress: Option<i64>, asked: Option<i64>| MachineRow {
                last_progress_at_ms: progress,
                deploy_requested_at_ms: asked,
                ..machine_on(id, n, rack, state)
            };
        let rows = [
            machine("a0000001", 1, &rack_a, MachineState::Deploying, Some(500), Some(1)),
            machine("a0000002", 2, &rack_a, MachineState::Commissioning, None, None),
            machine("a0000003", 3, &rack_a, MachineState::Releasing, Some(999), None),
            machine("a0000004", 4, &rack_a, MachineState::Deployed, Some(1), Some(1)),
            machine("b0000001", 5, &rack_b, MachineState::Deploying, Some(100), Some(1)),
        ];
        for row in &rows {
            assert!(insert_machine(&mut conn, row).await.unwrap());
        }
        assert_eq!(store.stalled_job_ids(600).await.unwrap(), ["a0000001", "a0000002", "b0000001"]);
        assert_eq!(store.stalled_job_ids(100).await.unwrap(), ["a0000002"], "no report counts as 0");
        assert_eq!(store.deploy_queue().await.unwrap(), DeployQueue::default(), "nobody waits");

        let waiting = [
            machine("a0000012", 12, &rack_a, MachineState::Allocated, None, Some(300)),
            machine("a0000011", 11, &rack_a, MachineState::Allocated, None, Some(300)),
            machine("b0000010", 10, &rack_b, MachineState::Allocated, None, Some(200)),
        ];
        for row in &waiting {
            assert!(insert_machine(&mut conn, row).await.unwrap());
        }
        let queue = store.deploy_queue().await.unwrap();
        let order: Vec<&str> = queue.waiting.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(order, ["b0000010", "a0000011", "a0000012"]);
        assert_eq!(queue.waiting[0].1.as_deref(), Some(rack_b.as_str()));
        assert_eq!(queue.running, HashMap::from([(Some(rack_a), 1), (Some(rack_b), 1)]));
    }

    /// A request sent and not answered is sent again once the resend time has passed, and never
    /// while it has not; an answered one never again.
    #[tokio::test]
    async fn unanswered_power_requests_are_sent_again_after_the_resend_time_answered_ones_never() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        let (rack_id, _) = store.register_rack("rack1", "hash", 1).await.unwrap();
        let mut conn = store.pool().acquire().await.unwrap();
        let now = now_ms();
        let machine = MachineRow {
            rack_id: Some(rack_id.clone()),
            power: Some(PowerParameters::Ipmi {
                address: "10.0.0.6".into(),
                port: 623,
                username: "u".into(),
                password: "p".into(),
            }),
            ..MachineRow::new("abcd1234".into(), "52:54:00:aa:bb:01".into(), "node1".into(), now)
        };
        assert!(insert_machine(&mut conn, &machine).await.unwrap());
        assert!(!insert_machine(&mut conn, &machine).await.unwrap(), "a MAC is stored once");
        queue_power(&mut conn, &rack_id, &machine.id, &[PowerAction::Query]).await.unwrap();
        let first = store.take_power_requests(&rack_id, 0, 10).await.unwrap();
        assert_eq!(first.len(), 1);
        assert_eq!(first[0].parameters, machine.power.clone().unwrap(), "the rack gets the password");
        assert!(store.take_power_requests(&rack_id, 0, 10).await.unwrap().is_empty(), "sent, not yet due again");
        assert!(store.take_power_requests("other-rack", now_ms() + 1, 10).await.unwrap().is_empty());
        let again = store.take_power_requests(&rack_id, now_ms() + 1, 10).await.unwrap();
        assert_eq!(again.iter().map(|r| r.id).collect::<Vec<_>>(), [first[0].id], "unanswered: sent again");
        finish_power_request(&mut conn, first[0].id).await.unwrap();
        assert!(store.take_power_requests(&rack_id, now_ms() + 1, 10).await.unwrap().is_empty(), "answered");
    }
}
