//! The region's database: opening and migrating it, transactions, and the two tables every
//! domain writes to (the event log and settings). Each domain keeps its own queries beside it
//! (`users/store.rs`, `racks/store.rs`, `catalogue/store.rs`, `machines/store.rs`, `secret.rs`).
//!
//! Queries go through sqlx's `Any` driver with `$N` placeholders and portable SQL, so PostgreSQL
//! can be added as a second migration directory and a URL, without touching a query.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use sqlx::any::AnyPoolOptions;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::AnyPool;

pub mod events;
pub mod heartbeats;
pub mod settings;

/// File name of the SQLite database inside the data dir.
pub const DATABASE_FILE: &str = "region.db";

/// Connections to SQLite in each of the two pools ([`Store::pool`]): one writer at a time
/// anyway, a few readers for the UI, a few for the racks.
const POOL_CONNECTIONS_MAX: u32 = 8;

thread_local! {
    /// Set on the threads of the region's background work (the racks' requests and the timers,
    /// see `http::background`), which run at a lower priority than the admin's requests.
    static BACKGROUND_THREAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Marks the calling thread as one of the background work's: its queries use the background
/// pool from now on (see [`Store::pool`]). Called when such a thread starts, after it lowered
/// its priority.
pub fn mark_background_thread() {
    BACKGROUND_THREAD.set(true);
}

/// Whether the calling thread is one of the background work's.
pub(crate) fn on_background_thread() -> bool {
    BACKGROUND_THREAD.get()
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create data dir {path}")]
    CreateDir { path: PathBuf, source: std::io::Error },
    #[error("cannot open database {path}")]
    Open { path: PathBuf, source: sqlx::Error },
    #[error("cannot migrate database schema")]
    Migrate { source: sqlx::migrate::MigrateError },
    #[error("database query failed: {what}")]
    Query { what: &'static str, source: sqlx::Error },
    #[error("stored data is damaged: {what}")]
    Corrupt { what: String },
}

impl StoreError {
    /// The database was busy with another writer past the busy timeout (SQLite's
    /// `SQLITE_BUSY`/`SQLITE_LOCKED`): the request may simply be tried again.
    pub fn is_busy(&self) -> bool {
        let source = match self {
            StoreError::Query { source, .. } | StoreError::Open { source, .. } => source,
            _ => return false,
        };
        match source {
            sqlx::Error::Database(e) => {
                matches!(e.code().as_deref(), Some("5" | "6" | "261" | "517"))
                    || e.message().contains("database is locked")
            }
            _ => false,
        }
    }
}

pub fn query_error(what: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |source| StoreError::Query { what, source }
}

/// The schema's migrations, in order (tests run a prefix of them to build an older database).
pub(crate) fn migrator() -> Migrator {
    let migrations = vec![
        Migration::new(
            1,
            Cow::Borrowed("initial"),
            MigrationType::Simple,
            Cow::Borrowed(include_str!("../../migrations/sqlite/0001_initial.sql")),
            false,
        ),
        Migration::new(
            2,
            Cow::Borrowed("images"),
            MigrationType::Simple,
            Cow::Borrowed(include_str!("../../migrations/sqlite/0002_images.sql")),
            false,
        ),
        Migration::new(
            3,
            Cow::Borrowed("machines"),
            MigrationType::Simple,
            Cow::Borrowed(include_str!("../../migrations/sqlite/0003_machines.sql")),
            false,
        ),
        Migration::new(
            4,
            Cow::Borrowed("rack snapshots"),
            MigrationType::Simple,
            Cow::Borrowed(include_str!("../../migrations/sqlite/0004_rack_snapshots.sql")),
            false,
        ),
        Migration::new(
            5,
            Cow::Borrowed("boot event ids"),
            MigrationType::Simple,
            Cow::Borrowed(include_str!("../../migrations/sqlite/0005_boot_event_ids.sql")),
            false,
        ),
        Migration::new(
            6,
            Cow::Borrowed("machine lifecycle"),
            MigrationType::Simple,
            Cow::Borrowed(include_str!("../../migrations/sqlite/0006_machine_lifecycle.sql")),
            false,
        ),
        Migration::new(
            7,
            Cow::Borrowed("machine list order"),
            MigrationType::Simple,
            Cow::Borrowed(include_str!("../../migrations/sqlite/0007_machine_list_order.sql")),
            false,
        ),
        Migration::new(
            8,
            Cow::Borrowed("rack boot generation"),
            MigrationType::Simple,
            Cow::Borrowed(include_str!("../../migrations/sqlite/0008_rack_boot_generation.sql")),
            false,
        ),
    ];
    Migrator { migrations: Cow::Owned(migrations), ..Migrator::DEFAULT }
}

/// Whether a connection given back to its pool may be kept: not if it is still in a
/// transaction, which it then rolls back by closing.
///
/// A request whose client goes away is aborted wherever it waits, and sqlx's `BEGIN` has an
/// await between SQLite starting the transaction and the transaction object existing (a custom
/// `BEGIN IMMEDIATE` is checked on the connection's thread). Aborted there, nothing rolls it
/// back: the connection went back to the pool holding SQLite's write lock, and every write after
/// it failed (the busy timeout on other connections, "non-zero transaction depth" on it) until
/// a restart. A transaction dropped the ordinary way queues its rollback, so the connection is
/// asked once more (a ping runs after what was queued) before it is given up.
/// Each one closed is counted in `closed`, for `/metrics`.
async fn release_outside_a_transaction(
    conn: &mut sqlx::AnyConnection,
    closed: &AtomicU64,
) -> Result<bool, sqlx::Error> {
    use sqlx::Connection;
    if !conn.is_in_transaction() {
        return Ok(true);
    }
    conn.ping().await?;
    if !conn.is_in_transaction() {
        return Ok(true);
    }
    closed.fetch_add(1, Ordering::Relaxed);
    tracing::warn!("a cancelled write left its transaction open; closing its connection, which rolls it back");
    Ok(false)
}

#[derive(Clone, Debug)]
pub struct Store {
    /// The pool of the admin's requests and the command line.
    foreground_pool: AnyPool,
    /// The pool of the background work; see [`Store::pool`].
    background_pool: AnyPool,
    /// Racks' heartbeats not yet written (see [`heartbeats`]); read through by `rack`/`racks`.
    pub(crate) heartbeats: Arc<std::sync::Mutex<heartbeats::HeartbeatBuffer>>,
    /// The write transactions' turn ([`Store::begin_write`]), fair (first come, first served).
    writer: Arc<tokio::sync::Mutex<()>>,
    /// Connections given back inside a transaction and closed ([`release_outside_a_transaction`]).
    closed_in_transaction: Arc<AtomicU64>,
}

/// A write transaction holding the writers' turn until it commits or is dropped (rolled back).
/// Queries run on it as on the transaction's connection (`&mut *tx`).
pub(crate) struct WriteTransaction {
    tx: sqlx::Transaction<'static, sqlx::Any>,
    _turn: tokio::sync::OwnedMutexGuard<()>,
}

impl WriteTransaction {
    pub(crate) async fn commit(self) -> Result<(), sqlx::Error> {
        self.tx.commit().await
    }
}

impl std::ops::Deref for WriteTransaction {
    type Target = sqlx::AnyConnection;
    fn deref(&self) -> &sqlx::AnyConnection {
        &self.tx
    }
}

impl std::ops::DerefMut for WriteTransaction {
    fn deref_mut(&mut self) -> &mut sqlx::AnyConnection {
        &mut self.tx
    }
}

impl Store {
    /// Connections of both pools together: (open, idle).
    pub fn pool_connections(&self) -> (u32, usize) {
        let pools = [&self.foreground_pool, &self.background_pool];
        (pools.iter().map(|pool| pool.size()).sum(), pools.iter().map(|pool| pool.num_idle()).sum())
    }

    /// The pool for the calling thread's queries. Each SQLite connection has its own thread,
    /// started by the thread that opens the connection and sharing its priority: the background
    /// work's queries must run on connections its own (lower-priority) threads opened, or a
    /// rack's query would compete with the admin's at the admin's priority. So background
    /// threads use a pool of their own, which only they open connections in (it starts empty,
    /// and sqlx opens a connection in the task that asks for one).
    pub(crate) fn pool(&self) -> &AnyPool {
        if on_background_thread() {
            &self.background_pool
        } else {
            &self.foreground_pool
        }
    }

    /// Opens (creating if needed) the SQLite database in `data_dir` and brings its schema up to date.
    pub async fn open(data_dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(data_dir)
            .map_err(|source| StoreError::CreateDir { path: data_dir.to_owned(), source })?;
        let path = data_dir.join(DATABASE_FILE);
        sqlx::any::install_default_drivers();
        let url = format!("sqlite://{}?mode=rwc", path.display());
        let closed_in_transaction = Arc::new(AtomicU64::new(0));
        let options = || {
            AnyPoolOptions::new()
                .max_connections(POOL_CONNECTIONS_MAX)
                .after_connect(|conn, _meta| {
                    Box::pin(async move {
                        // WAL lets the UI read while a CLI command (createadmin, secret set) writes.
                        sqlx::query("PRAGMA journal_mode = WAL").execute(&mut *conn).await?;
                        sqlx::query("PRAGMA busy_timeout = 5000").execute(&mut *conn).await?;
                        sqlx::query("PRAGMA foreign_keys = ON").execute(&mut *conn).await?;
                        Ok(())
                    })
                })
                .after_release({
                    let closed = closed_in_transaction.clone();
                    move |conn, _meta| {
                        let closed = closed.clone();
                        Box::pin(async move { release_outside_a_transaction(conn, &closed).await })
                    }
                })
        };
        let open_error = |source| StoreError::Open { path: path.clone(), source };
        let foreground_pool = options().connect(&url).await.map_err(open_error)?;
        migrator().run(&foreground_pool).await.map_err(|source| StoreError::Migrate { source })?;
        // Lazy: its first connection is opened by the first background thread that asks.
        let background_pool = options().connect_lazy(&url).map_err(open_error)?;
        Ok(Store {
            foreground_pool,
            background_pool,
            heartbeats: Default::default(),
            writer: Default::default(),
            closed_in_transaction,
        })
    }

    /// Connections closed because they came back to their pool inside a transaction (a write
    /// aborted inside sqlx's `BEGIN`), since the region started.
    pub fn connections_closed_in_transaction(&self) -> u64 {
        self.closed_in_transaction.load(Ordering::Relaxed)
    }

    /// A connection of the calling thread's pool ([`Store::pool`]), for reads that run several
    /// queries on one connection.
    pub(crate) async fn connection(&self) -> Result<sqlx::pool::PoolConnection<sqlx::Any>, StoreError> {
        self.pool().acquire().await.map_err(query_error("connect"))
    }

    /// Starts a write transaction, after this process's writers before it. SQLite needs
    /// `BEGIN IMMEDIATE`: a deferred transaction that reads, then writes after another
    /// connection committed, fails with SQLITE_BUSY at once instead of waiting out the busy
    /// timeout.
    ///
    /// Writers wait their turn here, holding no connection: SQLite lets one write at a time, so
    /// a writer that took a pooled connection first would wait inside SQLite's busy handler
    /// holding it, and a burst of writers (a hundred deploy requests at once, a rack's power
    /// results) would take every connection the readers (the machine list, the UI) need.
    /// Writers are then at most one connection; other processes (the CLI) still meet the busy
    /// timeout.
    pub(crate) async fn begin_write(&self) -> Result<WriteTransaction, sqlx::Error> {
        let turn = self.writer.clone().lock_owned().await;
        let tx = self.pool().begin_with("BEGIN IMMEDIATE").await?;
        Ok(WriteTransaction { tx, _turn: turn })
    }

    /// One write statement, run in the writers' turn like any write transaction.
    pub(crate) async fn write_one<'q>(
        &self,
        query: sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>>,
    ) -> Result<sqlx::any::AnyQueryResult, sqlx::Error> {
        let mut tx = self.begin_write().await?;
        let result = query.execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(result)
    }

    pub async fn close(&self) {
        self.foreground_pool.close().await;
        self.background_pool.close().await;
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    /// Twice the pool's connections wait to write behind an open write transaction, and a read
    /// still gets a connection at once: waiting writers hold none. (When each writer took a
    /// connection first, they all sat in SQLite's busy handler and the read waited for one.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writers_waiting_their_turn_leave_the_connections_to_readers() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        let first = store.begin_write().await.unwrap();
        let waiting: Vec<_> = (0..2 * POOL_CONNECTIONS_MAX)
            .map(|n| {
                let store = store.clone();
                tokio::spawn(async move {
                    let mut tx = store.begin_write().await.unwrap();
                    sqlx::query("INSERT INTO settings (name, value) VALUES ($1, $2)")
                        .bind(format!("waiting-{n}"))
                        .bind("1")
                        .execute(&mut *tx)
                        .await
                        .unwrap();
                    tx.commit().await.unwrap();
                })
            })
            .collect();
        // Give the writers time to queue (or, as before, to take the connections).
        tokio::time::sleep(Duration::from_millis(200)).await;
        let started = Instant::now();
        let read = tokio::time::timeout(
            Duration::from_secs(2),
            sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM settings").fetch_one(store.pool()),
        )
        .await;
        assert!(read.is_ok(), "the read waited {:?} for a connection", started.elapsed());
        drop(first);
        for writer in waiting {
            tokio::time::timeout(Duration::from_secs(10), writer).await.unwrap().unwrap();
        }
        let written: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM settings WHERE name LIKE 'waiting-%'")
            .fetch_one(store.pool())
            .await
            .unwrap();
        assert_eq!(written, i64::from(2 * POOL_CONNECTIONS_MAX), "every waiting writer wrote, in turn");
    }

    /// A write cancelled at any point (a client that goes away aborts its request's task) leaves
    /// no transaction open: each begin below is dropped after a different number of polls, some
    /// of them inside sqlx's `BEGIN IMMEDIATE` after SQLite ran it but before the transaction
    /// object exists. Such a connection went back to the pool holding the write lock, and every
    /// write after it failed (5 s busy timeout, or "begin_with at non-zero transaction depth").
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_cancelled_anywhere_leaves_no_transaction_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        for round in 0..CANCELLED_BEGINS_PER_POLL_COUNT {
            for polls in 1..=CANCELLED_BEGIN_POLLS_MAX {
                let mut begin = Box::pin(store.begin_write());
                for _ in 0..polls {
                    if futures_util::FutureExt::now_or_never(begin.as_mut()).is_some() {
                        break;
                    }
                    tokio::task::yield_now().await;
                }
                drop(begin);
                // A write after each: one left open shows at once, not at the end.
                let write = tokio::time::timeout(
                    Duration::from_secs(2),
                    store.write_one(
                        sqlx::query("INSERT INTO settings (name, value) VALUES ($1, '1')")
                            .bind(format!("after-{round}-{polls}")),
                    ),
                )
                .await;
                match write {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => panic!("round {round}, cancelled after {polls} polls: the next write failed: {e}"),
                    Err(_) => panic!("round {round}, cancelled after {polls} polls: the next write waited 2 s"),
                }
            }
        }
    }

    /// A connection given back inside a transaction that nothing will roll back (what an abort
    /// inside sqlx's `BEGIN` leaves; here the transaction is forgotten) is closed and counted,
    /// and the next write, on another connection, goes through at once.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_connection_given_back_inside_a_transaction_is_closed_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        let mut conn = store.pool().acquire().await.unwrap();
        let tx = sqlx::Connection::begin_with(&mut *conn, "BEGIN IMMEDIATE").await.unwrap();
        std::mem::forget(tx);
        drop(conn);
        let write = tokio::time::timeout(
            Duration::from_secs(2),
            store.write_one(sqlx::query("INSERT INTO settings (name, value) VALUES ('after', '1')")),
        )
        .await;
        assert!(matches!(write, Ok(Ok(_))), "the next write: {write:?}");
        assert_eq!(store.connections_closed_in_transaction(), 1);
    }

    /// The cancelled-write test's sweep: each number of polls, this many times.
    const CANCELLED_BEGINS_PER_POLL_COUNT: usize = 20;
    const CANCELLED_BEGIN_POLLS_MAX: usize = 12;
}
